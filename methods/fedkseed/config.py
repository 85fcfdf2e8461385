"""FedKSeed's run-config section, `kseed.*` (it shares `zo.*` with FedSPZO: common.config.ZoConfig): its
settings (each field's help is the comment beside it, which docs/configuration.md shows) and its own validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from common.methodspec import need

if TYPE_CHECKING:
    from common.config import RunConfig


@dataclass(frozen=True)
class KseedConfig:
    k: int = 4096  # candidate seeds, fixed for the run
    perturbations: int = 4  # whole-model perturbations per local step, each with a seed drawn from the K

    # key -> (largest value, why): common.configchecks.maxima
    MAXIMA: ClassVar[dict] = {
        "k": (10_000_000, "candidate seeds"),
        "perturbations": (100_000, "perturbations per step"),
    }

    def validate(self, cfg: RunConfig, in_use: bool) -> None:
        need(self.k >= 1, f"kseed.k (candidate seeds) must be >= 1, got {self.k}")
        need(self.k <= 2**31 - 1, "kseed.k must fit an int32 seed index")
        need(self.perturbations >= 1, "kseed.perturbations must be >= 1")
