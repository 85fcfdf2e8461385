"""FedKSeed client: catch up by replaying the update log, run S zero-order steps over K seeds, send G.

Forward passes only, like FedSPZO (common/fedspzo/client.py), but every perturbation covers the whole model.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import RecordDict

from common.catchup import unpack_snapshot
from common.config import RunConfig
from common.fedkseed.kseed import build, local_update, replay
from common.fedkseed.wire import pack_reply, unpack_instruction
from common.memory import PeakRSS
from common.nodestore import NodeStore, reach_round, state_dir, sync_reply
from common.seeds import derive_seed
from common.training import client_data, step_batches
from common.zeroorder import fingerprint, mean_loss


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedKSeed round (the ClientApp handler only dispatches here)."""
    with PeakRSS() as mem:
        km = build(cfg)
        instr = unpack_instruction(content, cfg)
        store = NodeStore(state_dir(node_config, run_id, node_id), "fedkseed-state", fingerprint(cfg, "fedkseed"))
        p = cfg.kseed.perturbations
        snapshot = unpack_snapshot(content, instr.server_round, km.params)  # common.catchup
        ok, reached = reach_round(store, km.params, instr.server_round, instr.log, lambda e: replay(km, e, p), snapshot)
        if not ok:
            return sync_reply(reached)  # the server resends the log from `reached` next time
        encoded, data_key = client_data(cfg, node_config)
        n = len(encoded["labels"])
        batches = step_batches(cfg, n, instr.server_round, data_key)
        km.pert.seconds = 0.0  # count local training only, not the catch-up
        start = time.perf_counter()
        pick = derive_seed("fedkseed-pick", cfg.seed, instr.server_round, data_key)
        result = local_update(km, cfg, instr.lr, encoded, batches, pick)
        seconds = time.perf_counter() - start
    return pack_reply(
        result.scalars,
        {
            "num-examples": n,
            "model-round": reached,
            "train-loss": mean_loss(result.losses),
            "train-seconds": seconds,
            "peak-rss-mb": mem.peak_mb,
            "local-steps": len(batches),
            **result.calls.metrics(),
            "perturb-seconds": km.pert.seconds,
        },
    )
