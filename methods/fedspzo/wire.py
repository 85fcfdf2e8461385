"""FedSPZO wire format: seeds down, scalars up. Numbers only, checked on arrival; nothing is unpickled.

Server -> client, message type "train":
  "config"  ConfigRecord  server-round: int T; round-seed: int ρ_T (the seeds of every step derive from it);
                          lr: float η_T; log-first: int (first round carried in "log"; log-first..T-1 are
                          all carried, log-first = T when nothing is)
  "log"     ArrayRecord   for each carried round t: "t/seed" int64 (1,) ρ_t, "t/lr" float64 (1,) η_t,
                          "t/g1" float32 (S, P1) and "t/g2" float32 (S, P2): the aggregated scalars of
                          round t (S = 0 rows for a round without valid replies)
  "snapshot"              a node far behind gets its perturbed parameters' values of round T-1 instead of
                          the log (config snapshot-round = T-1, log-first = T): common.catchup
Client -> server:
  "scalars" ArrayRecord   "g1" float32 (S, P1), "g2" float32 (S, P2): the projected gradients of every
                          local step, in order (S = train.local-steps)
  "metrics" MetricRecord  num-examples (int > 0), model-round (int, must be T-1), train-loss, train-seconds,
                          peak-rss-mb, local-steps, forward-passes (every model call), full-passes,
                          block1-passes, block2-passes (common.zeroorder.ModelCalls), perturb-seconds
A client that cannot reach round T-1 sends the sync-only reply of common.nodestore.
Instruction checks (client, common.wire "Instructions"): server-round >= 1, log-first in 1..T; ρ_T and every
logged ρ_t equal round_seed(run seed, t), derived by the node itself; η_T and every logged η_t equal the
node's zo.lr and lie in (0, ZO_LR_MAX]; logged scalars finite, |g| <= 2 x zo_scalar_bound(zo.eps). A refused
instruction leaves the node's state untouched.
Reply checks (server): g1 and g2 decoded from their bytes as float32 (S, P) (common.wire), finite and
|g| <= common.wire.zo_scalar_bound(zo.eps) (one estimate each); common.wire.checked_metrics for the metrics.
Sizes: up 4·S·(P1 + P2) bytes of scalars (20 x 9 x 4 = 720 B at the defaults); down 4·S·(P1 + P2) + 16 B
per carried round (normally one).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.config import RunConfig
from common.wire import (
    WireError,
    check_seeds,
    checked_log_config,
    checked_log_lr,
    checked_metrics,
    checked_tensor,
    config_int,
    instruction_bound,
    log_first,
    require,
    zo_scalar_bound,
)
from methods.fedspzo.spzo import LogEntry, round_seed


def value_bound(cfg: RunConfig, record: str) -> float:
    """The largest |value| the server accepts in this record of a reply (MethodSpec.value_bound)."""
    return {"scalars": zo_scalar_bound(cfg.zo.eps)}[record]


def pack_instruction(server_round: int, rho: int, lr: float, log: Sequence[LogEntry]) -> RecordDict:
    first = log_first(log, server_round)
    arrays: dict[str, Array] = {}
    for e in log:
        arrays[f"{e.round}/seed"] = Array(np.asarray([e.seed], dtype=np.int64))
        arrays[f"{e.round}/lr"] = Array(np.asarray([e.lr], dtype=np.float64))
        arrays[f"{e.round}/g1"] = Array(np.ascontiguousarray(e.g1, dtype=np.float32))
        arrays[f"{e.round}/g2"] = Array(np.ascontiguousarray(e.g2, dtype=np.float32))
    config = {"server-round": int(server_round), "round-seed": int(rho), "lr": float(lr), "log-first": int(first)}
    return RecordDict({"config": ConfigRecord(config), "log": ArrayRecord(arrays)})


@dataclass
class Instruction:
    server_round: int
    rho: int
    lr: float
    log: list[LogEntry]


def _scalars(where: str, arr, p: int, steps: tuple[int, ...], bound: float | None = None) -> np.ndarray:
    """A float32 (S, p) array of finite scalars (within +-bound), S one of `steps`."""
    shape = tuple(getattr(arr, "shape", ()))
    if len(shape) != 2 or shape[1] != p or shape[0] not in steps:
        raise WireError(f"{where}: shape {str(shape)[:60]}, expected (S, {p}) with S in {steps}")
    return checked_tensor(where, arr, shape, bound=bound).numpy()


def unpack_instruction(content: RecordDict, cfg: RunConfig) -> Instruction:
    """A checked instruction; raises WireError for anything a node must refuse (common.wire, "Instructions"):
    malformed records, a round seed other than round_seed(run seed, t), an η other than the node's zo.lr,
    scalars beyond the instruction bound."""
    p1, p2, steps = cfg.spzo.p1, cfg.spzo.p2, cfg.train.local_steps
    config, server_round, lr, first = checked_log_config(content, cfg.zo.lr)
    rho = config_int(config, "round-seed")
    check_seeds(f"config round-seed of round {server_round}", [rho], [round_seed(cfg.seed, server_round)])
    bound = instruction_bound(zo_scalar_bound(cfg.zo.eps))
    arrays = require(content, "log", ArrayRecord)
    entries = []
    for t in range(first, server_round):
        if f"{t}/seed" not in arrays or f"{t}/lr" not in arrays:
            raise WireError(f"log lacks round {t}")
        seed = int(checked_tensor(f"log[{t}/seed]", arrays[f"{t}/seed"], (1,), "int64")[0])
        check_seeds(f"log[{t}/seed]", [seed], [round_seed(cfg.seed, t)])
        lr_t = checked_log_lr(arrays, t, lr)
        g1 = _scalars(f"log[{t}/g1]", arrays.get(f"{t}/g1"), p1, (0, steps), bound)
        g2 = _scalars(f"log[{t}/g2]", arrays.get(f"{t}/g2"), p2, (g1.shape[0],), bound)
        entries.append(LogEntry(t, seed, lr_t, g1, g2))
    if len(arrays) != 4 * len(entries):
        raise WireError(
            f"log has {len(arrays)} arrays, {4 * len(entries)} expected for rounds {first}..{server_round - 1}"
        )
    return Instruction(server_round, rho, lr, entries)


def pack_reply(g1: np.ndarray, g2: np.ndarray, metrics: dict[str, float | int]) -> RecordDict:
    scalars = ArrayRecord(
        {"g1": Array(np.ascontiguousarray(g1, np.float32)), "g2": Array(np.ascontiguousarray(g2, np.float32))}
    )
    return RecordDict({"scalars": scalars, "metrics": MetricRecord(dict(metrics))})


@dataclass
class Reply:
    num_examples: int
    g1: np.ndarray
    g2: np.ndarray
    metrics: dict[str, float]


def unpack_reply(content: RecordDict, server_round: int, p1: int, p2: int, steps: int, eps: float) -> Reply:
    """A checked reply; raises WireError for anything malformed (keys, shapes, dtypes, NaN, bounds, counts)."""
    n, metrics = checked_metrics(content, server_round)
    g = unpack_update(content, p1, p2, steps, eps)
    return Reply(n, g["g1"], g["g2"], metrics)


def unpack_update(content: RecordDict, p1: int, p2: int, steps: int, eps: float) -> dict[str, np.ndarray]:
    """A reply's scalars {"g1", "g2"}, checked (its metrics are checked_metrics'); raises WireError."""
    rec = require(content, "scalars", ArrayRecord)
    if set(rec.keys()) != {"g1", "g2"}:
        raise WireError(f"scalars record has keys {sorted(rec.keys())[:5]}, expected ['g1', 'g2']")
    bound = zo_scalar_bound(eps)
    return {
        "g1": _scalars("scalars[g1]", rec["g1"], p1, (steps,), bound),
        "g2": _scalars("scalars[g2]", rec["g2"], p2, (steps,), bound),
    }
