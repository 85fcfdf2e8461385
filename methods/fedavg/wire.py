"""FedAvg's wire format (Flower FedAvg's), which FedAvg-LoRA shares on its LoRA matrices and head.

Server -> client: "arrays" (ArrayRecord: every trained parameter, float32, by name) and "config"
(server-round). The client refuses (common.wire, "Instructions") a server-round that is not an int >= 1 and
weights that are not finite or exceed 2 x VALUE_BOUND; it keeps no state, so a refusal changes nothing on the
node.

Client -> server: "arrays" (the same keys and shapes, trained) and "metrics" (num-examples, model-round,
train-loss, train-seconds, peak-rss-mb, local-steps). The server checks the size first (at most the global
arrays' bytes, common.wire.reply_limit), then each array against the global arrays' keys and shapes (float32,
finite, within VALUE_BOUND), then the metrics (round, num-examples).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.wire import (
    VALUE_BOUND,
    checked_metrics,
    checked_round_config,
    instruction_bound,
    pack_tensors,
    reply_limit,
    require,
    unpack_tensors,
)

if TYPE_CHECKING:
    from common.config import RunConfig

Shapes = dict[str, tuple[int, ...]]


def value_bound(cfg: RunConfig, record: str) -> float:
    """The largest |value| the server accepts in this record of a reply (MethodSpec.value_bound)."""
    return {"arrays": VALUE_BOUND}[record]


def reference_values(setup, instruction: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """What a reply's "arrays" replace (MethodSpec.reference_values): the global weights the instruction sent."""
    return {"arrays": {k: a.numpy() for k, a in require(instruction, "arrays", ArrayRecord).items()}}


def pack_instruction(server_round: int, params: dict[str, torch.Tensor]) -> RecordDict:
    """The instruction of round `server_round`: the global values of `params` and the round."""
    return RecordDict({"arrays": pack_tensors(params), "config": ConfigRecord({"server-round": int(server_round)})})


def unpack_instruction(content: RecordDict, shapes: Shapes) -> tuple[int, dict[str, torch.Tensor]]:
    """(server round, the global values of the parameters of `shapes`), checked."""
    _, server_round, _ = checked_round_config(content, with_log=False)
    weights = unpack_tensors("arrays", require(content, "arrays", ArrayRecord), shapes, instruction_bound(VALUE_BOUND))
    return server_round, weights


def pack_reply(params: dict[str, torch.Tensor], metrics: dict[str, float]) -> RecordDict:
    return RecordDict({"arrays": pack_tensors(params), "metrics": MetricRecord(metrics)})


def unpack_reply(
    content: RecordDict, server_round: int, shapes: Shapes
) -> tuple[int, dict[str, float], dict[str, np.ndarray]]:
    """(num-examples, metrics, the trained arrays) of a reply, checked; raises WireError if malformed."""
    n, metrics = checked_metrics(content, server_round)
    return n, metrics, unpack_update(content, shapes)


def unpack_update(content: RecordDict, shapes: Shapes) -> dict[str, np.ndarray]:
    """A reply's trained arrays, checked (its metrics are checked_metrics'); raises WireError if malformed."""
    arrays = unpack_tensors("arrays", require(content, "arrays", ArrayRecord), shapes, VALUE_BOUND)
    return {k: v.numpy() for k, v in arrays.items()}


def max_reply_bytes(shapes: Shapes) -> int:
    """The size limit of one reply: every array of `shapes` in float32."""
    return reply_limit(4 * sum(math.prod(s) for s in shapes.values()), len(shapes))
