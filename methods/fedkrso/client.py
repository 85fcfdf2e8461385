"""FedKRSO client: catch up from the update log, train I intervals x J steps in random subspaces, reply.

The client keeps the global model locally (`NodeStore`) and never downloads weights: each round it
applies the log entries it has not applied yet (normally only the previous round's), saves that global
state, trains on a copy in memory, and sends only its per-seed accumulators and its head.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from common.clientround import ClientRound, Local, Start, Trained
from common.config import RunConfig
from common.seeds import derive_seed
from common.training import Encoded, dropout_seed, make_optimizer, train_steps
from methods.fedkrso.config import interval_steps
from methods.fedkrso.model import KrsoModel, build, fingerprint
from methods.fedkrso.subspace import Accumulators, Subspaces, apply_update
from methods.fedkrso.wire import pack_reply, unpack_instruction


def local_update(
    km: KrsoModel, cfg: RunConfig, seeds: list[int], encoded: Encoded, batches: list[list[int]], dropout: int
) -> tuple[Accumulators, list[float]]:
    """I intervals of J steps; interval i trains B in seed i mod K, merges W <- W + B P, A_k += B.

    `dropout`: the round's dropout seed (`common.training.dropout_seed`); interval i draws from its own."""
    spaces = Subspaces(km.targets, cfg.krso.rank)
    # the head's Adam state spans the round; the LM head (head.kind = "lm") is pretrained: no new head to train
    head_opts = [make_optimizer(km.head.values(), cfg.train)] if km.head else []
    acc: Accumulators = {}
    losses: list[float] = []
    j_steps = interval_steps(cfg)
    try:
        for i in range(cfg.krso.intervals):
            j = i % len(seeds)
            bs = spaces.begin(seeds[j])
            opt = make_optimizer(bs, cfg.train)  # B restarts at 0 each interval, so does its state
            part = batches[i * j_steps : (i + 1) * j_steps]
            losses += train_steps(km.loaded.model, encoded, part, [opt, *head_opts], derive_seed(dropout, i))
            for name, b in spaces.merge().items():
                key = (j, name)
                acc[key] = acc[key] + b if key in acc else b
    finally:
        spaces.remove()
    return acc, losses


class KrsoRound(ClientRound):
    def start(self) -> Start:
        cfg = self.cfg
        self.km = km = build(cfg)
        self.instr = instr = unpack_instruction(self.content, cfg.krso.k, km.shapes, km.head_shapes, cfg.seed)
        begun = self.catch_up(
            "fedkrso-state",
            fingerprint(cfg),
            km.target_weights(),
            instr.server_round,
            instr.log,
            lambda e: apply_update(km.targets, e.seeds, e.bbar, cfg.krso.rank),
        )
        if begun.caught_up:
            km.set_head(instr.head)
        return begun

    def train(self, local: Local) -> Trained:
        dropout = dropout_seed(self.cfg, local.server_round, local.data_key)
        acc, losses = local_update(self.km, self.cfg, self.instr.seeds, local.encoded, local.batches, dropout)
        return Trained(acc, sum(losses) / len(losses), len(losses))

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        return pack_reply(trained.update, self.km.head_state(), metrics)


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedKRSO round (the ClientApp handler only dispatches here)."""
    return KrsoRound(content, cfg, node_config, run_id, node_id).run()
