"""The modeling file of an exported model that plain transformers cannot rebuild alone (transformers'
`trust_remote_code` convention): copied by common/export.py into the export as `modeling_fedsubspace.py`,
with `BASE` set to the architecture of the run's model, and named by config.json's `auto_map`.

Self-contained on purpose: it imports torch and transformers only (never this project), so the folder loads
anywhere transformers does:

    AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)   # or ...ForCausalLM

What it adds to the base architecture, as config.json's "fedsubspace" entry says:
  "pooling": "mean"    the encoder's pooler replaced by the mean of the last hidden states over the real tokens
                       (common.heads.MeanPooler; the run's head.pooling = mean)
  "adapters": {"sites": [module names], "scale": s, "bottleneck": b}
                       after each site module, y <- y + s * gelu(y W_down) W_up (FedTT's adapters,
                       methods/fedtt/tt.py, with each tensor train contracted to its dense W_down (d x b) and
                       W_up (b x d)); the weights are "fedsubspace_adapters.<i>.down" / ".up" of
                       model.safetensors, adapter i after site i
"""

from __future__ import annotations

import torch
import transformers
from torch import nn
from torch.nn import functional as F

BASE = "BertForSequenceClassification"  # set by the export to the run model's class (config.architectures)
Base = getattr(transformers, BASE)


class MeanPooler(nn.Module):
    """The mean of the last hidden states over the unpadded tokens; the mask comes from the encoder's call."""

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def remember_mask(self, module, args, kwargs) -> None:
        self.mask = kwargs.get("attention_mask")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.dim() != 2 or self.mask.shape[:2] != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        m = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


class BottleneckAdapter(nn.Module):
    """y + scale * gelu(y W_down) W_up."""

    def __init__(self, d: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.down = nn.Parameter(torch.zeros(d, bottleneck))
        self.up = nn.Parameter(torch.zeros(bottleneck, d))

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y + self.scale * (F.gelu(y @ self.down.to(y.dtype)) @ self.up.to(y.dtype))


class FedSubspaceModel(Base):
    """The base architecture with the run's pooling and adapters (config.fedsubspace)."""

    def __init__(self, config, *args, **kwargs) -> None:
        super().__init__(config, *args, **kwargs)
        extra = getattr(config, "fedsubspace", None) or {}
        if extra.get("pooling") == "mean":
            base = self.base_model
            base.pooler = MeanPooler()
            base.register_forward_pre_hook(base.pooler.remember_mask, with_kwargs=True)
        spec = extra.get("adapters")
        if spec:
            modules = dict(self.named_modules())
            sites = list(spec["sites"])
            self.fedsubspace_adapters = nn.ModuleList(
                [
                    BottleneckAdapter(modules[s].out_features, int(spec["bottleneck"]), float(spec["scale"]))
                    for s in sites
                ]
            )
            for site, adapter in zip(sites, self.fedsubspace_adapters, strict=True):
                modules[site].register_forward_hook(lambda mod, inp, out, a=adapter: a(out))
