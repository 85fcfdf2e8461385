"""FedTT's and FedTT+'s run-config section, `tt.*`: its settings (each field's help is the comment beside it,
which docs/configuration.md shows, with RANGES and CHOICES) and its own validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from common.methodspec import need

if TYPE_CHECKING:
    from common.config import RunConfig

TT_PLUS_RULES = ("gradient", "cyclic")


@dataclass(frozen=True)
class TTConfig:
    rank: int = 4  # inner TT rank r of every core (r_0 = r_L = 1)
    bottleneck: int = 64  # b: the adapter maps d -> b -> d
    scale: float = 1.0  # s in y + s * Up(act(Down(y)))
    max_mode: int = 4  # mode sizes: factors of d and of b of about this size (384 x 64 -> 6,4,4,4 x 4,4,4)
    plus_rule: str = "gradient"  # FedTT+: which cores train each round (gradient | cyclic)
    plus_cores: int = 1  # FedTT+: cores trained (and sent) per TT matrix per round; 1 keeps averaging exact

    # key -> (low, high, low included, why): finite and in this range (common.configchecks.ranges)
    RANGES: ClassVar[dict] = {"scale": (0.0, 100.0, False, "the adapter's output scale s; 1 is the default")}
    CHOICES: ClassVar[dict] = {"plus-rule": TT_PLUS_RULES}  # key -> its values, as docs/configuration.md lists them

    # key -> (largest value, why): common.configchecks.maxima
    MAXIMA: ClassVar[dict] = {
        "rank": (1024, "the TT rank"),
        "bottleneck": (65_536, "the adapter width"),
        "max-mode": (1024, "a mode size"),
        "plus-cores": (1024, "cores per TT matrix"),
    }

    def validate(self, cfg: RunConfig, in_use: bool) -> None:
        need(self.rank >= 1, f"tt.rank must be >= 1, got {self.rank}")
        need(self.bottleneck >= 1, f"tt.bottleneck must be >= 1, got {self.bottleneck}")
        need(
            self.max_mode >= 2,
            f"tt.max-mode must be >= 2 (the size the matrix's modes are cut to), got {self.max_mode}",
        )
        need(self.plus_rule in TT_PLUS_RULES, f"tt.plus-rule must be one of {', '.join(TT_PLUS_RULES)}")
        need(
            self.plus_cores >= 1,
            f"tt.plus-cores (cores trained per TT matrix per round) must be >= 1, got {self.plus_cores}",
        )
