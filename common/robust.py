"""Robust aggregation, the same for every method: a cap on example weights, norm bounding, and the rule.

One client among many may be broken or hostile. The wire checks (common.wire) reject what no honest client
can send; what is left are replies that look honest and may not be: values anywhere inside the bounds, a sign
flip blown up to the bounds, 10^12 claimed examples. Under the plain weighted mean one such client of ten moved
the global model 7,000 to 56,000x an honest round (FedKRSO, FedAvg; FedTT went NaN). The defences, set per run
(`aggregation.*`, common.config), all computed from the round's own replies, so no per-model constant:

1. Weight cap (`aggregation.weight-cap`, every rule): a reply's example count cannot be verified by the
   server, so it weighs at most weight-cap x the round's lower median count. With num-examples = 1e12 against
   honest counts of ~700, one client had 1 - 1.7e-9 of the weight; capped at 4 x median it has at most
   4 / (4 + n - 1) of it. Dirichlet partitions rarely exceed 4x the median; the cap only bites on those.
2. Norm bounding (`aggregation.norm-cap`, default 2; 0 = off): each reply's update (its values minus the
   global ones they replace; for updates that are already differences, such as FedKRSO accumulators and
   zero-order scalars, the values themselves) is scaled down to at most norm-cap x the round's lower median
   update norm. This is the norm bounding of Sun et al. 2019 ("Can you really backdoor federated learning?"),
   which bounds what any one client can add, with the bound taken from the round as adaptive clipping does
   (Andrew et al. 2021 clip at a quantile of the clients' norms): a fixed bound (`aggregation.clip-norm`,
   kept as an option) depends on the model, the method and the learning rate and had to be guessed. The lower
   median of n norms is an honest one while fewer than half the replies are hostile (1 of 3 included), so a
   hostile update counts at most norm-cap honest norms, and with its weight capped it moves the mean by at
   most weight-cap x norm-cap / (weight-cap + n - 1) honest norms. Clipping, not rejection: an honest client
   can exceed the bound on an unlucky batch, and a clipped honest update still helps. With every client
   honest and norms within norm-cap x their median (the usual case: same steps, same learning rate), nothing
   is clipped and the default is exactly the example-weighted mean.
3. The rule (`aggregation.rule`), per coordinate of every aggregated array:
   - "mean": the example-weighted mean (weights capped as above): the methods' own aggregation;
   - "trimmed-mean": cut b = aggregation.attackers values at each end, average the rest, unweighted (the
     coordinate-wise trimmed mean of Yin et al. 2018, which needs at least as many cut at each end as there
     are attackers: b colluders all at one end are cut whole); with n <= 2b replies it cuts (n - 1) // 2;
   - "median": the coordinate-wise median, unweighted (as Flower's FedMedian), which absorbs (n - 1) // 2.
   `absorbed(n, rule, attackers)` says how many hostile replies a round of n absorbs; the strategies warn (log
   and record) when it is fewer than `aggregation.attackers`. The robust rules count every client once, so a
   lying example count buys nothing there.

Absent values (FedKRSO: a client that did not use seed j sent no accumulator for it) are a zero update,
as in the mean: absent = 0 (the reference value) for every rule, so a seed used by one client of ten has a
median of 0 and is trimmed away by trimmed-mean. This keeps every rule a function of the clients' whole
updates (sum_j A_j P_j is zero along an unused seed); the cost is that robust rules only learn along seeds
most clients used (FedKRSO: every client uses all K seeds when intervals >= K; FedKSeed, whose clients draw
few of K = 4096 candidates each, needs "mean", see docs/security.md).

All arithmetic is in float64, the result is returned in the input dtype: the mean of float32 values is the
float32 rounding of the exact weighted mean (zero-order logs keep it, so every node replays the same numbers).
Nothing here makes a non-finite aggregate, but a caller applies one only if `non_finite` finds nothing.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

RULES = ("mean", "trimmed-mean", "median")
K = TypeVar("K", bound=Hashable)
Value = TypeVar("Value", np.ndarray, torch.Tensor)


def lower_median(values: Sequence[float]) -> float:
    """The lower median: of two values the smaller; an honest value while fewer than half are hostile."""
    return sorted(values)[(len(values) - 1) // 2]


def capped_weights(counts: Sequence[int | float], cap: float) -> list[float]:
    """Each example count, at most cap x the lower median of all of them."""
    if not counts or min(counts) <= 0:
        raise ValueError("capped_weights needs positive example counts")
    median = lower_median(counts)
    return [float(min(n, cap * median)) for n in counts]


def norm_bound(norms: Sequence[float], norm_cap: float = 0.0, clip_norm: float = 0.0) -> float:
    """The L2 bound of this round's updates: norm_cap x their lower median (0: none) and clip_norm (0: none),
    the smaller; math.inf when neither is set."""
    bounds = [math.inf]
    if norm_cap > 0 and norms:
        bounds.append(norm_cap * lower_median(norms))
    if clip_norm > 0:
        bounds.append(clip_norm)
    return min(bounds)


def clip_factor(norm: float, bound: float) -> float:
    """The factor that brings an update of this L2 norm to at most `bound` (math.inf: no bound)."""
    if norm <= bound:
        return 1.0
    return bound / norm


def absorbed(n: int, rule: str, attackers: int) -> int:
    """How many hostile replies a round of n replies absorbs per coordinate (all at one end): what trimmed-mean
    cuts at each end (b = attackers, at most (n - 1) // 2), (n - 1) // 2 for the median, 0 for the mean
    (which norm-cap and weight-cap bound instead)."""
    if rule == "median":
        return (n - 1) // 2
    if rule == "trimmed-mean":
        return min(attackers, (n - 1) // 2)
    return 0


def combine(
    values: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean", attackers: int = 0
) -> np.ndarray:
    """One array from n arrays of the same shape, per coordinate, by the rule (see the module docstring)."""
    if not values:
        raise ValueError("combine needs at least one value")
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    if rule == "mean":
        total = float(sum(weights))
        if not total > 0 or min(weights) < 0:
            raise ValueError("mean needs non-negative weights with a positive sum")
        out = sum(w / total * np.asarray(v, np.float64) for w, v in zip(weights, values, strict=True))  # in order
    elif rule in ("trimmed-mean", "median"):
        # The median is the trimmed mean that cuts (n - 1) // 2 at each end: one value, or the mean of two.
        cut = absorbed(len(values), rule, attackers)
        kept = np.sort(np.stack([np.asarray(v) for v in values]), axis=0)[cut : len(values) - cut]
        out = kept.mean(axis=0, dtype=np.float64)
    else:
        raise ValueError(f"aggregation rule '{rule}' is unknown; choose one of: {', '.join(RULES)}")
    return np.asarray(out, dtype=np.asarray(values[0]).dtype)


def update_norm(values: Mapping[K, np.ndarray], reference: Mapping[K, np.ndarray]) -> float:
    """The L2 norm of a reply's update: values - reference (reference 0 where it has no key)."""
    total = 0.0
    for k, v in values.items():
        d = np.asarray(v, np.float64) - reference[k] if k in reference else np.asarray(v, np.float64)
        total += float(np.sum(d * d))
    return math.sqrt(total)


def clip(values: Mapping[K, np.ndarray], bound: float, reference: Mapping[K, np.ndarray]) -> dict[K, np.ndarray]:
    """The reply with its update (values - reference; reference 0 where it has no key) scaled to an L2 norm
    of at most `bound` (unchanged, the same arrays, when the norm is within it)."""
    factor = clip_factor(update_norm(values, reference), bound)
    if factor == 1.0:
        return dict(values)
    out = {}
    for k, v in values.items():
        ref = np.asarray(reference[k], np.float64) if k in reference else 0.0
        out[k] = np.asarray(ref + factor * (np.asarray(v, np.float64) - ref), dtype=v.dtype)
    return out


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregate, and what the defences did to get it."""

    values: dict  # key -> array (numpy or torch, as the replies)
    bound: float  # the L2 bound on each reply's update (math.inf: none)
    clipped: int  # replies whose update was scaled down to the bound
    absorbed: int  # hostile replies the rule absorbs at this number of replies (absorbed())


def aggregate_round(
    replies: Sequence[Mapping[K, Value]],
    weights: Sequence[float],
    rule: str = "mean",
    attackers: int = 0,
    norm_cap: float = 0.0,
    clip_norm: float = 0.0,
    reference: Mapping[K, Value] | None = None,
) -> Aggregate:
    """Per key: `combine` of the replies' values after bounding each reply's update (norm_bound).

    `reference` holds the global values that replies replace (FedTT cores, heads, FedAvg weights); a key not in
    it is an update already (FedKRSO accumulators, zero-order scalars: reference 0). A key absent from a reply
    is a zero update: the reference value there. Keys come out in the order of their first appearance.
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
    norms = [update_norm(r, ref_np) for r in replies_np] if norm_cap > 0 or clip_norm > 0 else []
    bound = norm_bound(norms, norm_cap, clip_norm)
    clipped = [clip(r, bound, ref_np) for r in replies_np]
    out: dict[K, Value] = {}
    for k, shape in keys.items():
        absent = ref_np[k] if k in ref_np else np.zeros(shape, np.float32)
        dtype = next(r[k].dtype for r in replies_np if k in r)
        combined = combine([np.asarray(r.get(k, absent), dtype=dtype) for r in clipped], weights, rule, attackers)
        out[k] = torch.from_numpy(combined) if as_torch else combined
    return Aggregate(out, bound, sum(n > bound for n in norms), absorbed(len(replies), rule, attackers))


def aggregate(replies: Sequence[Mapping[K, Value]], weights: Sequence[float], **kwargs) -> dict[K, Value]:
    """The values of `aggregate_round` (same arguments)."""
    return aggregate_round(replies, weights, **kwargs).values


def non_finite(values: Mapping) -> str | None:
    """None when every value is finite, else which key holds a non-finite value (the reason to record)."""
    for k, v in values.items():
        finite = torch.isfinite(v).all() if isinstance(v, torch.Tensor) else np.isfinite(np.asarray(v)).all()
        if not finite:
            return f"the aggregate is not finite at {k}"
    return None


def settings(agg) -> dict:
    """The keyword arguments of `aggregate_round` from a run's AggregationConfig."""
    return {"rule": agg.rule, "attackers": agg.attackers, "norm_cap": agg.norm_cap, "clip_norm": agg.clip_norm}
