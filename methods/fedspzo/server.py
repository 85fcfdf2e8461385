"""FedSPZO's server: its strategy (an update-log strategy) and its setup."""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log

from common.config import RunConfig
from common.records import RunRecorder
from common.wire import reply_limit
from methods.fedspzo import spzo
from methods.fedspzo import wire as spzo_wire
from methods.fedspzo.spzo import SpzoModel, build
from server_app.round import Replies, ServerSetup
from server_app.updatelog import LogStrategy


class FedSPZO(LogStrategy):
    """Round t: send the round seed ρ_t (+ the log a node lacks); average the scalars per (step, perturbation); replay."""

    def __init__(self, cfg: RunConfig, sm: SpzoModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.sm = sm

    def summary(self) -> None:
        c = self.cfg
        log(
            INFO,
            "FedSPZO: split at block %d (%d + %d perturbed numbers), P1=%d, P2=%d, %d steps, eps=%g, lr=%g",
            self.sm.split.split_layer,
            self.sm.pert1.numel if self.sm.pert1 else 0,
            self.sm.pert2.numel,
            c.spzo.p1,
            c.spzo.p2,
            c.train.local_steps,
            c.zo.eps,
            c.zo.lr,
        )

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return spzo_wire.pack_instruction(
            server_round, spzo.round_seed(self.cfg.seed, server_round), self.cfg.zo.lr, missed
        )

    def read_update(self, content: RecordDict, server_round: int) -> dict[str, np.ndarray]:
        c = self.cfg
        return spzo_wire.unpack_update(content, c.spzo.p1, c.spzo.p2, c.train.local_steps, c.zo.eps)

    def max_reply_bytes(self) -> int:
        c = self.cfg
        return reply_limit(4 * c.train.local_steps * (c.spzo.p1 + c.spzo.p2), 2)

    def empty_entry(self, server_round: int) -> spzo.LogEntry:
        c = self.cfg
        rho = spzo.round_seed(c.seed, server_round)
        return spzo.LogEntry(
            server_round, rho, c.zo.lr, np.zeros((0, c.spzo.p1), np.float32), np.zeros((0, c.spzo.p2), np.float32)
        )

    def restore(self, content: RecordDict) -> list[spzo.LogEntry]:
        c = self.cfg
        entries = spzo_wire.unpack_instruction(content, c).log
        for entry in entries:
            spzo.replay(self.sm, entry)
        return entries

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.sm.params

    def replay_passes(self, entry: spzo.LogEntry) -> float:
        """spzo.replay runs every (step, perturbation) of both blocks, zeros included."""
        block1 = self.sm.pert1.numel if self.sm.pert1 else 0
        block2 = self.sm.pert2.numel
        rows, p1 = entry.g1.shape
        return rows * (p1 * block1 + entry.g2.shape[1] * block2) / (block1 + block2)

    def update(self, server_round: int, weights: list[float], replies: Replies) -> spzo.LogEntry:
        g = self.combine(server_round, weights, replies)  # per (step, pert.)
        entry = spzo.LogEntry(
            server_round, spzo.round_seed(self.cfg.seed, server_round), self.cfg.zo.lr, g["g1"], g["g2"]
        )
        spzo.replay(self.sm, entry)
        return entry


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    sm = build(cfg)
    return ServerSetup(sm.zo.loaded.model, FedSPZO(cfg, sm, recorder))
