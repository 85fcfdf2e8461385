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
3. The rule (`aggregation.rule`):
   - "mean": the example-weighted mean (weights capped as above): the methods' own aggregation;
   - "capped-mean": the mean with norm-cap 1 and weight-cap 1: no reply counts for more than the round's
     median reply, in update norm or in weight. One hostile reply of three moves it by at most a third of an
     honest norm; measured on SST-2 (docs/results-robust.md) one of three moved the first-order methods'
     dev loss by -0.05 to +0.09 where the bounded mean (norm-cap 2, weight-cap 4) moved it by up to +0.74;
   - "trimmed-mean": per coordinate, cut b = aggregation.attackers values at each end, average the rest,
     unweighted (the coordinate-wise trimmed mean of Yin et al. 2018, which needs at least as many cut at each
     end as there are attackers: b colluders all at one end are cut whole). A round of n < 2b + 1 replies
     cannot cut b at each end and is the capped mean instead (and warns);
   - "trimmed-or-capped" (the first-order methods' default): trimmed-mean in rounds of at least
     `trimmed_replies(b)` = 4b replies, where it keeps at least half of them, the capped mean below. Measured
     on SST-2 with honest label-skewed clients, a rule that keeps one or two replies of few (the coordinate-wise
     median of 3 or of 5, the geometric median of 3) lost 5 to 20 points against the mean of all of them;
   - "median": the coordinate-wise median, unweighted (as Flower's FedMedian), which absorbs (n - 1) // 2;
   - "geometric-median": the geometric median of the whole updates, unweighted (RFA, Pillutla et al. 2022;
     `geometric_median`), which absorbs (n - 1) // 2 and moves by at most the honest replies' spread.
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

Memory. The mean is a running sum (`WeightedMean`): replies are added one at a time into one float64 array per
key, in the same order and with the same float64 operations as `combine`, so the result is bit for bit the
same while the aggregation holds one reply and 8 bytes per aggregated number, however many replies the round
has. The weights and the norms are float64 arrays (8 bytes a reply each: the bounded-memory aim is about the
replies' arrays), their medians taken with np.partition. Norm bounding needs the median norm before the first reply is
scaled, so `aggregate_round` reads a re-iterable sequence twice: once for the norms, then to clip and add, one reply at a
time (a one-shot iterator is kept in a list first). The strategies hand it such a sequence (server_app.round.Replies):
each accepted reply is decoded again from its Message when it is read and is not kept, so a round under the
mean or the capped mean holds one decoded reply at a time, and a reply that fails to decode again raises
server_app.round.RoundFailed out of the iteration, which fails the round. A rule that reads the replies more
than once lists them first (every read decodes again). The robust rules cannot stream: trimmed-mean and median
sort all n values of each coordinate and the geometric median iterates over whole updates, so they hold every
reply (n x the update's size, plus a stacked copy of one key's n values while it is combined; the geometric
median n float64 copies of the update).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch

RULES = ("mean", "capped-mean", "trimmed-or-capped", "trimmed-mean", "median", "geometric-median")
WEISZFELD_ITERATIONS = 100  # at most; RFA (Pillutla et al.) stops after a few, here when the objective settles
WEISZFELD_TOLERANCE = 1e-7  # relative decrease of the sum of distances below which the iteration stops
K = TypeVar("K", bound=Hashable)
Value = TypeVar("Value", np.ndarray, torch.Tensor)


def lower_median(values: Sequence[float]) -> float:
    """The lower median: of two values the smaller; an honest value while fewer than half are hostile. The very
    value sorted() would pick (floats exactly; integers exactly below 2^53, example counts)."""
    x = np.asarray(values, np.float64)
    if not x.size:
        raise ValueError("lower_median needs at least one value")
    rank = (x.size - 1) // 2
    return float(np.partition(x, rank)[rank])


def capped_weights(counts: Sequence[int | float], cap: float) -> np.ndarray:
    """Each example count, at most cap x the lower median of all of them: float64, 8 bytes a reply."""
    x = np.asarray(counts, np.float64)
    if not x.size or x.min() <= 0:
        raise ValueError("capped_weights needs positive example counts")
    return np.minimum(x, cap * lower_median(x))


def norm_bound(norms: Sequence[float], norm_cap: float = 0.0, clip_norm: float = 0.0) -> float:
    """The L2 bound of this round's updates: norm_cap x their lower median (0: none) and clip_norm (0: none),
    the smaller; math.inf when neither is set."""
    bounds = [math.inf]
    if norm_cap > 0 and len(norms):
        bounds.append(norm_cap * lower_median(norms))
    if clip_norm > 0:
        bounds.append(clip_norm)
    return min(bounds)


def clip_factor(norm: float, bound: float) -> float:
    """The factor that brings an update of this L2 norm to at most `bound` (math.inf: no bound)."""
    if norm <= bound:
        return 1.0
    return bound / norm


def trimmed_replies(attackers: int) -> int:
    """The fewest replies from which trimmed-or-capped cuts b = attackers at each end: 4b, so that it keeps at
    least half of them (and at least 2b + 1, so that something is kept). Cutting to fewer than half leaves the
    mean of one or two label-skewed clients: with 5 honest clients and b = 2 (the median of 5) FedKRSO fell
    from 72% to 51% on SST-2, and the coordinate-wise median of 3 cost 6 to 15 points (docs/results-robust.md)."""
    return max(4 * attackers, 2 * attackers + 1)


def round_rule(n: int, rule: str, attackers: int) -> str:
    """The rule a round of n replies applies: trimmed-mean needs 2b + 1 replies to cut b at each end,
    trimmed-or-capped trimmed_replies(b); below that either is the capped mean."""
    if rule == "trimmed-mean":
        return rule if n >= 2 * attackers + 1 else "capped-mean"
    if rule == "trimmed-or-capped":
        return "trimmed-mean" if n >= trimmed_replies(attackers) else "capped-mean"
    return rule


def replies_needed(rule: str, attackers: int) -> int | None:
    """How many replies a round needs for the rule to absorb b = attackers hostile ones (None: never, the
    means bound them instead)."""
    if rule == "trimmed-or-capped":
        return trimmed_replies(attackers)
    if rule in ("trimmed-mean", "median", "geometric-median"):
        return 2 * attackers + 1
    return None


def absorbed(n: int, rule: str, attackers: int) -> int:
    """How many hostile replies a round of n replies absorbs (all at one end, per coordinate for trimmed-mean
    and median, whole for the geometric median): b = attackers for trimmed-mean with n >= trimmed_replies(b)
    (below that it is the capped mean), (n - 1) // 2 for the medians, 0 for the means (which norm-cap and
    weight-cap bound instead)."""
    rule = round_rule(n, rule, attackers)
    if rule in ("median", "geometric-median"):
        return (n - 1) // 2
    if rule == "trimmed-mean":
        return attackers
    return 0


def combine(
    values: Sequence[np.ndarray], weights: Sequence[float], rule: str = "mean", attackers: int = 0
) -> np.ndarray:
    """One array from n arrays of the same shape, per coordinate, by the rule (see the module docstring)."""
    if not values:
        raise ValueError("combine needs at least one value")
    if len(weights) != len(values):
        raise ValueError(f"{len(values)} values but {len(weights)} weights")
    rule = round_rule(len(values), rule, attackers)
    if rule == "capped-mean":  # per coordinate there is no norm: the weights only
        rule, weights = "mean", capped_weights(weights, 1.0)
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


def geometric_median(points: Sequence[Mapping[K, np.ndarray]]) -> tuple[dict[K, np.ndarray], int]:
    """The unweighted geometric median of n points, each a dict of float64 arrays of the same keys and shapes
    (a point is the concatenation of its arrays), and the Weiszfeld iterations it took.

    The smoothed Weiszfeld iteration of RFA (Pillutla, Kakade, Harchaoui 2022, "Robust aggregation for
    federated learning"): z <- sum_i x_i / max(nu, |z - x_i|) / sum_i 1 / max(nu, |z - x_i|), from the mean,
    until the sum of distances decreases by less than WEISZFELD_TOLERANCE of itself. nu (1e-9 of the largest
    distance from the mean) only keeps a point that z lands on from dividing by zero. Every step is the exact
    minimiser of a majorant, so the sum of distances never increases.
    """
    if not points:
        raise ValueError("geometric_median needs at least one point")
    keys = list(points[0])
    n = len(points)

    def distances(z: dict[K, np.ndarray]) -> np.ndarray:
        return np.sqrt([sum(float(np.sum((p[k] - z[k]) ** 2)) for k in keys) for p in points])

    z = {k: sum(p[k] for p in points) / n for k in keys}
    d = distances(z)
    nu = 1e-9 * float(d.max()) or 1e-300
    objective = float(d.sum())
    iterations = 0
    while iterations < WEISZFELD_ITERATIONS and objective > 0:
        beta = 1.0 / np.maximum(d, nu)
        beta /= beta.sum()
        z = {k: sum(b * p[k] for b, p in zip(beta, points, strict=True)) for k in keys}
        iterations += 1
        d = distances(z)
        new = float(d.sum())
        settled = objective - new <= WEISZFELD_TOLERANCE * objective
        objective = new
        if settled:
            break
    return z, iterations


def update_norm(values: Mapping[K, np.ndarray], reference: Mapping[K, np.ndarray]) -> float:
    """The L2 norm of a reply's update: values - reference (reference 0 where it has no key)."""
    total = 0.0
    for k, v in values.items():
        d = np.asarray(v, np.float64) - reference[k] if k in reference else np.asarray(v, np.float64)
        total += float(np.sum(d * d))
    return math.sqrt(total)


def clip(
    values: Mapping[K, np.ndarray], bound: float, reference: Mapping[K, np.ndarray], norm: float | None = None
) -> dict[K, np.ndarray]:
    """The reply with its update (values - reference; reference 0 where it has no key) scaled to an L2 norm
    of at most `bound` (unchanged, the same arrays, when the norm is within it). `norm`: the update's norm
    where the caller has it already (update_norm's)."""
    factor = clip_factor(update_norm(values, reference) if norm is None else norm, bound)
    if factor == 1.0:
        return {**values}  # a display: a dict(...) call bypasses the free list of dicts and refills it
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


class WeightedMean:
    """The example-weighted mean of replies added one at a time: `combine(..., "mean")` of every key, as
    `aggregate_round` takes it (keys in the order of their first appearance, a key absent from a reply is the
    reference value there, 0 where there is none), bit for bit, holding one float64 sum per key instead of
    the replies.

    The weights come first: each term is w_i / sum(w) x value, as `combine` computes it, so the sum of the
    weights must be known before the first reply (the strategies know every example count before they
    aggregate). A key first seen in reply j gets the terms of the j - 1 replies before it (the reference
    value, each with its weight) then, in order, so the float64 additions are those of `combine`.
    """

    def __init__(self, weights: Sequence[float], reference: Mapping[K, Value] | None = None) -> None:
        self.weights = weights  # weights[i] when reply i is added
        self.total = float(sum(weights))
        self._least = min(weights, default=0.0)
        self.reference = {k: np.asarray(v) for k, v in (reference or {}).items()}
        self.count = 0  # replies added
        self.as_torch = False
        self._sums: dict[K, np.ndarray] = {}  # key -> float64 running sum
        self._dtypes: dict[K, np.dtype] = {}  # key -> dtype of its first appearance (the result's)
        self._absent: dict[K, np.ndarray] = {}  # key -> the value an absent key stands for, in its dtype

    def _term(self, i: int, value: np.ndarray, dtype: np.dtype) -> np.ndarray:
        return self.weights[i] / self.total * np.asarray(np.asarray(value, dtype=dtype), np.float64)

    def _check_weights(self) -> None:
        if self.count > len(self.weights):
            raise ValueError(f"{self.count} values but {len(self.weights)} weights")
        if not self.total > 0 or self._least < 0:
            raise ValueError("mean needs non-negative weights with a positive sum")

    def add(self, reply: Mapping[K, Value]) -> None:
        """Add the next reply (numpy arrays or CPU tensors); it is not kept."""
        i = self.count
        self.count += 1
        self.as_torch = self.as_torch or any(isinstance(v, torch.Tensor) for v in reply.values())
        values = {k: np.asarray(v) for k, v in reply.items()}
        if values or self._sums:
            self._check_weights()
        for k, v in values.items():
            if k not in self._sums:  # first seen: the earlier replies held the reference value here
                dtype = v.dtype
                absent = self.reference[k] if k in self.reference else np.zeros(v.shape, np.float32)
                self._dtypes[k] = dtype
                self._absent[k] = np.asarray(absent, dtype=dtype)  # no copy when it has that dtype
                total = np.zeros(np.shape(self._absent[k]), np.float64)  # combine's sum() starts at 0
                for j in range(i):
                    total += self._term(j, self._absent[k], dtype)
                self._sums[k] = total
        for k, total in self._sums.items():
            total += self._term(i, values[k] if k in values else self._absent[k], self._dtypes[k])

    def result(self) -> dict[K, Value]:
        """The mean of every key, in the dtype of its first appearance (tensors if any reply held one)."""
        if self._sums and self.count != len(self.weights):
            raise ValueError(f"{self.count} values but {len(self.weights)} weights")
        out: dict[K, Value] = {}
        for k, total in self._sums.items():
            mean = np.asarray(total, dtype=self._dtypes[k])
            out[k] = torch.from_numpy(mean) if self.as_torch else mean
        return out


def _mean_round(
    replies: Iterable[Mapping[K, Value]],
    weights: Sequence[float],
    norm_cap: float,
    clip_norm: float,
    reference: Mapping[K, Value],
) -> Aggregate:
    """`aggregate_round` for the mean, one reply at a time (two passes over `replies` with norm bounding)."""
    ref_np = {k: np.asarray(v) for k, v in reference.items()}
    bounding = norm_cap > 0 or clip_norm > 0
    if bounding and isinstance(replies, Iterator):
        replies = list(replies)  # a one-shot iterator cannot be read twice
    # one reading for the norms (a float64 array, 8 bytes a reply), one to clip and add: each reply decoded once
    # per pass
    norms = (
        np.fromiter(
            (update_norm({k: np.asarray(v) for k, v in r.items()}, ref_np) for r in replies), np.float64, len(replies)
        )
        if norm_cap > 0
        else ()
    )
    bound = norm_bound(norms, norm_cap, clip_norm)
    mean, clipped = WeightedMean(weights, reference), 0
    for r in replies:
        values = {k: np.asarray(v) for k, v in r.items()}
        mean.as_torch = mean.as_torch or any(isinstance(v, torch.Tensor) for v in r.values())
        if bounding:
            norm = update_norm(values, ref_np)
            clipped += norm > bound
            values = clip(values, bound, ref_np, norm)
        mean.add(values)
    return Aggregate(mean.result(), bound, clipped, absorbed(mean.count, "mean", 0))


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

    The mean streams (`WeightedMean`): `replies` may be any re-iterable sequence that yields one reply at a
    time (decoded when asked for, as the strategies' server_app.round.Replies), and the aggregation then holds
    one of them, not all; a one-shot iterator works too (kept whole when norm bounding must read it twice).
    The robust rules hold every reply.
    """
    reference = reference or {}
    if rule in ("trimmed-mean", "trimmed-or-capped"):
        replies = list(replies)  # held whole anyway when it cuts
        rule = round_rule(len(replies), rule, attackers)
    if rule == "capped-mean":  # no reply counts for more than the round's median reply, in norm or in weight
        rule, norm_cap, weights = "mean", 1.0, capped_weights(weights, 1.0)
    if rule == "mean":
        return _mean_round(replies, weights, norm_cap, clip_norm, reference)
    return _aggregate_all(list(replies), weights, rule, attackers, norm_cap, clip_norm, reference)


def _update(reply: Mapping[K, np.ndarray], key: K, shape: tuple[int, ...], reference: Mapping) -> np.ndarray:
    """One key of a reply's update in float64: its value minus the reference (0 where it has none), a zero
    update where the reply has no such key."""
    if key not in reply:
        return np.zeros(shape, np.float64)
    value = np.asarray(reply[key], np.float64)
    return value - reference[key] if key in reference else value


def _aggregate_all(
    replies: list[Mapping[K, Value]],
    weights: Sequence[float],
    rule: str,
    attackers: int,
    norm_cap: float,
    clip_norm: float,
    reference: Mapping[K, Value],
) -> Aggregate:
    """`aggregate_round` with every reply in memory: the robust rules, and the mean as it was computed before
    it streamed (tests/test_streaming.py checks the two means are the same bits)."""
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
    median = None  # the geometric median is of whole updates (absent key: zero update), unweighted
    if rule == "geometric-median":
        median, _ = geometric_median([{k: _update(r, k, s, ref_np) for k, s in keys.items()} for r in clipped])
    out: dict[K, Value] = {}
    for k, shape in keys.items():
        dtype = next(r[k].dtype for r in replies_np if k in r)
        if median is not None:
            ref = np.asarray(ref_np[k], np.float64) if k in ref_np else 0.0
            combined = np.asarray(ref + median[k], dtype=dtype)
        else:
            absent = ref_np[k] if k in ref_np else np.zeros(shape, np.float32)
            values = [np.asarray(r.get(k, absent), dtype=dtype) for r in clipped]
            combined = combine(values, weights, rule, attackers)
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
