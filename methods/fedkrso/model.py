"""The FedKRSO model on a node (server or client), and the client's local copy of the global model.

Trained by FedKRSO: every target matrix (see `find_targets`), inside random subspaces, and the
classification head, densely (it is new, small: 2 x 384 + 2 numbers for MiniLM). Frozen: embeddings,
LayerNorms and all biases. Both sides build exactly this, so the names and shapes on the wire agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch

from common.config import RunConfig
from common.modeling import LoadedModel
from common.precision import train_in_float32
from common.runmodel import TrainedHead, load_with_trainable_head
from methods.fedkrso.subspace import find_targets, target_shapes


@dataclass
class KrsoModel(TrainedHead):
    loaded: LoadedModel
    targets: dict[str, torch.nn.Linear]
    shapes: dict[str, tuple[int, int]]  # accumulator shape (d_out, r) per target
    head: dict[str, torch.nn.Parameter]

    def target_weights(self) -> dict[str, torch.Tensor]:
        """The weights FedKRSO changes (what a node keeps on disk between rounds)."""
        return {n: m.weight for n, m in self.targets.items()}


def build(cfg: RunConfig) -> KrsoModel:
    loaded, head = load_with_trainable_head(cfg)
    net = loaded.model
    targets = find_targets(net, cfg.krso.targets, exclude=loaded.untargeted)
    train_in_float32(m.weight for m in targets.values())  # merged into every interval: float32 (common/precision.py)
    return KrsoModel(loaded, targets, target_shapes(targets, cfg.krso.rank), head)


def fingerprint(cfg: RunConfig) -> str:
    """What a stored model depends on: a state saved under another setting must not be reused."""
    key = json.dumps(
        [cfg.model, cfg.task, cfg.seed, cfg.krso.targets, cfg.krso.rank, cfg.krso.k, cfg.head.pooling, cfg.head.init]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]
