"""FedKRSO's server: its strategy (an update-log strategy) and its setup.

Thin: the mathematics is in methods.fedkrso.subspace, the wire format in methods.fedkrso.wire.
"""

from __future__ import annotations

import math
from logging import INFO

import torch
from flwr.app import RecordDict
from flwr.common import log

from common.config import RunConfig
from common.records import RunRecorder
from common.wire import reply_limit
from methods.fedkrso.config import interval_steps
from methods.fedkrso.model import KrsoModel, build
from methods.fedkrso.subspace import LogEntry, apply_update, round_seeds
from methods.fedkrso.wire import Update, pack_instruction, unpack_instruction, unpack_update
from server_app.round import Replies, ServerSetup
from server_app.updatelog import LogStrategy


class FedKRSO(LogStrategy):
    """Round t: send K fresh seeds + the log entries each node lacks; average accumulators; apply; log."""

    def __init__(self, cfg: RunConfig, km: KrsoModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.km = km

    def summary(self) -> None:
        k = self.cfg.krso
        log(
            INFO,
            "FedKRSO: K=%d seeds/round, rank r=%d, I=%d intervals x J=%d steps, %d target matrices",
            k.k,
            k.rank,
            k.intervals,
            interval_steps(self.cfg),
            len(self.km.targets),
        )

    def _seeds(self, server_round: int) -> list[int]:
        return round_seeds(self.cfg.seed, server_round, self.cfg.krso.k)

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return pack_instruction(server_round, self._seeds(server_round), missed, self.km.head_state())

    def read_update(self, content: RecordDict, server_round: int) -> Update:
        return unpack_update(content, self.cfg.krso.k, self.km.shapes, self.km.head_shapes)

    def max_reply_bytes(self) -> int:
        k = self.cfg.krso.k
        numbers = k * sum(math.prod(s) for s in self.km.shapes.values())
        numbers += sum(math.prod(s) for s in self.km.head_shapes.values())
        return reply_limit(4 * numbers, k * len(self.km.shapes) + len(self.km.head_shapes))

    def empty_entry(self, server_round: int) -> LogEntry:
        return LogEntry(server_round, tuple(self._seeds(server_round)), {})

    def restore(self, content: RecordDict) -> list[LogEntry]:
        ins = unpack_instruction(content, self.cfg.krso.k, self.km.shapes, self.km.head_shapes, self.cfg.seed)
        for entry in ins.log:
            apply_update(self.km.targets, entry.seeds, entry.bbar, self.cfg.krso.rank)
        self.km.set_head(ins.head)
        return ins.log

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.km.target_weights(), **self.km.head}

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        return self.km.target_weights()  # the head travels in every instruction

    def replay_passes(self, entry: LogEntry) -> float:
        """apply_update runs one addmm per (seed, target) logged: a pass over that target."""
        numel = {n: w.numel() for n, w in self.km.target_weights().items()}
        return sum(numel[name] for _, name in entry.bbar) / sum(numel.values())

    def update(self, server_round: int, weights: list[float], replies: Replies) -> LogEntry:
        # One update per reply: its accumulators (differences already) and its head (against the global head),
        # clipped together; absent accumulators are zero updates (common.robust).
        head = {("head", n): v for n, v in self.km.head_state().items()}
        merged = self.combine(
            server_round,
            weights,
            replies.map(lambda r: {**r.accumulators, **{("head", n): v for n, v in r.head.items()}}),
            head,
        )
        bbar = {k: v for k, v in merged.items() if k[0] != "head"}
        seeds = self._seeds(server_round)
        apply_update(self.km.targets, seeds, bbar, self.cfg.krso.rank)  # W <- W + sum_k Bbar_k P_k
        self.km.set_head({n: merged[("head", n)] for n in self.km.head})
        return LogEntry(server_round, tuple(seeds), bbar)


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    km = build(cfg)
    return ServerSetup(km.loaded.model, FedKRSO(cfg, km, recorder))
