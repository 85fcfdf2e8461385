"""Server-side evaluation of the global model on the task's dev split."""

from __future__ import annotations

import torch
from torch import nn

from common.tasks import TaskSpec, compute_metrics
from common.training import Encoded, batch


@torch.no_grad()
def evaluate(model: nn.Module, encoded: Encoded, task: TaskSpec, batch_size: int) -> dict[str, float]:
    """Mean loss and every metric of the task (accuracy; MCC for CoLA; F1 for MRPC)."""
    model.eval()
    n = len(encoded["labels"])
    preds: list[int] = []
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        out = model(**batch(encoded, range(start, min(n, start + batch_size))))
        size = min(n, start + batch_size) - start
        loss_sum += float(out.loss) * size
        preds.extend(out.logits.argmax(dim=-1).tolist())
    metrics = compute_metrics(task, preds, encoded["labels"].tolist())
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics
