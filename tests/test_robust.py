"""common.robust: the mean is the methods' old aggregation, the robust rules on known inputs, weights, clipping."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy.fedtrimmedavg import trim_mean

from common.config import ConfigError, parse_run_config
from common.robust import aggregate, capped_weights, clip, clip_factor, combine

pytestmark = pytest.mark.unit


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
    np.testing.assert_allclose(combine([a, b], [3, 1], "trimmed-mean", 0.2), [2.0, 6.0])  # cuts nothing of 2


def test_trimmed_mean_and_median_on_known_inputs():
    values = [np.array([1.0, -7.0]), np.array([2.0, 0.0]), np.array([3.0, 1.0]), np.array([100.0, 2.0])]
    w = [1.0] * 4
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 0.25), [2.5, 0.5])  # cut 1 each end
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 0.0), [26.5, -1.0])  # cut nothing: the mean
    np.testing.assert_allclose(combine(values, w, "median"), [2.5, 0.5])
    np.testing.assert_allclose(combine(values[:3], w[:3], "median"), [2.0, 0.0])
    stack = np.stack(values)
    np.testing.assert_allclose(combine(values, w, "trimmed-mean", 0.3), trim_mean(stack, 0.3))  # Flower's own
    with pytest.raises(ValueError, match="unknown"):
        combine(values, w, "mode")


def test_weight_cap_is_a_multiple_of_the_lower_median():
    assert capped_weights([700, 710, 10**12], 4.0) == [700.0, 710.0, 2840.0]
    assert capped_weights([700, 10**12], 4.0) == [700.0, 2800.0]  # two replies: the smaller is the median
    assert capped_weights([5], 4.0) == [5.0]
    with pytest.raises(ValueError):
        capped_weights([3, 0], 4.0)


def test_clipping_scales_the_update_not_the_values():
    assert clip_factor(5.0, 0.0) == 1.0 and clip_factor(0.5, 1.0) == 1.0 and clip_factor(5.0, 1.0) == 0.2
    ref = {"w": np.array([10.0, 10.0])}
    out = clip({"w": np.array([13.0, 14.0]), "acc": np.array([0.0])}, 1.0, ref)  # update (3, 4, 0): norm 5
    np.testing.assert_allclose(out["w"], [10.6, 10.8])
    np.testing.assert_allclose(out["acc"], [0.0])
    same = {"w": np.array([10.5, 10.0])}
    assert clip(same, 1.0, ref)["w"] is same["w"]


def test_aggregate_absent_is_a_zero_update_and_kinds_are_kept():
    replies = [{"a": np.array([1.0], np.float32)}, {"a": np.array([2.0], np.float32)}, {}]
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1])["a"], [1.0])  # mean of 1, 2, 0
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1], "median")["a"], [1.0])  # median of 1, 2, 0
    ref = {"a": np.array([5.0], np.float32)}
    np.testing.assert_allclose(aggregate(replies, [1, 1, 1], "median", reference=ref)["a"], [2.0])  # 1, 2, 5
    out = aggregate([{"t": torch.ones(2)}, {"t": torch.full((2,), 3.0)}], [1, 1], clip_norm=1.0)
    assert isinstance(out["t"], torch.Tensor) and out["t"].dtype == torch.float32
    np.testing.assert_allclose(out["t"].numpy(), np.full(2, 2**-0.5))  # both clipped to norm 1 first


def test_aggregation_config_errors_name_the_key():
    assert parse_run_config({"aggregation.rule": "median"}).aggregation.rule == "median"
    for key, value in [
        ("aggregation.rule", "krum"),
        ("aggregation.trim-fraction", 0.5),
        ("aggregation.trim-fraction", -0.1),
        ("aggregation.clip-norm", -1.0),
        ("aggregation.weight-cap", 0.5),
    ]:
        with pytest.raises(ConfigError, match=key):
            parse_run_config({key: value})
