"""FedTT / FedTT+ wire format: what crosses the network each round, how it is packed, and how it is checked.

Names: adapter i follows the i-th adapter site of the model (methods.fedtt.tt.find_sites order); each
adapter has two TT matrices, "down" and "up"; matrix "<i>.<down|up>" has cores 0..L-1 of shapes
(r_{j-1}, n_j, r_j), known to both sides from the run config and the model. One array per TT matrix (not
one per core): Flower's Array carries a ~130-byte header, which for 168 small cores would be a third of
the message.

Server -> client, message type "train":
  "config" ConfigRecord  server-round: int T; masks: list[int], one per TT matrix in canonical order
                         (adapter 0 down, adapter 0 up, adapter 1 down, ...): bit j set = core j is trained
                         this round (FedTT: every core; FedTT+: the rule's selection); scores: int (1 = the
                         client must send gradient scores)
  "cores"  ArrayRecord   "<i>.<down|up>" float32 1-D: ALL cores of the matrix, flattened row-major and
                         concatenated in core order (the global adapters; clients keep no state)
  "head"   ArrayRecord   the global classification head, param name -> float32 (dense)
Client -> server:
  "cores"  ArrayRecord   "<i>.<down|up>" float32 1-D for each matrix with a nonzero mask, and only those:
                         the cores of its mask, flattened and concatenated in core order (frozen cores
                         never travel up)
  "head"   ArrayRecord   the client's trained head, same keys and shapes as sent
  "scores" ArrayRecord   only when asked: "scores" float32 (number of cores,), canonical core order, each
                         >= 0: mean |dL/dG| of every core on one batch after local training (FedTT+ rule)
  "metrics" MetricRecord num-examples (int > 0), model-round (int, must be T-1), train-loss, train-seconds,
                         peak-rss-mb, local-steps
Instruction checks (client, common.wire "Instructions"): server-round >= 1; masks within each matrix's cores;
cores and head finite and within 2 x VALUE_BOUND. Clients keep no state, so a refused instruction changes
nothing on the node.
Reply checks (server): every array decoded from its bytes as float32 of the expected length (common.wire);
cores and head finite and within +-common.wire.VALUE_BOUND, scores in [0, SCORE_BOUND];
common.wire.checked_metrics for the metrics (round, num-examples, bounded finite values).
Numbers only: no pickles, no code. Sizes: FedTT sum of all cores + head each way; FedTT+ up only the round's
cores (+ head and the scores, 4 bytes per core).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.wire import (
    VALUE_BOUND,
    WireError,
    checked_metrics,
    checked_round_config,
    config_int,
    config_ints,
    instruction_bound,
    pack_tensors,
    require,
    unpack_tensors,
)
from methods.fedtt.tt import MATRICES, CoreKey

if TYPE_CHECKING:
    from common.config import RunConfig

Shapes = Mapping[CoreKey, tuple[int, ...]]

# FedTT+ gradient scores are mean |dL/dG| of a core on one batch: a cross-entropy loss of O(1) and cores of
# O(1) give scores far below 1 (the tiny test models: ~1e-2). 1e4 leaves any honest client a wide margin;
# a larger score (the 3e38 made the averaged score inf) rejects the reply. The aggregation also
# normalises each client's scores within a TT matrix (methods.fedtt.server), so no client can outvote the others.
SCORE_BOUND = 1e4


def value_bound(cfg: RunConfig, record: str) -> float:
    """The largest |value| the server accepts in this record of a reply (MethodSpec.value_bound)."""
    return {"cores": VALUE_BOUND, "head": VALUE_BOUND, "scores": SCORE_BOUND}[record]


def matrices(shapes: Shapes) -> list[tuple[int, str]]:
    """The TT matrices (adapter, down|up), canonical order."""
    return sorted({(i, m) for i, m, _ in shapes}, key=lambda im: (im[0], MATRICES.index(im[1])))


def masks_of(selected: Sequence[CoreKey], shapes: Shapes) -> list[int]:
    chosen = set(selected)
    return [
        sum(1 << j for (i2, m2, j) in shapes if (i2, m2) == (i, m) and (i, m, j) in chosen) for i, m in matrices(shapes)
    ]


def selected_of(masks: Sequence[int], shapes: Shapes) -> list[CoreKey]:
    mats = matrices(shapes)
    if len(masks) != len(mats):
        raise WireError(f"{len(masks)} core masks sent, the model has {len(mats)} TT matrices: run configs differ")
    out = []
    for (i, m), mask in zip(mats, masks, strict=True):
        count = sum(1 for (i2, m2, _) in shapes if (i2, m2) == (i, m))
        if not 0 <= mask < (1 << count):
            raise WireError(f"core mask {mask} of matrix {i}.{m} names cores beyond its {count}")
        out += [(i, m, j) for j in range(count) if mask >> j & 1]
    return out


def _pack_cores(cores: Mapping[CoreKey, torch.Tensor], shapes: Shapes) -> ArrayRecord:
    flat: dict[str, torch.Tensor] = {}
    for i, m in matrices(shapes):
        parts = [cores[k].reshape(-1) for k in sorted(cores) if k[:2] == (i, m)]
        if parts:
            flat[f"{i}.{m}"] = torch.cat(parts)
    return pack_tensors(flat)


def _unpack_cores(
    where: str, rec: ArrayRecord, wanted: Sequence[CoreKey], shapes: Shapes, bound: float | None = None
) -> dict[CoreKey, torch.Tensor]:
    """Exactly one array per TT matrix named in `wanted`, of exactly the length of its wanted cores."""
    by_matrix: dict[str, list[CoreKey]] = {}
    for k in sorted(wanted):
        by_matrix.setdefault(f"{k[0]}.{k[1]}", []).append(k)
    lengths = {name: (sum(int(torch.Size(shapes[k]).numel()) for k in keys),) for name, keys in by_matrix.items()}
    flat = unpack_tensors(where, rec, lengths, bound)
    out: dict[CoreKey, torch.Tensor] = {}
    for name, keys in by_matrix.items():
        offset = 0
        for k in keys:
            size = int(torch.Size(shapes[k]).numel())
            out[k] = flat[name][offset : offset + size].reshape(shapes[k])
            offset += size
    return out


def pack_instruction(
    server_round: int,
    selected: Sequence[CoreKey],
    cores: Mapping[CoreKey, torch.Tensor],
    head: Mapping[str, torch.Tensor],
    want_scores: bool,
) -> RecordDict:
    shapes = {k: tuple(v.shape) for k, v in cores.items()}
    return RecordDict(
        {
            "config": ConfigRecord(
                {
                    "server-round": int(server_round),
                    "masks": masks_of(selected, shapes),
                    "scores": int(want_scores),
                }
            ),
            "cores": _pack_cores(cores, shapes),
            "head": pack_tensors(head),
        }
    )


@dataclass
class Instruction:
    server_round: int
    selected: list[CoreKey]
    cores: dict[CoreKey, torch.Tensor]
    head: dict[str, torch.Tensor]
    want_scores: bool


def unpack_instruction(content: RecordDict, shapes: Shapes, head_shapes: Mapping[str, tuple[int, ...]]) -> Instruction:
    """A checked instruction; raises WireError for anything a node must refuse (common.wire, "Instructions"):
    malformed records, masks naming cores the model lacks, cores or head beyond the instruction bound."""
    cfg, server_round, _ = checked_round_config(content, with_log=False)
    masks = config_ints(cfg, "masks")
    want = config_int(cfg, "scores")
    if want > 1:
        raise WireError(f"config scores = {want}: expected 0 or 1")
    selected = selected_of(masks, shapes)
    bound = instruction_bound(VALUE_BOUND)
    cores = _unpack_cores("cores", require(content, "cores", ArrayRecord), list(shapes), shapes, bound)
    head = unpack_tensors("head", require(content, "head", ArrayRecord), head_shapes, bound)
    return Instruction(server_round, selected, cores, head, bool(want))


def reference_values(setup, instruction: RecordDict) -> dict[str, dict[str, np.ndarray]]:
    """What a reply's "cores" and "head" replace (MethodSpec.reference_values): the instruction's cores of the
    round's selection, packed as a reply packs them, and its head. The core shapes are the server model's."""
    tm = setup.strategy.tm  # methods.fedtt.server.FedTT
    shapes = tm.adapters.shapes()
    sent = unpack_instruction(instruction, shapes, tm.head_shapes)
    cores = _pack_cores({k: sent.cores[k] for k in sent.selected}, shapes)
    return {"cores": {k: a.numpy() for k, a in cores.items()}, "head": {n: v.numpy() for n, v in sent.head.items()}}


def pack_reply(
    cores: Mapping[CoreKey, torch.Tensor],
    shapes: Shapes,
    head: Mapping[str, torch.Tensor],
    scores: Sequence[float] | None,
    metrics: Mapping[str, float | int],
) -> RecordDict:
    content = RecordDict(
        {
            "cores": _pack_cores(cores, shapes),
            "head": pack_tensors(head),
            "metrics": MetricRecord(dict(metrics)),
        }
    )
    if scores is not None:
        content["scores"] = pack_tensors({"scores": torch.tensor(list(scores), dtype=torch.float32)})
    return content


@dataclass
class Reply:
    num_examples: int
    cores: dict[CoreKey, torch.Tensor]
    head: dict[str, torch.Tensor]
    scores: dict[CoreKey, float] | None
    metrics: dict[str, float]


def unpack_reply(
    content: RecordDict,
    server_round: int,
    selected: Sequence[CoreKey],
    shapes: Shapes,
    head_shapes: Mapping[str, tuple[int, ...]],
    want_scores: bool,
) -> Reply:
    """A checked reply; raises WireError for anything malformed (keys, lengths, dtypes, NaN, bounds, counts...)."""
    n, scalars = checked_metrics(content, server_round)
    update = unpack_update(content, selected, shapes, head_shapes, want_scores)
    return Reply(n, update.cores, update.head, update.scores, scalars)


@dataclass
class Update:
    """What a reply adds to the round: its trained cores, its head, and FedTT+'s gradient scores."""

    cores: dict[CoreKey, torch.Tensor]
    head: dict[str, torch.Tensor]
    scores: dict[CoreKey, float] | None


def unpack_update(
    content: RecordDict,
    selected: Sequence[CoreKey],
    shapes: Shapes,
    head_shapes: Mapping[str, tuple[int, ...]],
    want_scores: bool,
) -> Update:
    """A reply's cores, head and scores, checked (its metrics are checked_metrics'); raises WireError."""
    expected = {"cores", "head", "metrics"} | ({"scores"} if want_scores else set())
    if set(content.keys()) != expected:
        raise WireError(f"reply records {sorted(content.keys())[:6]}, expected {sorted(expected)}")
    cores = _unpack_cores("cores", require(content, "cores", ArrayRecord), selected, shapes, VALUE_BOUND)
    head = unpack_tensors("head", require(content, "head", ArrayRecord), head_shapes, VALUE_BOUND)
    scores = None
    if want_scores:
        keys = list(shapes)  # canonical order
        vec = unpack_tensors("scores", require(content, "scores", ArrayRecord), {"scores": (len(keys),)}, SCORE_BOUND)
        if (vec["scores"] < 0).any():
            raise WireError("scores must be >= 0 (mean absolute gradients)")
        scores = {k: float(v) for k, v in zip(keys, vec["scores"].tolist(), strict=True)}
    return Update(cores, head, scores)


def reply_payload(
    selected: Sequence[CoreKey], shapes: Shapes, head_shapes: Mapping, want_scores: bool
) -> tuple[int, int]:
    """(bytes of numbers, arrays) of an honest reply: the selected cores, the head, the scores if asked."""
    numbers = sum(int(torch.Size(shapes[k]).numel()) for k in selected)
    numbers += sum(int(torch.Size(s).numel()) for s in head_shapes.values())
    numbers += len(shapes) if want_scores else 0
    return 4 * numbers, len({k[:2] for k in selected}) + len(head_shapes) + int(want_scores)
