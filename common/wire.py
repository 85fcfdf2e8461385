"""Checks shared by every method's wire format, and the byte count of a message's contents.

Replies come from other machines: every array is checked for its key, dtype, shape and finiteness
before it touches the global state, and nothing is ever unpickled (Flower's records carry raw numbers).

What is checked is what the bytes ARE, not what the Array's metadata says: an Array is (dtype, shape,
stype, data) where data is a .npy file (magic, header, raw numbers), and the metadata and the header are
both written by the sender. `decode_array` accepts only stype "numpy.ndarray", metadata equal to the
expected dtype and shape, a .npy header (read by numpy's own header parser, never `np.load`) stating
exactly that dtype (byte order included), C order and that shape, and exactly prod(shape) * itemsize
bytes after the header; only then are the numbers read (`np.frombuffer`, no allocation a header could
inflate), and float arrays must be finite and, where the method gives one, within a bound.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from numpy.lib import format as npy

# A .npy header is 128 bytes for the arrays we send (numpy pads it to a multiple of 64); 4 KiB allows any
# honest header and keeps the header parser's work bounded.
MAX_NPY_HEADER = 4096

# Bound on every number of a model-like array a client sends (FedKRSO accumulators, FedTT cores, FedAvg
# and FedAvg-LoRA weights, classification heads). The largest weight of the pretrained MiniLM is 7.9 and
# honest local training moves a weight by about train.lr per step; a value above 1e3 cannot come from
# a working client, and would saturate softmax / overflow float32 activations in the global model (the
# issue's 1e30 made the dev loss NaN). Such replies are rejected, not clipped: a client that sends them is
# broken or lying, and nothing it sent can be trusted.
VALUE_BOUND = 1e3


class WireError(ValueError):
    """A message whose contents do not match the method's wire format; it is rejected, nothing applied."""


def content_bytes(content: RecordDict) -> int:
    """All bytes of a message's contents (every record's serialized size), as counted in the records."""
    return sum(rec.count_bytes() for rec in content.values())


def decode_array(
    where: str, arr: Array, shape: tuple[int, ...], dtype: str = "float32", bound: float | None = None
) -> np.ndarray:
    """The numbers of `arr`, read from its bytes, if they are exactly `shape` of `dtype` (finite and within
    +-bound for floats); raises WireError otherwise (see the module docstring for what is checked)."""
    if not isinstance(arr, Array):
        raise WireError(f"{where}: expected an Array, got {type(arr).__name__}")
    shape = tuple([int(s) for s in shape])  # not tuple(generator): its resized tuple would fill a free list
    if arr.stype != "numpy.ndarray":
        raise WireError(f"{where}: storage type {str(arr.stype)[:40]!r}, expected 'numpy.ndarray'")
    if arr.dtype != dtype:
        raise WireError(f"{where}: dtype {str(arr.dtype)[:40]}, expected {dtype}")
    if not isinstance(arr.shape, (tuple, list)) or tuple(arr.shape) != shape:
        raise WireError(f"{where}: shape {str(arr.shape)[:60]}, expected {shape}")
    want = np.dtype(dtype)
    payload = math.prod(shape) * want.itemsize
    data = arr.data
    if not isinstance(data, bytes):
        raise WireError(f"{where}: data is a {type(data).__name__}, expected bytes")
    if len(data) > payload + MAX_NPY_HEADER:  # before parsing anything
        raise WireError(f"{where}: {len(data)} bytes for {payload} bytes of numbers")
    # The header numpy itself writes for this shape and dtype: nothing to parse. Another writer's header (numpy
    # version, padding, .npy 2.0) is parsed and checked field by field.
    expected = npy_header(shape, dtype)
    offset = len(expected) if data.startswith(expected) else parsed_header_end(where, data, shape, want)
    if len(data) - offset != payload:
        raise WireError(f"{where}: {len(data) - offset} bytes of numbers, {payload} expected for {shape} {dtype}")
    nd = np.frombuffer(data, dtype=want, count=math.prod(shape), offset=offset).reshape(shape)
    if want.kind == "f":
        if not np.isfinite(nd).all():
            raise WireError(f"{where}: contains NaN or Inf")
        if bound is not None and nd.size and float(np.abs(nd).max()) > bound:
            raise WireError(f"{where}: |value| {float(np.abs(nd).max()):.3g} above the bound {bound:g}")
    return np.array(nd, copy=True)  # writable, owned: frombuffer's view is read-only


@functools.lru_cache(maxsize=1024)
def npy_header(shape: tuple[int, ...], dtype: str) -> bytes:
    """The .npy header (version 1.0, magic included) that numpy's own writer, as Flower's Array uses it, puts
    before C-ordered numbers of `shape` and `dtype`: what an honest array's bytes start with. An array whose
    bytes start with exactly these is read without parsing its header (numpy's parser, ast.literal_eval,
    leaves reference cycles behind on every call, garbage that grew with the number of replies read)."""
    fp = io.BytesIO()
    descr = npy.dtype_to_descr(np.dtype(dtype))
    npy.write_array_header_1_0(fp, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return fp.getvalue()


def parsed_header_end(where: str, data: bytes, shape: tuple[int, ...], want: np.dtype) -> int:
    """Parse the .npy header of `data` (versions 1.0 and 2.0, at most MAX_NPY_HEADER bytes) and check that it
    says C-ordered `shape` of `want`; returns where the numbers start. Raises WireError otherwise."""
    fp = io.BytesIO(data)
    try:
        version = npy.read_magic(fp)
        read_header = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read_header is None:
            raise WireError(f"{where}: .npy version {version} not accepted")
        header_shape, fortran, header_dtype = read_header(fp, max_header_size=MAX_NPY_HEADER)
    except WireError:
        raise
    except Exception as exc:  # numpy raises ValueError, or others for a damaged header: all mean the same
        raise WireError(f"{where}: bytes are not a .npy array ({type(exc).__name__}: {str(exc)[:100]})") from exc
    if header_dtype != want:
        raise WireError(f"{where}: bytes hold {header_dtype.str}, metadata says {want.name}")
    if fortran or tuple(header_shape) != shape:
        raise WireError(f"{where}: bytes hold shape {tuple(header_shape)[:8]} (fortran={fortran}), expected {shape}")
    return fp.tell()


def checked_tensor(
    where: str, arr: Array, shape: tuple[int, ...], dtype: str = "float32", bound: float | None = None
) -> torch.Tensor:
    """The array as a tensor, if its bytes hold this dtype and shape, only finite values (within +-bound)."""
    return torch.from_numpy(decode_array(where, arr, shape, dtype, bound))


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


def unpack_tensors(
    where: str, rec: ArrayRecord, shapes: Mapping[str, tuple[int, ...]], bound: float | None = None
) -> dict[str, torch.Tensor]:
    """Exactly the keys of `shapes`, each checked (float32, finite, within +-bound)."""
    if not isinstance(rec, ArrayRecord):
        raise WireError(f"{where}: expected an ArrayRecord, got {type(rec).__name__}")
    if set(rec.keys()) != set(shapes):
        missing, extra = sorted(set(shapes) - set(rec.keys())), sorted(set(rec.keys()) - set(shapes))
        raise WireError(f"{where}: keys differ from the expected ones (missing {missing[:3]}, unexpected {extra[:3]})")
    return {k: checked_tensor(f"{where}[{k}]", rec[k], shapes[k], bound=bound) for k in shapes}


def sync_only_round(content: RecordDict) -> int | None:
    """The round a "sync-only" reply says its node holds (see common.nodestore), or None for a normal reply."""
    metrics = content.get("metrics")
    if not isinstance(metrics, MetricRecord) or not metrics.get("sync-only", 0):
        return None
    held = metrics.get("model-round")
    if not isinstance(held, int) or held < 0:
        raise WireError(f"sync-only reply with model-round {held!r}: expected an int >= 0")
    return held


# The metrics a training reply may carry, each a finite number within these bounds (anything else in the
# record is ignored: a newer client may add keys). They only feed the records and the round's mean train
# loss, but a 3e38 train-loss would make that mean inf, and the records are read by people and scripts.
# train-loss: cross-entropy of a classifier, >= 0; 1e4 nats is far past any model that still learns.
# Times, memory and counts: non-negative and below what a week-long round could produce.
METRIC_BOUNDS: dict[str, tuple[float, float]] = {
    "train-loss": (0.0, 1e4),
    "train-seconds": (0.0, 1e7),
    "load-seconds": (0.0, 1e7),
    "catchup-seconds": (0.0, 1e7),
    "perturb-seconds": (0.0, 1e7),
    "peak-rss-mb": (0.0, 1e8),
    "local-steps": (0.0, 1e9),
    "forward-passes": (0.0, 1e12),
    "full-passes": (0.0, 1e12),
    "block1-passes": (0.0, 1e12),
    "block2-passes": (0.0, 1e12),
}


def checked_metrics(content: RecordDict, server_round: int) -> tuple[int, dict[str, float]]:
    """(num-examples, known metrics) of a training reply that trained from global round server_round - 1.

    The round check rejects a stale reply (trained from an older global model) and a future one alike.
    num-examples is only checked to be a positive int here; what it may weigh is capped at aggregation
    (common.robust.capped_weights)."""
    metrics = require(content, "metrics", MetricRecord)
    n = metrics.get("num-examples")
    if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
        raise WireError(f"num-examples must be a positive int, got {str(n)[:40]}")
    held = metrics.get("model-round")
    if not isinstance(held, int) or isinstance(held, bool) or held != server_round - 1:
        raise WireError(f"client trained from round {str(held)[:40]}, expected {server_round - 1}")
    values: dict[str, float] = {}
    for key, (low, high) in METRIC_BOUNDS.items():
        if key not in metrics:
            continue
        v = metrics[key]
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            raise WireError(f"metric {key} is a {type(v).__name__}, expected a number")
        if not (math.isfinite(v) and low <= v <= high):
            raise WireError(f"metric {key} = {v!r} outside [{low:g}, {high:g}] or not finite")
        values[key] = float(v)
    return n, values


def check_size(content: RecordDict, limit: int) -> int:
    """The reply's content bytes (as counted in the records), if at most `limit`; raises WireError otherwise.

    Called before anything in the reply is decoded: the limit is the method's expected payload plus
    REPLY_SLACK, so a reply cannot make the server decode (or hold copies of) more than that."""
    size = content_bytes(content)
    if size > limit:
        raise WireError(f"reply of {size} bytes exceeds the limit of {limit} bytes for this method and round")
    return size


# Allowance above the expected numbers of a reply: .npy headers (128 B per array), keys, metrics.
REPLY_SLACK = 64 * 1024


def reply_limit(payload_bytes: int, arrays: int) -> int:
    """The size limit of a reply carrying `payload_bytes` bytes of numbers in `arrays` arrays."""
    return int(payload_bytes) + 256 * int(arrays) + REPLY_SLACK


# Zero-order scalars: g = [L(θ + εz) − L(θ − εz)] / 2ε is a difference of two losses. A model whose loss
# moves by more than ZO_LOSS_SPREAD nats between θ ± εz has diverged (chance level is ln 2 = 0.69 on SST-2),
# so |g| <= ZO_LOSS_SPREAD / 2ε for one estimate, and a sum of m estimates (FedKSeed's per-seed G) at most m
# times that. Replies beyond it are rejected: no honest client computes them, and the update θ −= η g z
# they would cause has no bound of its own (g multiplies every coordinate of z).
ZO_LOSS_SPREAD = 100.0


def zo_scalar_bound(eps: float, estimates: int = 1) -> float:
    """The largest |scalar| an honest zero-order client can send: `estimates` two-sided estimates at ε."""
    return estimates * ZO_LOSS_SPREAD / (2.0 * eps)


def log_first(log, server_round: int) -> int:
    """The first round of the update-log entries sent with round `server_round` (which must be consecutive)."""
    first = log[0].round if log else server_round
    if [e.round for e in log] != list(range(first, first + len(log))):
        raise ValueError("update log entries must be consecutive rounds")
    return first


# ---------------------------------------------------------------------------------------------------------
# Instructions (server -> client): what every client refuses, checked here for all seven methods.
#
# An instruction is refused (WireError) before the node's stored state is read or written, so a refused
# instruction leaves that state byte for byte as it was; client_app.app turns the refusal into an error reply
# (code INSTRUCTION_REFUSED) that the server counts as a failure of that node, and the ClientApp goes on.
# - Rounds: server-round an int >= 1; log-first an int in 1..server-round (the log's rounds follow).
# - Values: finite, and within INSTRUCTION_SLACK x the bound the server enforces on the replies it
#   aggregates (VALUE_BOUND for model-like numbers, zo_scalar_bound for zero-order scalars). Whatever rule the
#   server aggregates with (mean, trimmed mean, median, clipping) the result lies within the replies' bound,
#   up to float rounding; the slack keeps rounding from ever refusing an honest server, and 1e30 is refused.
# - Learning rates (zero-order η, sent with the round and with each log entry): finite, in (0, ZO_LR_MAX],
#   and equal to the node's own zo.lr. η is constant for a run (replay needs it; common.config) and zo.lr
#   cannot change on resume (common.config.check_resume), so any other η is not the server's.
# - Seeds (FedKRSO's K seeds of a round, FedSPZO's round seed ρ_t): equal to what the node derives itself
#   from the run seed and the round (methods.fedkrso.subspace.round_seeds, methods.fedspzo.spzo.round_seed). A
#   replaced seed would make the node apply an update in another subspace than the server did, and drift.
# - After a node applies the log entries it lacks, its model must be finite (common.nodestore.reach_round),
#   else nothing is saved and the instruction is refused.
# - A snapshot sent instead of the log (common.catchup): round T-1, exactly the kept tensors, model-like values.
# ---------------------------------------------------------------------------------------------------------

INSTRUCTION_SLACK = 2.0

# Error code of the reply to a refused instruction (client_app.app). Flower's own codes
# (flwr.common.constant.ErrorCode) are 0..8; this one is ours, so the server tells a refusal from a crash.
INSTRUCTION_REFUSED = 100

# η above 1 moves every perturbed number by about |g| per step (Rademacher z is +-1): a pretrained weight is
# O(0.1), so no such run trains. Honest zero-order η: 1e-7..1e-3 in the papers, 1e-4 by default here.
ZO_LR_MAX = 1.0


def instruction_bound(reply_bound: float) -> float:
    """The largest |value| a client accepts where the server accepts replies within +-reply_bound."""
    return INSTRUCTION_SLACK * reply_bound


def config_int(cfg: ConfigRecord, key: str, low: int = 0) -> int:
    """cfg[key], which must be an int (not a bool, not a float) >= low."""
    if key not in cfg:
        raise WireError(f"config record lacks '{key}'")
    v = cfg[key]
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise WireError(f"config {key} = {str(v)[:40]!r}: expected an int >= {low}")
    return v


def config_ints(cfg: ConfigRecord, key: str) -> list[int]:
    """cfg[key], which must be a list of ints (no bools)."""
    v = cfg.get(key)
    if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        raise WireError(f"config {key} = {str(v)[:60]}: expected a list of ints")
    return v


def checked_round_config(content: RecordDict, with_log: bool) -> tuple[ConfigRecord, int, int]:
    """The "config" record of an instruction: (record, server-round T >= 1, log-first in 1..T (T if no log))."""
    cfg = require(content, "config", ConfigRecord)
    server_round = config_int(cfg, "server-round", 1)
    first = config_int(cfg, "log-first", 1) if with_log else server_round
    if first > server_round:
        raise WireError(f"log-first {first} after server-round {server_round}")
    return cfg, server_round, first


def check_lr(where: str, lr: object, own: float) -> float:
    """A zero-order η from the server: finite, in (0, ZO_LR_MAX] and the node's own zo.lr (see above)."""
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        raise WireError(f"{where}: lr is a {type(lr).__name__}, expected a float")
    lr = float(lr)
    if not (math.isfinite(lr) and 0 < lr <= ZO_LR_MAX):
        raise WireError(f"{where}: lr {lr!r} outside (0, {ZO_LR_MAX:g}]")
    if lr != own:
        raise WireError(f"{where}: lr {lr!r} differs from this node's zo.lr {own!r} (it is constant for a run)")
    return lr


def check_seeds(where: str, sent: Sequence[int], derived: Sequence[int]) -> None:
    """Seeds from the server must be those the node derives itself from the run seed and the round."""
    if [int(s) for s in sent] != [int(s) for s in derived]:
        raise WireError(f"{where}: seeds differ from those this node derives from the run seed (replaced seeds)")


def checked_log_lr(arrays: ArrayRecord, t: int, own_lr: float) -> float:
    """η_t of log round t ("t/lr", float64 (1,)), checked like the round's η."""
    return check_lr(f"log[{t}/lr]", float(decode_array(f"log[{t}/lr]", arrays[f"{t}/lr"], (1,), "float64")[0]), own_lr)


def checked_log_config(content: RecordDict, own_lr: float) -> tuple[ConfigRecord, int, float, int]:
    """The "config" record of a zero-order instruction: (record, server-round, lr, log-first), checked."""
    cfg, server_round, first = checked_round_config(content, with_log=True)
    lr = check_lr("config", cfg.get("lr"), own_lr)
    return cfg, server_round, lr, first
