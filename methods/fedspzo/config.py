"""FedSPZO's run-config section, `spzo.*` (it shares `zo.*` with FedKSeed: common.config.ZoConfig): its
settings (each field's help is the comment beside it, which docs/configuration.md shows) and its own validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from common.methodspec import need

if TYPE_CHECKING:
    from common.config import RunConfig


@dataclass(frozen=True)
class SpzoConfig:
    split_layer: int = -1  # block 1 = embeddings + transformer blocks [0, split-layer); block 2 = the rest;
    # negative counts from the end: -1 = block 2 is the last transformer block and the head, on any model
    p1: int = 1  # perturbations of block 1 per step (each runs the whole network twice); 0 with zo.params=head
    p2: int = 8  # perturbations of block 2 per step (each runs only block 2 twice, on cached h0); p2 > p1

    # key -> (largest value, why): common.configchecks.maxima
    MAXIMA: ClassVar[dict] = {
        "split-layer": (100_000, "transformer blocks"),
        "p1": (100_000, "perturbations per step"),
        "p2": (100_000, "perturbations per step"),
    }

    def validate(self, cfg: RunConfig, in_use: bool) -> None:
        need(
            self.split_layer != 0, "spzo.split-layer must not be 0 (block 1 would be empty): 1.. or -1 (the last block)"
        )
        need(self.p1 >= 0 and self.p2 >= 1, "spzo.p1 must be >= 0 and spzo.p2 >= 1 (perturbations per step)")
