"""FedTT / FedTT+ client: load the global adapters and head, train the round's cores and the head, reply.

Clients keep no state between rounds: the instruction carries every core (frozen ones included), so a
node that missed rounds or lost its disk needs nothing else.
"""

from __future__ import annotations

import time
from typing import Any

from flwr.app import RecordDict

from common.config import RunConfig
from common.memory import PeakRSS
from common.training import batch, client_data, dropout_seed, make_optimizer, step_batches, train_steps
from methods.fedtt.model import build
from methods.fedtt.tt import gradient_scores
from methods.fedtt.wire import pack_reply, unpack_instruction


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedTT / FedTT+ round (the ClientApp handler only dispatches here)."""
    with PeakRSS() as mem:
        tm = build(cfg)
        shapes = tm.adapters.shapes()
        instr = unpack_instruction(content, shapes, tm.head_shapes)
        tm.adapters.load(instr.cores)
        tm.set_head(instr.head)
        encoded, data_key = client_data(cfg, node_config)
        n = len(encoded["labels"])
        batches = step_batches(cfg, n, instr.server_round, data_key)
        trainable = tm.adapters.set_trainable(instr.selected)  # FedTT+: the others stay frozen, no grads
        opt = make_optimizer([*trainable, *tm.head.values()], cfg.train)
        start = time.perf_counter()
        losses = train_steps(tm.loaded.model, encoded, batches, [opt], dropout_seed(cfg, instr.server_round, data_key))
        seconds = time.perf_counter() - start
        scores = None
        if instr.want_scores:
            measured = gradient_scores(tm.loaded.model, tm.adapters, batch(encoded, batches[-1]))
            scores = [measured[k] for k in shapes]
    return pack_reply(
        tm.adapters.state(instr.selected),
        shapes,
        tm.head_state(),
        scores,
        {
            "num-examples": n,
            "model-round": instr.server_round - 1,
            "train-loss": sum(losses) / len(losses),
            "train-seconds": seconds,
            "peak-rss-mb": mem.peak_mb,
            "local-steps": len(losses),
        },
    )
