"""A model's precision (train.precision) and activation checkpointing (train.gradient-checkpointing).

`train.precision = "bfloat16"`: the model is loaded with its weights stored in bfloat16 (half the bytes of
float32), every forward pass runs under torch.autocast in bfloat16 (CPU and CUDA alike), and each method casts
what it trains back to float32 before its first step (`train_in_float32`): LoRA's A and B (peft does it for
its adapters), FedTT's cores (made in float32), FedKRSO's target matrices (a round merges small updates into
them, which bfloat16's 8-bit mantissa would round away), the parameters the zero-order methods perturb (their
in-place perturbation must be undone exactly), a new classification head, and every parameter of FedAvg (which
thus saves compute, not storage). Losses are computed in float32 (transformers upcasts the logits).

Server and clients load the model through the same functions with the same run configuration, so every node
starts from the same weights: the bfloat16 rounding of the pretrained ones, and float32 where a method trains.

`train.gradient-checkpointing = true`: transformers' activation checkpointing (non-reentrant): a backward pass
recomputes each layer's activations instead of keeping them, less memory for about one more forward pass.
It acts in training mode only, so the zero-order methods (eval mode, no backward) are unaffected.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}  # common.configchecks.PRECISIONS: the same names


def dtype_of(precision: str) -> torch.dtype:
    if precision not in DTYPES:
        raise ValueError(f"train.precision '{precision}' is not one of {', '.join(DTYPES)}")
    return DTYPES[precision]


def compute_in(net: nn.Module, precision: str) -> None:
    """Every call of `net` (training, evaluation, generation) runs under autocast in `precision` on the device its
    parameters are on; float32 leaves `net` as it is."""
    if dtype_of(precision) == torch.float32:
        return
    forward = net.forward

    @functools.wraps(forward)
    def autocast_forward(*args, **kwargs):
        device = next(net.parameters()).device.type
        with torch.autocast(device_type=device, dtype=DTYPES[precision]):
            return forward(*args, **kwargs)

    net.forward = autocast_forward


def train_in_float32(params: Iterable[torch.Tensor]) -> None:
    """Cast the parameters a method trains (or perturbs) to float32, in place (the same Parameter objects, so
    tied weights and optimizers see the change); float32 ones are left as they are."""
    for p in params:
        if p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def enable_checkpointing(net: nn.Module, model: str) -> None:
    if not getattr(net, "supports_gradient_checkpointing", False):
        raise ValueError(
            f"train.gradient-checkpointing: model '{model}' ({type(net).__name__}) does not support activation "
            "checkpointing in transformers: set it to false"
        )
    if hasattr(net, "activation_checkpointing_enable"):  # transformers >= 5.2 (the older name is deprecated)
        net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
