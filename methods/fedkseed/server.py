"""FedKSeed's server: its strategy (an update-log strategy) and its setup."""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log

from common.config import RunConfig
from common.records import RunRecorder
from common.wire import reply_limit
from methods.fedkseed import kseed
from methods.fedkseed import wire as kseed_wire
from methods.fedkseed.kseed import KseedModel, build
from server_app.round import Replies, ServerSetup
from server_app.updatelog import LogStrategy


class FedKSeed(LogStrategy):
    """Round t: send the log a node lacks (K candidate seeds are fixed); average G per seed; replay."""

    def __init__(self, cfg: RunConfig, km: KseedModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.km = km

    def summary(self) -> None:
        c = self.cfg
        log(
            INFO,
            "FedKSeed: K=%d candidate seeds, %d perturbation(s)/step over %d numbers, %d steps, eps=%g, lr=%g",
            c.kseed.k,
            c.kseed.perturbations,
            self.km.pert.numel,
            c.train.local_steps,
            c.zo.eps,
            c.zo.lr,
        )

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return kseed_wire.pack_instruction(server_round, self.cfg.zo.lr, missed)

    def read_update(self, content: RecordDict, server_round: int) -> np.ndarray:
        c = self.cfg
        estimates = c.train.local_steps * c.kseed.perturbations
        return kseed_wire.unpack_update(content, c.kseed.k, c.zo.eps, estimates)

    def max_reply_bytes(self) -> int:
        return reply_limit(4 * self.cfg.kseed.k, 2)  # dense; sparse is smaller (8 B per seed used, < K/2 used)

    def empty_entry(self, server_round: int) -> kseed.LogEntry:
        return kseed.LogEntry(server_round, self.cfg.zo.lr, np.zeros(self.cfg.kseed.k, np.float32))

    def restore(self, content: RecordDict) -> list[kseed.LogEntry]:
        entries = kseed_wire.unpack_instruction(content, self.cfg).log
        for entry in entries:
            kseed.replay(self.km, entry, self.cfg.kseed.perturbations)
        return entries

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.km.params

    def replay_passes(self, entry: kseed.LogEntry) -> float:
        """kseed.replay runs one whole-model pass per candidate seed with a nonzero scalar."""
        return float(np.count_nonzero(entry.scalars))

    def update(self, server_round: int, weights: list[float], replies: Replies) -> kseed.LogEntry:
        # per candidate seed, absent = 0
        g = self.combine(server_round, weights, replies.map(lambda scalars: {"G": scalars}))["G"]
        entry = kseed.LogEntry(server_round, self.cfg.zo.lr, g)
        kseed.replay(self.km, entry, self.cfg.kseed.perturbations)
        return entry


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    km = build(cfg)
    return ServerSetup(km.zo.loaded.model, FedKSeed(cfg, km, recorder))
