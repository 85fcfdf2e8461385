"""FedAvg's model: the whole run model, every parameter trained and sent (full fine-tuning)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from common.config import RunConfig
from common.precision import train_in_float32
from common.runmodel import load_run_model

# how a method that trains named parameters builds its model: (the model, its trained parameters by wire name)
Build = Callable[[RunConfig], tuple[nn.Module, dict[str, nn.Parameter]]]


def build(cfg: RunConfig) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """(the model, its trained parameters by wire name): all of them."""
    net = load_run_model(cfg).model
    train_in_float32(net.parameters())  # train.precision = bfloat16: autocast compute, float32 weights
    return net, dict(net.named_parameters())
