"""FedKRSO client: catch up from the update log, train I intervals x J steps in random subspaces, reply.

The client keeps the global model locally (`NodeStore`) and never downloads weights: each round it
applies the log entries it has not applied yet (normally only the previous round's), saves that global
state, trains on a copy in memory, and sends only its per-seed accumulators and its head.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import RecordDict

from common.catchup import unpack_snapshot
from common.config import RunConfig
from common.fedkrso.state import KrsoModel, build, fingerprint
from common.fedkrso.subspace import Accumulators, Subspaces, apply_update
from common.fedkrso.wire import pack_reply, unpack_instruction
from common.memory import PeakRSS
from common.nodestore import NodeStore, reach_round, state_dir, sync_reply
from common.seeds import derive_seed
from common.training import Encoded, client_data, dropout_seed, make_optimizer, step_batches, train_steps


def local_update(
    km: KrsoModel, cfg: RunConfig, seeds: list[int], encoded: Encoded, batches: list[list[int]], dropout: int
) -> tuple[Accumulators, list[float]]:
    """I intervals of J steps; interval i trains B in seed i mod K, merges W <- W + B P, A_k += B.

    `dropout`: the round's dropout seed (`common.training.dropout_seed`); interval i draws from its own."""
    spaces = Subspaces(km.targets, cfg.krso.rank)
    head_opt = make_optimizer(km.head.values(), cfg.train)  # the head's Adam state spans the round
    acc: Accumulators = {}
    losses: list[float] = []
    j_steps = cfg.interval_steps
    try:
        for i in range(cfg.krso.intervals):
            j = i % len(seeds)
            bs = spaces.begin(seeds[j])
            opt = make_optimizer(bs, cfg.train)  # B restarts at 0 each interval, so does its state
            part = batches[i * j_steps : (i + 1) * j_steps]
            losses += train_steps(km.loaded.model, encoded, part, [opt, head_opt], derive_seed(dropout, i))
            for name, b in spaces.merge().items():
                key = (j, name)
                acc[key] = acc[key] + b if key in acc else b
    finally:
        spaces.remove()
    return acc, losses


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedKRSO round (the ClientApp handler only dispatches here)."""
    with PeakRSS() as mem:
        km = build(cfg)
        instr = unpack_instruction(content, cfg.krso.k, km.shapes, km.head_shapes, cfg.seed)
        store = NodeStore(state_dir(node_config, run_id, node_id), "fedkrso-state", fingerprint(cfg))
        ok, reached = reach_round(
            store,
            km.target_weights(),
            instr.server_round,
            instr.log,
            lambda e: apply_update(km.targets, e.seeds, e.bbar, cfg.krso.rank),
            unpack_snapshot(content, instr.server_round, km.target_weights()),  # common.catchup
        )
        if not ok:
            return sync_reply(reached)  # the server resends the log from `reached` next time
        km.set_head(instr.head)
        encoded, data_key = client_data(cfg, node_config)
        n = len(encoded["labels"])
        batches = step_batches(cfg, n, instr.server_round, data_key)
        start = time.perf_counter()
        dropout = dropout_seed(cfg, instr.server_round, data_key)
        acc, losses = local_update(km, cfg, instr.seeds, encoded, batches, dropout)
        seconds = time.perf_counter() - start
    return pack_reply(
        acc,
        km.head_state(),
        {
            "num-examples": n,
            "model-round": reached,
            "train-loss": sum(losses) / len(losses),
            "train-seconds": seconds,
            "peak-rss-mb": mem.peak_mb,
            "local-steps": len(losses),
        },
    )
