"""FedAvg full fine-tuning client: receive all weights, train all of them with Adam, send all back.

Wire format (Flower FedAvg's): server -> client "arrays" (ArrayRecord: every parameter, float32) and
"config" (server-round); client -> server "arrays" (same keys and shapes) and "metrics" (num-examples,
model-round, train-loss, train-seconds, peak-rss-mb, local-steps). The client refuses (common.wire,
"Instructions") a server-round that is not an int >= 1 and weights that are not finite or exceed 2 x
VALUE_BOUND; it keeps no state, so a refusal changes nothing on the node. FedAvg-LoRA (methods.fedavg_lora) uses the same
exchange on the LoRA parameters and the head only: `train_params` serves both.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from common.config import RunConfig
from common.memory import PeakRSS
from common.modeling import load_run_model
from common.training import client_data, dropout_seed, make_optimizer, step_batches, train_steps
from common.wire import VALUE_BOUND, checked_round_config, instruction_bound, pack_tensors, require, unpack_tensors


def train_params(
    content: RecordDict,
    cfg: RunConfig,
    node_config: dict[str, Any],
    build: Callable[[RunConfig], tuple[nn.Module, dict[str, nn.Parameter]]],
) -> RecordDict:
    """Load the global values of the parameters `build` names, train those, send them back."""
    with PeakRSS() as mem:
        net, params = build(cfg)
        _, server_round, _ = checked_round_config(content, with_log=False)
        shapes = {n: tuple(p.shape) for n, p in params.items()}
        weights = unpack_tensors(
            "arrays", require(content, "arrays", ArrayRecord), shapes, instruction_bound(VALUE_BOUND)
        )
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(weights.pop(name))
        del weights
        encoded, data_key = client_data(cfg, node_config)
        n = len(encoded["labels"])
        batches = step_batches(cfg, n, server_round, data_key)
        start = time.perf_counter()
        optimizer = make_optimizer(params.values(), cfg.train)
        losses = train_steps(net, encoded, batches, [optimizer], dropout_seed(cfg, server_round, data_key))
        seconds = time.perf_counter() - start
        reply = RecordDict(
            {
                "arrays": pack_tensors(params),
                "metrics": MetricRecord(
                    {
                        "num-examples": n,
                        "model-round": server_round - 1,
                        "train-loss": sum(losses) / len(losses),
                        "train-seconds": seconds,
                        "local-steps": len(losses),
                    }
                ),
            }
        )
    reply["metrics"]["peak-rss-mb"] = mem.peak_mb
    return reply


def _full_model(cfg: RunConfig) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    net = load_run_model(cfg).model
    return net, dict(net.named_parameters())


def train(
    content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int = 0, node_id: int = 0
) -> RecordDict:
    return train_params(content, cfg, node_config, _full_model)
