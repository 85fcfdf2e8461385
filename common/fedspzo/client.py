"""FedSPZO client: catch up by replaying the update log, run S split-perturbation steps, send the scalars.

Forward passes only: no autograd graph, no optimizer state, no copy of the parameters. The node keeps the
perturbed parameters of the global model on its disk (common.nodestore) between rounds.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import RecordDict

from common.catchup import unpack_snapshot
from common.config import RunConfig
from common.fedspzo.spzo import build, local_update, replay
from common.fedspzo.wire import pack_reply, unpack_instruction
from common.memory import PeakRSS
from common.nodestore import NodeStore, reach_round, state_dir, sync_reply
from common.training import client_data, step_batches
from common.zeroorder import fingerprint, mean_loss


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedSPZO round (the ClientApp handler only dispatches here)."""
    with PeakRSS() as mem:
        sm = build(cfg)
        instr = unpack_instruction(content, cfg)
        store = NodeStore(state_dir(node_config, run_id, node_id), "fedspzo-state", fingerprint(cfg, "fedspzo"))
        snapshot = unpack_snapshot(content, instr.server_round, sm.params)  # common.catchup
        ok, reached = reach_round(store, sm.params, instr.server_round, instr.log, lambda e: replay(sm, e), snapshot)
        if not ok:
            return sync_reply(reached)  # the server resends the log from `reached` next time
        encoded, data_key = client_data(cfg, node_config)
        n = len(encoded["labels"])
        batches = step_batches(cfg, n, instr.server_round, data_key)
        for pert in sm.perturbations:
            pert.seconds = 0.0
        start = time.perf_counter()
        result = local_update(sm, cfg, instr.rho, instr.lr, encoded, batches)
        seconds = time.perf_counter() - start
    return pack_reply(
        result.g1,
        result.g2,
        {
            "num-examples": n,
            "model-round": reached,
            "train-loss": mean_loss(result.losses),
            "train-seconds": seconds,
            "peak-rss-mb": mem.peak_mb,
            "local-steps": len(batches),
            **result.calls.metrics(),
            "perturb-seconds": sum(pert.seconds for pert in sm.perturbations),
        },
    )
