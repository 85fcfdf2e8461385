"""Checks shared by every method's wire format, and the byte count of a message's contents.

Replies come from other machines: every array is checked for its key, dtype, shape and finiteness
before it touches the global state, and nothing is ever unpickled (Flower's records carry raw numbers).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict


class WireError(ValueError):
    """A message whose contents do not match the method's wire format; it is rejected, nothing applied."""


def content_bytes(content: RecordDict) -> int:
    """All bytes of a message's contents (every record's serialized size), as counted in the records."""
    return sum(rec.count_bytes() for rec in content.values())


def checked_tensor(where: str, arr: Array, shape: tuple[int, ...], dtype: str = "float32") -> torch.Tensor:
    """The array as a tensor, if it has this dtype and shape and only finite values."""
    if not isinstance(arr, Array):
        raise WireError(f"{where}: expected an Array, got {type(arr).__name__}")
    if arr.dtype != dtype:
        raise WireError(f"{where}: dtype {arr.dtype}, expected {dtype}")
    if tuple(arr.shape) != tuple(shape):
        raise WireError(f"{where}: shape {tuple(arr.shape)}, expected {tuple(shape)}")
    nd = arr.numpy()
    if nd.dtype.kind == "f" and not np.isfinite(nd).all():
        raise WireError(f"{where}: contains NaN or Inf")
    return torch.from_numpy(np.array(nd, copy=True))


def require(content: RecordDict, key: str, kind: type):
    """content[key], which must be a record of type `kind`."""
    if key not in content:
        raise WireError(f"message lacks the '{key}' record (has: {sorted(content.keys())})")
    rec = content[key]
    if not isinstance(rec, kind):
        raise WireError(f"record '{key}' is a {type(rec).__name__}, expected {kind.__name__}")
    return rec


def pack_tensors(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({k: Array(v.detach().to("cpu", torch.float32).contiguous().numpy()) for k, v in tensors.items()})


def unpack_tensors(where: str, rec: ArrayRecord, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Exactly the keys of `shapes`, each checked."""
    if set(rec.keys()) != set(shapes):
        missing, extra = sorted(set(shapes) - set(rec.keys())), sorted(set(rec.keys()) - set(shapes))
        raise WireError(f"{where}: keys differ from the expected ones (missing {missing[:3]}, unexpected {extra[:3]})")
    return {k: checked_tensor(f"{where}[{k}]", rec[k], shapes[k]) for k in shapes}


def sync_only_round(content: RecordDict) -> int | None:
    """The round a "sync-only" reply says its node holds (see common.nodestore), or None for a normal reply."""
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord) or not metrics.get("sync-only", 0):
        return None
    held = metrics.get("model-round")
    if not isinstance(held, int) or held < 0:
        raise WireError(f"sync-only reply with model-round {held!r}: expected an int >= 0")
    return held


def checked_metrics(content: RecordDict, server_round: int) -> tuple[int, dict[str, float]]:
    """(num-examples, numeric metrics) of a training reply that trained from global round server_round - 1."""
    metrics = require(content, "metrics", MetricRecord)
    n = metrics.get("num-examples")
    if not isinstance(n, int) or n <= 0:
        raise WireError(f"num-examples must be a positive int, got {n!r}")
    if metrics.get("model-round") != server_round - 1:
        raise WireError(f"client trained from round {metrics.get('model-round')!r}, expected {server_round - 1}")
    values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    if not all(np.isfinite(v) for v in values.values()):
        raise WireError("metrics contain NaN or Inf")
    return n, values


def log_first(log, server_round: int) -> int:
    """The first round of the update-log entries sent with round `server_round` (which must be consecutive)."""
    first = log[0].round if log else server_round
    if [e.round for e in log] != list(range(first, first + len(log))):
        raise ValueError("update log entries must be consecutive rounds")
    return first


def checked_log_config(content: RecordDict) -> tuple[ConfigRecord, int, float, int]:
    """The "config" record of a zero-order instruction: (record, server-round, lr, log-first), checked."""
    cfg = require(content, "config", ConfigRecord)
    try:
        server_round, lr, first = int(cfg["server-round"]), float(cfg["lr"]), int(cfg["log-first"])
    except (KeyError, TypeError, ValueError) as exc:
        raise WireError(f"config record: {exc!r}") from exc
    if not 1 <= first <= server_round:
        raise WireError(f"log-first {first} outside 1..{server_round}")
    if not (np.isfinite(lr) and lr > 0):
        raise WireError(f"lr {lr} must be finite and > 0")
    return cfg, server_round, lr, first
