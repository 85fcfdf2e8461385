"""The FedKRSO model on a node (server or client), and the client's local copy of the global model.

Trained by FedKRSO: every target matrix (see `find_targets`), inside random subspaces, and the
classification head, densely (it is new, small: 2 x 384 + 2 numbers for MiniLM). Frozen: embeddings,
LayerNorms and all biases. Both sides build exactly this, so the names and shapes on the wire agree.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from common.config import RunConfig
from common.fedkrso.subspace import find_targets, target_shapes
from common.modeling import LoadedModel, TrainedHead, head_parameters, load_model
from common.tasks import get_task


@dataclass
class KrsoModel(TrainedHead):
    loaded: LoadedModel
    targets: dict[str, torch.nn.Linear]
    shapes: dict[str, tuple[int, int]]  # accumulator shape (d_out, r) per target
    head: dict[str, torch.nn.Parameter]


def build(cfg: RunConfig) -> KrsoModel:
    loaded = load_model(cfg.model, get_task(cfg.task).num_labels, cfg.seed)
    net = loaded.model
    for p in net.parameters():
        p.requires_grad_(False)
    head = head_parameters(net, loaded.head)
    for p in head.values():
        p.requires_grad_(True)
    targets = find_targets(net, cfg.krso.targets, exclude=loaded.head)
    return KrsoModel(loaded, targets, target_shapes(targets, cfg.krso.rank), head)


def fingerprint(cfg: RunConfig) -> str:
    """What a stored model depends on: a state saved under another setting must not be reused."""
    key = json.dumps([cfg.model, cfg.task, cfg.seed, cfg.krso.targets, cfg.krso.rank, cfg.krso.k])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


class NodeStore:
    """The client's copy of the global target weights at the round it last reached, on local disk.

    Written atomically (temporary file, fsync, rename): a crash mid-write leaves the previous state.
    """

    def __init__(self, directory: str, fingerprint: str) -> None:
        self.path = os.path.join(directory, "fedkrso-state.safetensors")
        self.fingerprint = fingerprint

    def load(self, km: KrsoModel) -> int:
        """Load the stored targets into `km`; returns the global round they are at (0 = pretrained)."""
        if not os.path.exists(self.path):
            return 0
        from safetensors import safe_open

        try:
            with safe_open(self.path, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return 0
            tensors = load_file(self.path)
            if set(tensors) != set(km.targets) or any(
                tensors[n].shape != m.weight.shape for n, m in km.targets.items()
            ):
                return 0
        except Exception:  # unreadable or truncated: start again from the pretrained weights
            return 0
        with torch.no_grad():
            for name, mod in km.targets.items():
                mod.weight.copy_(tensors[name])
        return int(meta["round"])

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def save(self, km: KrsoModel, server_round: int) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        save_file(
            {n: m.weight.detach().contiguous() for n, m in km.targets.items()},
            tmp,
            metadata={"round": str(server_round), "fingerprint": self.fingerprint},
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
