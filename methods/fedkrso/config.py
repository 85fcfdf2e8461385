"""FedKRSO's run-config section, `krso.*`: its settings (each field's help is the comment beside it, which
docs/configuration.md shows) and its own validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from common.methodspec import need

if TYPE_CHECKING:
    from common.config import RunConfig


@dataclass(frozen=True)
class KrsoConfig:
    k: int = 4  # seeds (random subspaces) per round
    rank: int = 8  # r: rows of each projection P (r x d_in)
    intervals: int = 4  # I: each interval trains in one seed's subspace, then merges
    targets: str = "all-linear"  # or a comma list of module-name suffixes, e.g. "query,value"

    # key -> (largest value, why): common.configchecks.maxima
    MAXIMA: ClassVar[dict] = {
        "k": (1024, "seeds per round"),
        "rank": (65_536, "rows of each P"),
        "intervals": (1_000_000, "intervals per round"),
    }

    def validate(self, cfg: RunConfig, in_use: bool) -> None:
        need(self.k >= 1, f"krso.k (seeds per round) must be >= 1, got {self.k}")
        need(self.rank >= 1, f"krso.rank must be >= 1, got {self.rank}")
        need(self.intervals >= 1, f"krso.intervals must be >= 1, got {self.intervals}")
        need(self.targets.strip() != "", "krso.targets must be 'all-linear' or a comma list of names")
        if in_use:
            need(
                cfg.train.local_steps % self.intervals == 0,
                f"train.local-steps ({cfg.train.local_steps}) must be a multiple of krso.intervals "
                f"({self.intervals}): each of the I intervals runs J = local-steps / I steps",
            )


def interval_steps(cfg: RunConfig) -> int:
    """J: local steps per interval (train.local-steps = I x J)."""
    return cfg.train.local_steps // cfg.krso.intervals
