"""FedTT's and FedTT+'s export: the base model, its head and the TT adapters, which are non-linear
(y <- y + s * gelu(y W_down) W_up after each site) and cannot be merged into the base weights.

The folder carries its own modeling file (common/export_modeling.py, transformers' trust_remote_code
convention) that adds the adapters after the same sites with forward hooks, as methods.fedtt.tt.TTAdapters
does; each adapter's tensor trains are stored contracted (tt_to_matrix): W_down (d x b) and W_up (b x d), as
"fedsubspace_adapters.<i>.down" / ".up", adapter i after site i of config.json's fedsubspace.adapters.sites.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from common.export import site_names, tokenizer_of, unwrap, write_pretrained
from common.export_modeling import BottleneckAdapter


def export(setup, cfg, folder: str) -> dict[str, Any]:
    adapters = setup.strategy.tm.adapters  # methods.fedtt.server.FedTT: the global cores the server evaluates
    net = unwrap(setup.model)
    sites = site_names(setup.model, net, adapters.sites)
    scales = {a.scale for a in adapters.adapters}
    if len(scales) != 1:
        raise ValueError(f"the adapters have different scales {sorted(scales)}")
    dense = nn.ModuleList()
    with torch.no_grad():
        for a in adapters.adapters:
            d = BottleneckAdapter(a.down.rows, a.down.cols, a.scale)
            d.down.copy_(a.down.matrix())  # the tensor train contracted: W_down, d x b
            d.up.copy_(a.up.matrix())  # W_up, b x d
            dense.append(d)
    spec = {"sites": sites, "scale": scales.pop(), "bottleneck": cfg.tt.bottleneck}
    write_pretrained(net, tokenizer_of(cfg), folder, {"adapters": spec}, {"fedsubspace_adapters": dense})
    return {"kind": f"base weights + {len(sites)} TT adapters (dense W_down, W_up)"}
