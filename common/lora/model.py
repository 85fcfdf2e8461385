"""FedAvg-LoRA's model: the base model wrapped by `peft` with LoRA on `lora.targets`, and what it trains.

Trained and sent both ways: every LoRA A (r x d_in) and B (d_out x r) matrix and the classification head
(peft's `modules_to_save`, a trainable copy); everything else is frozen. Wire keys are peft's parameter
names without the "base_model.model." prefix every one of them shares.
"""

from __future__ import annotations

import torch
from torch import nn

from common.config import RunConfig
from common.modeling import load_model
from common.tasks import get_task

PREFIX = "base_model.model."


def build(cfg: RunConfig) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """(peft model, its trainable parameters by wire name); identical on every node for a given seed."""
    from peft import LoraConfig, get_peft_model

    loaded = load_model(cfg.model, get_task(cfg.task).num_labels, cfg.seed)
    targets = [t.strip() for t in cfg.lora.targets.split(",") if t.strip()]
    names = [n for n, m in loaded.model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise ValueError(
            f"lora.targets names {unmatched} match no linear layer of this model "
            f"(BERT family: 'query,value'; LLaMA family: 'q_proj,v_proj'); layers end in: "
            f"{sorted({n.split('.')[-1] for n in names})}"
        )
    config = LoraConfig(
        r=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets,
        modules_to_save=list(loaded.head),
    )
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)  # LoRA A draws: the same on every node
        net = get_peft_model(loaded.model, config)
    params = {n.removeprefix(PREFIX): p for n, p in net.named_parameters() if p.requires_grad}
    return net, params
