"""FedAvg-LoRA's model: the base model wrapped by `peft` with LoRA on `lora.targets`, and what it trains.

Trained and sent both ways: every LoRA A (r x d_in) and B (d_out x r) matrix and the classification head
(peft's `modules_to_save`, a trainable copy); everything else is frozen. Wire keys are peft's parameter
names without the "base_model.model." prefix every one of them shares.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common import rng
from common.config import RunConfig
from common.precision import train_in_float32
from common.runmodel import load_run_model

PREFIX = "base_model.model."


def build(cfg: RunConfig) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """(peft model, its trainable parameters by wire name); identical on every node for a given seed."""
    from peft import LoraConfig, get_peft_model

    loaded = load_run_model(cfg)
    names = [
        n
        for n, m in loaded.model.named_modules()
        if isinstance(m, nn.Linear) and not any(n == u or n.startswith(u + ".") for u in loaded.lm_head)
    ]
    config = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=resolve_targets(cfg.lora.targets, names),
        modules_to_save=list(loaded.head) or None,
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        net = get_peft_model(loaded.model, config)
    params = {n.removeprefix(PREFIX): p for n, p in net.named_parameters() if p.requires_grad}
    train_in_float32(params.values())  # peft's adapters are already; a head's trainable copy may not be
    init_lora_a(params, cfg.seed)
    return net, params


# The same projection under the names of the two families: "query,value" (the default) means the attention
# query and value projections on a BERT-family encoder and on a LLaMA-family decoder alike (peft's own
# defaults for the two: query/value and q_proj/v_proj).
ALIASES = {"query": "q_proj", "key": "k_proj", "value": "v_proj", "q_proj": "query", "k_proj": "key", "v_proj": "value"}


def resolve_targets(spec: str, names: list[str]) -> list[str]:
    """lora.targets as the module-name suffixes of this model: each name as given where the model has it, else
    its other family's name (ALIASES); a name matching neither is refused with the suffixes the model has."""

    def has(t: str) -> bool:
        return any(n == t or n.endswith("." + t) for n in names)

    out, unmatched = [], []
    for t in (t.strip() for t in spec.split(",") if t.strip()):
        match = t if has(t) else ALIASES.get(t) if has(ALIASES.get(t, "")) else None
        (out if match else unmatched).append(match or t)
    if unmatched:
        raise ValueError(
            f"lora.targets names {unmatched} match no linear layer of this model "
            f"(BERT family: 'query,value'; LLaMA family: 'q_proj,v_proj'); layers end in: "
            f"{sorted({n.split('.')[-1] for n in names})}"
        )
    return out


@torch.no_grad()
def init_lora_a(params: dict[str, nn.Parameter], seed: int) -> None:
    """LoRA A drawn again through common.rng, so that any node or server draws the same bits whatever its CPU:
    peft's law, kaiming_uniform_(a=sqrt(5)), i.e. U(-1/sqrt(d_in), 1/sqrt(d_in)); B stays 0."""
    for name, p in params.items():
        if ".lora_A." in name:
            bound = 1.0 / math.sqrt(p.shape[1])
            p.copy_(rng.uniform(p.shape, rng.generator("lora-A", seed, name), -bound, bound))
