"""common.robust: the mean is the methods' old aggregation, the robust rules on known inputs, how many attackers
each rule absorbs, weights, norm bounding relative to the round, and the finiteness check (numpy, milliseconds)."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from common.config import AggregationConfig, ConfigError, parse_run_config
from common.robust import (
    absorbed,
    aggregate,
    aggregate_round,
    capped_weights,
    clip,
    clip_factor,
    combine,
    geometric_median,
    lower_median,
    non_finite,
    norm_bound,
    settings,
    update_norm,
)

pytestmark = pytest.mark.unit

# The bounded mean: rule "mean" at the shipped norm-cap and weight-cap (the zero-order methods' default until the
# adaptive attacks of bench/adaptive.py showed it let a liar of three move a round 3.6x; their default is now the
# capped mean, as the first-order methods' trimmed-or-capped is below 4b replies).
MEAN_DEFAULTS = dataclasses.replace(AggregationConfig(), rule="mean")


def test_mean_is_exactly_the_old_weighted_mean():
    rng = np.random.default_rng(0)
    values = [rng.standard_normal((4, 3)).astype(np.float32) for _ in range(3)]
    weights = [5.0, 1.0, 2.0]
    total = sum(weights)
    old = np.asarray(sum(w / total * v.astype(np.float64) for w, v in zip(weights, values, strict=True)), np.float32)
    out = combine(values, weights)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, old)  # bit for bit: zero-order logs replay these numbers


def test_weights_matter_for_the_mean_only():
    a, b = np.array([0.0, 10.0]), np.array([4.0, 2.0])
    np.testing.assert_allclose(combine([a, b], [3, 1]), [1.0, 8.0])
    np.testing.assert_allclose(combine([a, b], [3, 1], "median"), [2.0, 6.0])  # unweighted, as Flower's FedMedian
    # of 2 replies, b = 2 cannot be cut at each end: the capped mean (weights at most the lower median, 1: equal);
    # b = 0 cuts nothing, unweighted
    np.testing.assert_allclose(combine([a, b], [3, 1], "trimmed-mean", 2), [2.0, 6.0])
    np.testing.assert_allclose(combine([a, b], [3, 1], "capped-mean"), [2.0, 6.0])
    np.testing.assert_allclose(combine([a, b, b], [3, 1, 2], "capped-mean"), [2.4, 5.2])  # weights 2, 1, 2
    np.testing.assert_allclose(combine([a, b], [3, 1], "trimmed-mean", 0), [2.0, 6.0])


def test_trimmed_mean_and_median_on_known_inputs():
    values = [np.array([1.0, -7.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0]), np.array([100.0, 2.0])]
    w = [1.0] * 4
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 1), [2.5, 0.5])  # cut 1 each end
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 0), [26.5, -1.0])  # cut nothing: the mean
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 2), [26.5, -1.0])  # of 4 < 2b + 1: the capped mean
    np.testing.assert_allclose(combine(values, w, "median"), [2.5, 0.5])
    np.testing.assert_allclose(combine(values[:3], w[:3], "median"), [2.0, 0.0])
    np.testing.assert_allclose(combine(values, w, "median"), np.median(np.stack(values), axis=0))
    with pytest.raises(ValueError, match="unknown"):
        combine(values, w, "mode")


def test_how_many_attackers_each_rule_absorbs():
    assert [absorbed(n, "trimmed-mean", 2) for n in (1, 2, 3, 4, 5, 10)] == [0, 0, 0, 0, 2, 2]
    assert [absorbed(n, "trimmed-mean", 1) for n in (1, 2, 3, 4, 10)] == [0, 0, 1, 1, 1]
    # trimmed-or-capped cuts only where it keeps at least half: from 4b replies (b = 1: from 3 = 2b + 1)
    assert [absorbed(n, "trimmed-or-capped", 2) for n in (3, 5, 7, 8, 10)] == [0, 0, 0, 2, 2]
    assert [absorbed(n, "trimmed-or-capped", 1) for n in (2, 3, 4)] == [0, 0, 1]
    assert absorbed(3, "capped-mean", 2) == 0
    assert [absorbed(n, "median", 2) for n in (1, 2, 3, 4, 5, 10)] == [0, 0, 1, 1, 2, 4]
    assert absorbed(10, "mean", 2) == 0
    assert [absorbed(n, "geometric-median", 2) for n in (1, 2, 3, 4, 5, 10)] == [0, 0, 1, 1, 2, 4]


def _distance(a: dict, b: dict) -> float:
    return math.sqrt(sum(float(np.sum((a[k] - b[k]) ** 2)) for k in a))


def test_geometric_median_on_known_inputs():
    # collinear points: the middle one; an equilateral triangle: its centre; a square: its centre
    line = [{"x": np.array([0.0, 0.0])}, {"x": np.array([1.0, 0.0])}, {"x": np.array([10.0, 0.0])}]
    z, _ = geometric_median(line)
    np.testing.assert_allclose(z["x"], [1.0, 0.0], atol=1e-5)
    triangle = [{"x": np.array([math.cos(a), math.sin(a)])} for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    z, _ = geometric_median(triangle)
    np.testing.assert_allclose(z["x"], [0.0, 0.0], atol=1e-9)
    square = [{"x": np.array(p, np.float64), "y": np.array([3.0])} for p in ((0, 0), (0, 2), (2, 0), (2, 2))]
    z, _ = geometric_median(square)
    np.testing.assert_allclose(z["x"], [1.0, 1.0], atol=1e-9)
    np.testing.assert_allclose(z["y"], [3.0])
    z, iterations = geometric_median([{"x": np.array([5.0])}])  # one point, or all equal: that point
    np.testing.assert_array_equal(z["x"], [5.0])
    with pytest.raises(ValueError, match="at least one"):
        geometric_median([])


def test_geometric_median_moves_by_the_honest_spread_not_by_the_outlier():
    """Two honest points and one hostile one: however far the hostile point, the geometric median stays within
    the honest points' distance of their midpoint (a third of it: the Fermat point of a long thin triangle lies
    |AB| / (2 sqrt 3) from AB), where the mean moves by a third of the outlier's distance."""
    rng = np.random.default_rng(3)
    a, b = ({"w": rng.standard_normal(200), "v": rng.standard_normal((3, 4))} for _ in range(2))
    mid = {k: (a[k] + b[k]) / 2 for k in a}
    spread = _distance(a, b)
    for scale in (1e2, 1e6):
        hostile = {k: np.full_like(a[k], scale) for k in a}
        z, _ = geometric_median([a, b, hostile])
        assert _distance(z, mid) <= 0.35 * spread, (scale, _distance(z, mid), spread)
        mean = {k: (a[k] + b[k] + hostile[k]) / 3 for k in a}
        assert _distance(mean, mid) > 10 * spread


def test_geometric_median_rule_through_aggregate_round():
    """The rule takes the geometric median of whole updates (values - reference; an absent key is a zero
    update), unweighted, after norm bounding, and gives back each key in its dtype and kind."""
    rng = np.random.default_rng(4)
    ref = {"w": rng.standard_normal(30).astype(np.float32)}
    honest = [
        {"w": ref["w"] + 0.1 * rng.standard_normal(30).astype(np.float32), "acc": np.ones(5, np.float32)}
        for _ in range(2)
    ]
    hostile = {"w": np.full(30, 1e4, np.float32)}  # no "acc": a zero update there
    out = aggregate_round(honest + [hostile], [1.0, 1.0, 1e12], rule="geometric-median", norm_cap=2.0, reference=ref)
    assert out.clipped == 1 and out.absorbed == 1
    assert out.values["w"].dtype == np.float32 and out.values["acc"].dtype == np.float32
    honest_mid = (honest[0]["w"] + honest[1]["w"]) / 2
    spread = float(np.linalg.norm(honest[0]["w"] - honest[1]["w"]))
    assert float(np.linalg.norm(out.values["w"] - honest_mid)) <= 0.5 * spread
    assert 0.0 < float(out.values["acc"][0]) < 1.0  # pulled toward the absent (zero) update by less than a mean
    torch_out = aggregate_round(
        [{k: torch.from_numpy(v) for k, v in r.items()} for r in honest + [hostile]],
        [1, 1, 1],
        rule="geometric-median",
        reference=ref,
    )
    assert isinstance(torch_out.values["w"], torch.Tensor)


@pytest.mark.parametrize("rule", ["trimmed-mean", "median"])
def test_two_colluders_of_five_stay_within_the_honest_values_at_the_defaults(rule):
    defaults = AggregationConfig()
    rng = np.random.default_rng(1)
    honest = [rng.standard_normal(50).astype(np.float32) for _ in range(3)]
    for colluder in (np.full(50, 1e3, np.float32), np.full(50, -1e3, np.float32)):
        out = combine([*honest, colluder, colluder], [1.0] * 5, rule, defaults.attackers)
        assert np.all(out >= np.min(honest, axis=0)) and np.all(out <= np.max(honest, axis=0))


def test_weight_cap_is_a_multiple_of_the_lower_median():
    assert list(capped_weights([700, 710, 10**12], 4.0)) == [700.0, 710.0, 2840.0]
    assert list(capped_weights([700, 10**12], 4.0)) == [700.0, 2800.0]  # two replies: the smaller is the median
    assert list(capped_weights([5], 4.0)) == [5.0]
    with pytest.raises(ValueError):
        capped_weights([3, 0], 4.0)


def test_lower_median_is_the_sorted_value_itself():
    """lower_median (np.partition of float64): the very value sorted() would pick, for
    floats of any magnitude and for example counts up to 10^12 (exact below 2^53), odd and even counts alike."""
    rng = np.random.default_rng(3)
    for n in (1, 2, 3, 10, 101, 1000):
        floats = list(rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n))
        counts = [int(c) for c in rng.integers(1, 10**12, n)]
        for values in (floats, counts):
            assert lower_median(values) == sorted(values)[(n - 1) // 2]


def test_norm_bound_is_a_multiple_of_the_lower_median_norm():
    assert norm_bound([1.0, 2.0, 1e9], 2.0) == 4.0  # one hostile of three: the lower median is honest
    assert norm_bound([3.0, 1e9], 2.0) == 6.0  # of two, the smaller
    assert norm_bound([1.0, 2.0, 1e9], 2.0, clip_norm=3.0) == 3.0  # both set: the tighter
    assert norm_bound([1.0, 2.0], 0.0, 5.0) == 5.0 and norm_bound([1.0, 2.0], 0.0, 0.0) == math.inf
    assert norm_bound([0.0, 0.0, 1e9], 2.0) == 0.0  # honest updates of zero: the hostile one is cut to zero


def test_clipping_scales_the_update_not_the_values():
    assert clip_factor(5.0, math.inf) == 1.0 and clip_factor(0.5, 1.0) == 1.0 and clip_factor(5.0, 1.0) == 0.2
    assert clip_factor(5.0, 0.0) == 0.0
    ref = {"w": np.array([10.0, 10.0])}
    out = clip({"w": np.array([13.0, 14.0]), "acc": np.array([0.0])}, 1.0, ref)  # update (3, 4, 0): norm 5
    np.testing.assert_allclose(out["w"], [10.6, 10.8])
    np.testing.assert_allclose(out["acc"], [0.0])
    same = {"w": np.array([10.5, 10.0])}
    assert clip(same, 1.0, ref)["w"] is same["w"]
    assert update_norm({"w": np.array([13.0, 14.0]), "acc": np.array([12.0])}, ref) == 13.0


def _round(n_honest, rng, scale=1.0):
    return [{"a": (scale * rng.standard_normal(200)).astype(np.float32)} for _ in range(n_honest)]


def test_all_honest_the_bounded_mean_is_the_weighted_mean_bit_for_bit():
    rng = np.random.default_rng(2)
    replies, weights = _round(10, rng), [float(w) for w in rng.integers(500, 900, 10)]
    result = aggregate_round(replies, weights, **settings(MEAN_DEFAULTS))
    assert result.clipped == 0
    np.testing.assert_array_equal(result.values["a"], combine([r["a"] for r in replies], weights))


@pytest.mark.parametrize("n", [3, 10])
@pytest.mark.parametrize("attack", ["bound", "sign flip"])
def test_one_hostile_reply_moves_the_default_mean_by_its_capped_share_of_norm_cap_median_norms(n, attack):
    """Honest updates of norm ~m (independent directions); the hostile one at the value bound, or an honest one
    turned around and scaled to it, claiming 1e12 examples. At the defaults it counts norm-cap x m at most,
    with weight-cap / (weight-cap + n - 1) of the weight; stated: the aggregate differs from the honest part by
    at most that share x norm-cap x m, and its norm is at most ~2x an honest round's."""
    defaults = MEAN_DEFAULTS
    rng = np.random.default_rng(n)
    honest = _round(n - 1, rng)
    counts = [700] * (n - 1)
    hostile = {"a": np.full(200, 1e3, np.float32)} if attack == "bound" else {"a": -1e3 * honest[0]["a"]}
    weights = capped_weights([*counts, 10**12], defaults.weight_cap)
    result = aggregate_round([*honest, hostile], weights, **settings(defaults))
    m = sorted(update_norm(r, {}) for r in [*honest, hostile])[(n - 1) // 2]
    share = weights[-1] / sum(weights)
    assert share == pytest.approx(defaults.weight_cap / (defaults.weight_cap + n - 1))
    honest_part = sum(w / sum(weights) * r["a"].astype(np.float64) for w, r in zip(weights, honest, strict=False))
    assert np.linalg.norm(result.values["a"] - honest_part) <= share * defaults.norm_cap * m * (1 + 1e-6)
    honest_round = np.linalg.norm(combine([r["a"] for r in honest], counts))
    assert np.linalg.norm(result.values["a"]) <= 2.5 * honest_round
    assert result.clipped == 1


def test_aggregate_absent_is_a_zero_update_and_kinds_are_kept():
    replies = [{"a": np.array([1.0], np.float32)}, {"a": np.array([2.0], np.float32)}, {}]
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1])["a"], [1.0])  # mean of 1, 2, 0
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1], rule="median")["a"], [1.0])  # median of 1, 2, 0
    ref = {"a": np.array([5.0], np.float32)}
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1], rule="median", reference=ref)["a"], [2.0])  # 1, 2, 5
    out = aggregate([{"t": torch.ones(2)}, {"t": torch.full((2,), 3.0)}], [1, 1], clip_norm=1.0)
    assert isinstance(out["t"], torch.Tensor) and out["t"].dtype == torch.float32
    np.testing.assert_allclose(out["t"].numpy(), np.full(2, 2**-0.5))  # both clipped to norm 1 first


def test_non_finite_names_the_key():
    assert non_finite({"a": np.ones(3), "b": torch.zeros(2)}) is None
    assert "b" in non_finite({"a": np.ones(3), "b": np.array([1.0, np.inf])})
    assert "t" in non_finite({"t": torch.tensor([float("nan")])})


def test_aggregation_config_errors_name_the_key():
    assert parse_run_config({"aggregation.rule": "median"}).aggregation.rule == "median"
    assert parse_run_config({"aggregation.norm-cap": 0.0}).aggregation.norm_cap == 0.0  # the plain mean
    for key, value in [
        ("aggregation.rule", "krum"),
        ("aggregation.attackers", -1),
        ("aggregation.norm-cap", 0.5),
        ("aggregation.norm-cap", math.inf),
        ("aggregation.clip-norm", -1.0),
        ("aggregation.weight-cap", 0.5),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_run_config({key: value})


def test_trimmed_mean_below_2b_plus_1_replies_is_the_capped_mean():
    """Too few replies to cut b at each end: no reply counts for more than the median reply, in update norm
    (norm-cap 1, whatever aggregation.norm-cap says) or in weight (weight-cap 1)."""
    rng = np.random.default_rng(3)
    replies = [{"a": rng.standard_normal(8).astype(np.float32)} for _ in range(3)]
    replies.append({"a": np.full(8, 50.0, np.float32)})  # clipped to the median norm
    weights = [1.0, 2.0, 3.0, 4.0]
    tm = aggregate_round(replies, weights, rule="trimmed-mean", attackers=2, norm_cap=2.0)
    capped = aggregate_round(replies, [1.0, 2.0, 2.0, 2.0], rule="mean", norm_cap=1.0)
    np.testing.assert_array_equal(tm.values["a"], capped.values["a"])
    assert (tm.clipped, tm.absorbed) == (2, 0)  # the largest honest norm and the hostile one
    for rule in ("trimmed-or-capped", "capped-mean"):
        same = aggregate_round(replies, weights, rule=rule, attackers=2, norm_cap=2.0)
        np.testing.assert_array_equal(same.values["a"], capped.values["a"])
    five = aggregate_round([*replies, replies[0]], [1.0] * 5, rule="trimmed-mean", attackers=2, norm_cap=2.0)
    assert five.absorbed == 2
    assert aggregate_round([*replies, replies[0]], [1.0] * 5, rule="trimmed-or-capped", attackers=2).absorbed == 0
    assert five.absorbed == 2
