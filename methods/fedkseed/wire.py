"""FedKSeed wire format: at most K scalars each way. Numbers only, checked on arrival; nothing is unpickled.

The K candidate seeds derive from the run seed and never travel. Per-seed scalars travel as a "scalar
vector": either dense, "<p>scalars" float32 (K,), or sparse, "<p>index" int32 (m,) strictly increasing
in [0, K) + "<p>scalars" float32 (m,), whichever is smaller (sparse when 2m < K). A client that ran S steps
with P perturbations used at most S·P seeds, so its reply is sparse unless S·P is close to K.

Server -> client, message type "train":
  "config"  ConfigRecord  server-round: int T; lr: float η_T; log-first: int (first round carried in "log";
                          log-first..T-1 are all carried, log-first = T when nothing is)
  "log"     ArrayRecord   for each carried round t: "t/lr" float64 (1,) and the scalar vector Ḡ_t with
                          prefix "t/" (the aggregated per-seed scalars of round t)
  "snapshot"              a node far behind gets its perturbed parameters' values of round T-1 instead of
                          the log (config snapshot-round = T-1, log-first = T): common.catchup
Client -> server:
  "scalars" ArrayRecord   the scalar vector G (prefix ""): the sum of the client's g per candidate seed
  "metrics" MetricRecord  num-examples (int > 0), model-round (int, must be T-1), train-loss, train-seconds,
                          peak-rss-mb, local-steps, forward-passes (every model call), full-passes,
                          block1-passes, block2-passes (common.zeroorder.ModelCalls), perturb-seconds
A client that cannot reach round T-1 sends the sync-only reply of common.nodestore.
Instruction checks (client, common.wire "Instructions"): server-round >= 1, log-first in 1..T; η_T and every
logged η_t equal the node's zo.lr and lie in (0, ZO_LR_MAX]; logged Ḡ finite, within 2 x
zo_scalar_bound(zo.eps, S·P). The candidate seeds never travel. A refused instruction leaves the node's
state untouched.
Reply checks (server): index and scalars decoded from their bytes (int32 / float32 of the stated length,
common.wire), indices strictly increasing in [0, K), scalars finite and |G[j]| <=
common.wire.zo_scalar_bound(zo.eps, S·P) (G[j] sums at most S·P estimates); common.wire.checked_metrics.
Sizes at K = 4096: down at most 16 KB + 4 B per carried round; up 8 B per seed used (20 steps: 160 B).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import RunConfig
from common.wire import (
    WireError,
    checked_log_config,
    checked_log_lr,
    checked_metrics,
    checked_tensor,
    instruction_bound,
    log_first,
    require,
    zo_scalar_bound,
)
from methods.fedkseed.kseed import LogEntry


def value_bound(cfg: RunConfig, record: str) -> float:
    """The largest |value| the server accepts in this record of a reply (MethodSpec.value_bound)."""
    return {"scalars": zo_scalar_bound(cfg.zo.eps, cfg.train.local_steps * cfg.kseed.perturbations)}[record]


def pack_scalars(prefix: str, dense: np.ndarray) -> dict[str, Array]:
    nonzero = np.flatnonzero(dense)
    if 2 * len(nonzero) < len(dense):
        return {
            f"{prefix}index": Array(nonzero.astype(np.int32)),
            f"{prefix}scalars": Array(np.ascontiguousarray(dense[nonzero], dtype=np.float32)),
        }
    return {f"{prefix}scalars": Array(np.ascontiguousarray(dense, dtype=np.float32))}


def unpack_scalars(
    where: str, arrays: ArrayRecord, prefix: str, k: int, bound: float | None = None
) -> tuple[np.ndarray, int]:
    """The dense (K,) float32 vector (values within +-bound), and the number of arrays it took (1 dense, 2 sparse)."""
    values = arrays.get(f"{prefix}scalars")
    if values is None:
        raise WireError(f"{where}: lacks '{prefix}scalars'")
    if f"{prefix}index" not in arrays:
        return checked_tensor(f"{where}[{prefix}scalars]", values, (k,), bound=bound).numpy(), 1
    m = tuple(getattr(arrays[f"{prefix}index"], "shape", ()))
    if len(m) != 1 or not 0 <= m[0] <= k:
        raise WireError(f"{where}: index shape {str(m)[:60]}, expected (m,) with m <= {k}")
    index = checked_tensor(f"{where}[{prefix}index]", arrays[f"{prefix}index"], m, "int32").numpy()
    vals = checked_tensor(f"{where}[{prefix}scalars]", values, m, bound=bound).numpy()
    if len(index) and (index[0] < 0 or index[-1] >= k or np.any(np.diff(index) <= 0)):
        raise WireError(f"{where}: index must be strictly increasing seed indices in [0, {k})")
    dense = np.zeros(k, dtype=np.float32)
    dense[index] = vals
    return dense, 2


def reply_arrays(cfg: RunConfig, record: ArrayRecord) -> dict[str, np.ndarray]:
    """A reply's scalars record as the server aggregates it: the dense (K,) vector, sent sparse or dense; a record
    of just the dense "scalars" is a valid reply (MethodSpec.reply_arrays)."""
    return {"scalars": unpack_scalars("scalars", record, "", cfg.kseed.k)[0]}


def pack_instruction(server_round: int, lr: float, log: Sequence[LogEntry]) -> RecordDict:
    first = log_first(log, server_round)
    arrays: dict[str, Array] = {}
    for e in log:
        arrays[f"{e.round}/lr"] = Array(np.asarray([e.lr], dtype=np.float64))
        arrays.update(pack_scalars(f"{e.round}/", e.scalars))
    config = {"server-round": int(server_round), "lr": float(lr), "log-first": int(first)}
    return RecordDict({"config": ConfigRecord(config), "log": ArrayRecord(arrays)})


@dataclass
class Instruction:
    server_round: int
    lr: float
    log: list[LogEntry]


def unpack_instruction(content: RecordDict, cfg: RunConfig) -> Instruction:
    """A checked instruction; raises WireError for anything a node must refuse (common.wire, "Instructions"):
    malformed records, an η other than the node's zo.lr, scalars beyond the instruction bound."""
    k = cfg.kseed.k
    _, server_round, lr, first = checked_log_config(content, cfg.zo.lr)
    bound = instruction_bound(zo_scalar_bound(cfg.zo.eps, cfg.train.local_steps * cfg.kseed.perturbations))
    arrays = require(content, "log", ArrayRecord)
    entries, used = [], 0
    for t in range(first, server_round):
        if f"{t}/lr" not in arrays:
            raise WireError(f"log lacks round {t}")
        lr_t = checked_log_lr(arrays, t, lr)
        dense, n = unpack_scalars("log", arrays, f"{t}/", k, bound)
        entries.append(LogEntry(t, lr_t, dense))
        used += 1 + n
    if len(arrays) != used:
        raise WireError(f"log has {len(arrays)} arrays, {used} expected for rounds {first}..{server_round - 1}")
    return Instruction(server_round, lr, entries)


def pack_reply(scalars: np.ndarray, metrics: dict[str, float | int]) -> RecordDict:
    return RecordDict({"scalars": ArrayRecord(pack_scalars("", scalars)), "metrics": MetricRecord(dict(metrics))})


@dataclass
class Reply:
    num_examples: int
    scalars: np.ndarray  # dense (K,)
    metrics: dict[str, float]


def unpack_reply(content: RecordDict, server_round: int, k: int, eps: float, estimates: int) -> Reply:
    """A checked reply; raises WireError for anything malformed (keys, shapes, dtypes, NaN, bounds, indices).

    `estimates`: the most two-sided estimates one client makes in a round (S·P), which bounds each G[j]."""
    n, metrics = checked_metrics(content, server_round)
    return Reply(n, unpack_update(content, k, eps, estimates), metrics)


def unpack_update(content: RecordDict, k: int, eps: float, estimates: int) -> np.ndarray:
    """A reply's scalars G, dense (K,), checked (its metrics are checked_metrics'); raises WireError."""
    rec = require(content, "scalars", ArrayRecord)
    dense, used = unpack_scalars("scalars", rec, "", k, zo_scalar_bound(eps, estimates))
    if len(rec) != used:
        raise WireError(f"scalars record has keys {sorted(rec.keys())[:5]}: expected 'scalars' (+ 'index')")
    return dense
