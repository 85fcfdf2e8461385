"""FedKRSO wire format: what crosses the network each round, how it is packed, and how it is checked.

Server -> client, message type "train":
  "config"  ConfigRecord  server-round: int T; seeds: list[int] (the K seeds of round T);
                          log-first: int (first round carried in "log"; log-first..T-1 are all carried,
                          log-first = T when nothing is)
  "log"     ArrayRecord   for each carried round t: "t/seeds" int64 (K,), and for each seed index j and
                          target matrix n: "t/j/n" float32 (d_out, r) = Bbar of round t
                          (the rounds the node has not applied yet: normally only T-1)
  "snapshot"                a node far behind gets its target matrices' values of round T-1 instead of the
                            log (config snapshot-round = T-1, log-first = T): common.catchup
  "head"    ArrayRecord   the global classification head, param name -> float32 (dense, tiny); empty, and may be
                          absent, when the run has no new head (head.kind = "lm")
Client -> server:
  "accumulators" ArrayRecord  "j/n" float32 (d_out, r): A_j of every seed index the client used
  "head"         ArrayRecord  the client's trained head, same keys and shapes as sent
  "metrics"      MetricRecord num-examples (int > 0), model-round (int: the global round the client trained
                              from, must be T-1), train-loss, train-seconds, peak-rss-mb
Instruction checks (client, common.wire "Instructions"): server-round >= 1, log-first in 1..T; the seeds of
round T and of every log round equal round_seeds(run seed, t, K), derived by the node itself; log and head
values finite and within 2 x VALUE_BOUND; a refused instruction leaves the node's state untouched.
Reply checks (server): the bytes of every array are decoded as float32 of the stated shape (common.wire),
finite and within +-VALUE_BOUND; accumulator keys are canonical ("1/n", never "01/n": two spellings of
one key would let one overwrite the other); common.wire.checked_metrics for the metrics.
A client that cannot reach round T-1 from what it holds plus the log sends the sync-only reply of
common.nodestore ("metrics": model-round = the round it holds, sync-only = 1, num-examples = 0).
Numbers only: no pickles, no code. Sizes: K * sum_n d_out(n) * r float32 each way, plus the head.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.wire import (
    VALUE_BOUND,
    WireError,
    check_seeds,
    checked_metrics,
    checked_round_config,
    checked_tensor,
    config_ints,
    instruction_bound,
    pack_tensors,
    require,
    unpack_tensors,
)
from methods.fedkrso.subspace import Accumulators, LogEntry, round_seeds

if TYPE_CHECKING:
    from common.config import RunConfig


def value_bound(cfg: RunConfig, record: str) -> float:
    """The largest |value| the server accepts in this record of a reply (MethodSpec.value_bound)."""
    return {"accumulators": VALUE_BOUND, "head": VALUE_BOUND}[record]


def reference_values(setup, instruction: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """What a reply's "head" replaces (MethodSpec.reference_values): the global head the instruction sent (none in
    a run without a new head). The accumulators are updates, measured from 0."""
    if "head" not in instruction:
        return {}
    return {"head": {k: a.numpy() for k, a in require(instruction, "head", ArrayRecord).items()}}


def _head(content: RecordDict, head_shapes: Mapping[str, tuple[int, ...]], bound: float) -> dict[str, torch.Tensor]:
    """The "head" record; a run with no new head (the LM head scores label words, or an instruction task) may
    leave it out, as a checkpoint does, which keeps no empty record."""
    if not head_shapes and "head" not in content:
        return {}
    return unpack_tensors("head", require(content, "head", ArrayRecord), head_shapes, bound)


def pack_instruction(
    server_round: int, seeds: Sequence[int], log: Sequence[LogEntry], head: Mapping[str, torch.Tensor]
) -> RecordDict:
    first = log[0].round if log else server_round
    arrays: dict[str, Array] = {}
    for offset, entry in enumerate(log):
        if entry.round != first + offset:
            raise ValueError("update log entries must be consecutive rounds")
        arrays[f"{entry.round}/seeds"] = Array(np.asarray(entry.seeds, dtype=np.int64))
        for (j, name), b in entry.bbar.items():
            arrays[f"{entry.round}/{j}/{name}"] = Array(b.detach().to(torch.float32).contiguous().numpy())
    return RecordDict(
        {
            "config": ConfigRecord(
                {"server-round": int(server_round), "seeds": [int(s) for s in seeds], "log-first": int(first)}
            ),
            "log": ArrayRecord(arrays),
            "head": pack_tensors(head),
        }
    )


@dataclass
class Instruction:
    server_round: int
    seeds: list[int]
    log: list[LogEntry]
    head: dict[str, torch.Tensor]


def unpack_instruction(
    content: RecordDict,
    k: int,
    shapes: Mapping[str, tuple[int, int]],
    head_shapes: Mapping[str, tuple[int, ...]],
    run_seed: int,
) -> Instruction:
    """A checked instruction; raises WireError for anything a node must refuse (common.wire, "Instructions"):
    malformed records, seeds other than round_seeds(run_seed, t, K), values beyond the instruction bound."""
    cfg, server_round, first = checked_round_config(content, with_log=True)
    seeds = config_ints(cfg, "seeds")
    if len(seeds) != k:
        raise WireError(f"{len(seeds)} seeds sent, krso.k is {k}: server and client run configs differ")
    check_seeds(f"config seeds of round {server_round}", seeds, round_seeds(run_seed, server_round, k))
    bound = instruction_bound(VALUE_BOUND)
    arrays = require(content, "log", ArrayRecord)
    entries = []
    for t in range(first, server_round):
        if f"{t}/seeds" not in arrays:
            raise WireError(f"log lacks round {t}")
        seeds_t = checked_tensor(f"log[{t}/seeds]", arrays[f"{t}/seeds"], (k,), "int64").tolist()
        check_seeds(f"log[{t}/seeds]", seeds_t, round_seeds(run_seed, t, k))
        bbar: Accumulators = {}
        for j in range(k):
            for name, shape in shapes.items():
                key = f"{t}/{j}/{name}"
                if key in arrays:
                    bbar[(j, name)] = checked_tensor(f"log[{key}]", arrays[key], shape, bound=bound)
        entries.append(LogEntry(t, tuple(int(s) for s in seeds_t), bbar))
    expected = sum(1 + len(e.bbar) for e in entries)
    if len(arrays) != expected:
        raise WireError(f"log has {len(arrays)} arrays, {expected} expected for rounds {first}..{server_round - 1}")
    head = _head(content, head_shapes, bound)
    return Instruction(server_round, [int(s) for s in seeds], entries, head)


def pack_reply(
    accumulators: Accumulators, head: Mapping[str, torch.Tensor], metrics: Mapping[str, float | int]
) -> RecordDict:
    return RecordDict(
        {
            "accumulators": pack_tensors({f"{j}/{name}": b for (j, name), b in accumulators.items()}),
            "head": pack_tensors(head),
            "metrics": MetricRecord(dict(metrics)),
        }
    )


@dataclass
class Reply:
    num_examples: int
    model_round: int
    accumulators: Accumulators
    head: dict[str, torch.Tensor]
    metrics: dict[str, float]


@dataclass
class Update:
    """What a reply adds to the round: its accumulators and its head."""

    accumulators: Accumulators
    head: dict[str, torch.Tensor]


def unpack_reply(
    content: RecordDict,
    server_round: int,
    k: int,
    shapes: Mapping[str, tuple[int, int]],
    head_shapes: Mapping[str, tuple[int, ...]],
) -> Reply:
    """A checked reply; raises WireError for anything malformed (wrong keys, shapes, dtypes, NaN, bounds...)."""
    n, scalars = checked_metrics(content, server_round)
    update = unpack_update(content, k, shapes, head_shapes)
    return Reply(n, server_round - 1, update.accumulators, update.head, scalars)


def unpack_update(
    content: RecordDict, k: int, shapes: Mapping[str, tuple[int, int]], head_shapes: Mapping[str, tuple[int, ...]]
) -> Update:
    """A reply's accumulators and head, checked (its metrics are checked_metrics'); raises WireError."""
    rec = require(content, "accumulators", ArrayRecord)
    acc: Accumulators = {}
    for key in rec:
        j_str, _, name = key.partition("/")
        if not (j_str.isdigit() and j_str == str(int(j_str))) or not 0 <= int(j_str) < k or name not in shapes:
            raise WireError(f"accumulator key '{key[:80]}' is not '<seed index>/<target>' of this run")
        if (int(j_str), name) in acc:
            raise WireError(f"accumulator key '{key[:80]}' given twice")
        acc[(int(j_str), name)] = checked_tensor(f"accumulators[{key}]", rec[key], shapes[name], bound=VALUE_BOUND)
    if not acc:
        raise WireError("reply carries no accumulators")
    return Update(acc, _head(content, head_shapes, VALUE_BOUND))
