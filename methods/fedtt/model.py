"""The TT-adapted model on a node (server or client): the base model, frozen; the adapters; the head.

Trained by FedTT / FedTT+: the TT cores of the adapters (all of them in FedTT; the round's selection in
FedTT+) and the classification head, which is new and therefore trained and sent densely (2 x 384 + 2
numbers for MiniLM). Frozen and never sent: every pretrained weight, embeddings, LayerNorms and biases
included (MiniLM's LayerNorms alone hold 9,984 numbers, as many as all its cores at rank 4: training them
would double the message for little gain). Both sides build exactly this, so names and shapes agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import RunConfig
from common.modeling import LoadedModel, model_tensors
from common.runmodel import TrainedHead, load_with_trainable_head
from methods.fedtt.tt import CoreKey, TTAdapters, find_sites


@dataclass
class TTModel(TrainedHead):
    loaded: LoadedModel
    adapters: TTAdapters
    head: dict[str, torch.nn.Parameter]

    def trainable_counts(self) -> dict[str, int]:
        """Numbers trained (and sent) per round by FedTT: cores and head."""
        cores = self.adapters.num_parameters()
        head = sum(p.numel() for p in self.head.values())
        return {"cores": cores, "head": head, "total": cores + head}


def core_name(key: CoreKey) -> str:
    """A core's name among the global model's tensors: "tt.<adapter>.<down|up>.<core>"."""
    i, m, j = key
    return f"tt.{i}.{m}.{j}"


def global_tensors(setup) -> dict[str, torch.Tensor]:
    """FedTT's global model (MethodSpec.global_model): the base model's state (the head among it) and every TT
    core, which hangs on a forward hook and so is in neither `model.state_dict()` nor `model.parameters()`."""
    adapters = setup.strategy.tm.adapters  # methods.fedtt.server.FedTT: the global cores the server evaluates
    tensors = model_tensors(setup)
    cores = {core_name(k): adapters.core(k) for k in adapters.core_keys()}
    if clash := set(tensors) & set(cores):
        raise ValueError(f"the base model has tensors named like TT cores: {sorted(clash)[:3]}")
    return {**tensors, **cores}


def build(cfg: RunConfig) -> TTModel:
    loaded, head = load_with_trainable_head(cfg)
    net = loaded.model
    t = cfg.tt
    adapters = TTAdapters(
        net, find_sites(net, exclude=loaded.untargeted), t.bottleneck, t.rank, t.scale, cfg.seed, t.max_mode
    )
    return TTModel(loaded, adapters, head)
