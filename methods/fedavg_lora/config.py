"""FedAvg-LoRA's run-config section, `lora.*`, after peft's LoraConfig: its settings (each field's help is the
comment beside it, which docs/configuration.md shows, with RANGES) and its own validation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from common.methodspec import need

if TYPE_CHECKING:
    from common.config import RunConfig


@dataclass(frozen=True)
class LoraConfig:
    rank: int = 8  # r of LoRA's A (r x d_in) and B (d_out x r)
    alpha: float = 16.0  # peft's lora_alpha: the update is scaled by alpha / rank
    targets: str = "query,value"  # module-name suffixes; LLaMA family: "q_proj,v_proj"
    dropout: float = 0.05  # peft's lora_dropout, in [0, 1)

    # key -> (low, high, low included, why): finite and in this range (common.configchecks.ranges)
    RANGES: ClassVar[dict] = {
        "alpha": (0.0, 1024.0, False, "the LoRA update is scaled by alpha / rank; 16 is the default")
    }

    # key -> (largest value, why): common.configchecks.maxima
    MAXIMA: ClassVar[dict] = {"rank": (65_536, "LoRA's r")}

    def validate(self, cfg: RunConfig, in_use: bool) -> None:
        need(self.rank >= 1, f"lora.rank must be >= 1, got {self.rank}")
        need(0 <= self.dropout < 1, f"lora.dropout must be in [0, 1), got {self.dropout}")
        need(self.targets.strip() != "", "lora.targets must be a comma list of module names, e.g. 'query,value'")
