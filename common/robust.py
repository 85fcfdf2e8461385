"""Robust aggregation, the same for every method: norm clipping, a cap on example weights, and the rule.

One client among many may be broken or hostile. The wire checks (common.wire) reject what no honest client
can send; what is left are replies that look honest and may not be. Three defences, chosen per run
(`aggregation.*`, common.config):

1. Weight cap (`aggregation.weight-cap`, every rule): a reply's example count cannot be verified by the
   server, so it weighs at most weight-cap x the round's median count (the lower median: with two replies,
   the smaller). With num-examples = 1e12 against honest counts of ~700, one client had 1 - 1.7e-9 of the
   weight; capped at 4 x median it has at most 4 / (4 + n - 1) of it. Partitions of the simulation are
   equal (IID) or spread by a Dirichlet draw, and rarely exceed 4x the median; the cap only bites on those.
2. Norm clipping (`aggregation.clip-norm`, 0 = off): each reply's update (its values minus the global ones
   they replace; for updates that are already differences, such as FedKRSO accumulators and zero-order
   scalars, the values themselves) is scaled down to at most this L2 norm. Clipping (not rejection) because
   an honest client can exceed any fixed norm on an unlucky batch, and a clipped honest update still helps.
3. The rule (`aggregation.rule`), per coordinate of every aggregated array:
   - "mean": the example-weighted mean (weights capped as above): the methods' own aggregation;
   - "trimmed-mean": cut int(trim-fraction x n) replies at each end, average the rest, unweighted
     (Flower's own `trim_mean`, the one its FedTrimmedAvg uses; Yin et al. 2018);
   - "median": the coordinate-wise median, unweighted (as Flower's FedMedian).
   The robust rules count every client once, so a lying example count buys nothing there. With
   trim-fraction 0.2, fewer than 5 replies cut nothing: trimmed-mean needs n >= 1 / trim-fraction.

Absent values (FedKRSO: a client that did not use seed j sent no accumulator for it) are a zero update,
as in the mean: absent = 0 (the reference value) for every rule, so a seed used by one client of ten has a
median of 0 and is trimmed away by trimmed-mean. This keeps every rule a function of the clients' whole
updates (sum_j A_j P_j is zero along an unused seed); the cost is that robust rules only learn along seeds
most clients used (FedKRSO: every client uses all K seeds when intervals >= K; FedKSeed, whose clients draw
few of K = 4096 candidates each, needs "mean" + clip-norm, see README).

All arithmetic is in float64, the result is returned in the input dtype: the mean of float32 values is the
float32 rounding of the exact weighted mean (zero-order logs keep it, so every node replays the same numbers).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

RULES = ("mean", "trimmed-mean", "median")
K = TypeVar("K", bound=Hashable)
Value = TypeVar("Value", np.ndarray, torch.Tensor)


def capped_weights(counts: Sequence[int | float], cap: float) -> list[float]:
    """Each example count, at most cap x the lower median of all of them."""
    if not counts or min(counts) <= 0:
        raise ValueError("capped_weights needs positive example counts")
    median = sorted(counts)[(len(counts) - 1) // 2]
    return [float(min(n, cap * median)) for n in counts]


def clip_factor(norm: float, clip_norm: float) -> float:
    """The factor that brings an update of this L2 norm to at most clip_norm (1 when clip_norm is 0: off)."""
    if clip_norm <= 0 or norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def combine(
    values: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean", trim_fraction: float = 0.0
) -> np.ndarray:
    """One array from n arrays of the same shape, per coordinate, by the rule (see the module docstring)."""
    if not values:
        raise ValueError("combine needs at least one value")
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    stack = np.stack([np.asarray(v, dtype=np.float64) for v in values])
    if rule == "mean":
        total = float(sum(weights))
        if not total > 0 or min(weights) < 0:
            raise ValueError("mean needs non-negative weights with a positive sum")
        out = sum(w / total * v for w, v in zip(weights, stack, strict=True))  # in order, as the methods did
    elif rule == "trimmed-mean":
        out = trim_mean(stack, trim_fraction)
    elif rule == "median":
        out = np.median(stack, axis=0)
    else:
        raise ValueError(f"aggregation rule '{rule}' is unknown; choose one of: {', '.join(RULES)}")
    return np.asarray(out, dtype=np.asarray(values[0]).dtype)


def aggregate(
    replies: Sequence[Mapping[K, Value]],
    weights: Sequence[float],
    rule: str = "mean",
    trim_fraction: float = 0.0,
    clip_norm: float = 0.0,
    reference: Mapping[K, Value] | None = None,
) -> dict[K, Value]:
    """Per key: `combine` of the replies' values after clipping each reply's update to clip_norm.

    `reference` holds the global values that replies replace (FedTT cores, heads); a key not in it is an
    update already (FedKRSO accumulators, zero-order scalars: reference 0). A key absent from a reply is a
    zero update: the reference value there. Keys come out in the order of their first appearance.
    Values may be numpy arrays or CPU tensors; what comes out is of the same kind.
    """
    reference = reference or {}
    as_torch = any(isinstance(v, torch.Tensor) for r in replies for v in r.values())
    replies_np = [{k: np.asarray(v) for k, v in r.items()} for r in replies]
    ref_np = {k: np.asarray(v) for k, v in reference.items()}
    keys: dict[K, tuple[int, ...]] = {}
    for r in replies_np:
        for k, v in r.items():
            keys.setdefault(k, v.shape)
    clipped = [clip(r, clip_norm, ref_np) for r in replies_np]
    out: dict[K, Value] = {}
    for k, shape in keys.items():
        absent = ref_np[k] if k in ref_np else np.zeros(shape, np.float32)
        dtype = next(r[k].dtype for r in replies_np if k in r)
        combined = combine([np.asarray(r.get(k, absent), dtype=dtype) for r in clipped], weights, rule, trim_fraction)
        out[k] = torch.from_numpy(combined) if as_torch else combined
    return out


def clip(values: Mapping[K, np.ndarray], clip_norm: float, reference: Mapping[K, np.ndarray]) -> dict[K, np.ndarray]:
    """The reply with its update (values - reference; reference 0 where it has no key) scaled to an L2 norm
    of at most clip_norm (unchanged when clip_norm is 0 or the norm is within it)."""
    deltas = {
        k: v.astype(np.float64) - reference[k] if k in reference else v.astype(np.float64) for k, v in values.items()
    }
    factor = clip_factor(math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values())), clip_norm)
    if factor == 1.0:
        return dict(values)
    return {
        k: np.asarray(reference[k] + factor * d if k in reference else factor * d, dtype=values[k].dtype)
        for k, d in deltas.items()
    }


def settings(agg) -> dict:
    """The keyword arguments of `aggregate` from a run's AggregationConfig."""
    return {"rule": agg.rule, "trim_fraction": agg.trim_fraction, "clip_norm": agg.clip_norm}
