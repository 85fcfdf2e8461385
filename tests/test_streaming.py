"""common.robust's streaming mean: the same bits as the mean computed with every reply in memory (absent keys,
norm bounding, numpy and torch, late keys, signed zeros), and a peak memory that does not grow with the number
of replies when they are produced one at a time (tracemalloc; numpy, milliseconds)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from common.robust import WeightedMean, _aggregate_all, aggregate_round, capped_weights

pytestmark = pytest.mark.unit


def same_bits(a: dict, b: dict) -> None:
    assert list(a) == list(b)  # keys in the order of their first appearance
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert type(a[k]) is type(b[k]) and x.dtype == y.dtype and x.shape == y.shape, k
        assert x.tobytes() == y.tobytes(), k  # bit for bit, the sign of zero included


def random_round(seed: int, n: int, absent: float = 0.3):
    """n replies over keys a, b, c (some absent, "c" first seen late), a reference for a and b, integer
    example counts, updates of spread-out norms."""
    rng = np.random.default_rng(seed)
    shapes = {"a": (5, 3), "b": (7,), "c": (2, 2)}
    reference = {k: rng.standard_normal(shapes[k]).astype(np.float32) for k in ("a", "b")}
    replies = []
    for i in range(n):
        scale = float(rng.choice([0.1, 1.0, 10.0]))
        reply = {}
        for k, shape in shapes.items():
            if (k == "c" and i < n // 2) or rng.random() < absent:
                continue
            reply[k] = (reference.get(k, 0) + scale * rng.standard_normal(shape)).astype(np.float32)
        replies.append(reply)
    weights = [int(w) for w in rng.integers(1, 500, n)]
    return replies, weights, reference


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("bounds", [(0.0, 0.0), (2.0, 0.0), (1.0, 0.0), (0.0, 3.0), (2.0, 5.0)])
def test_streaming_mean_is_the_in_memory_mean_bit_for_bit(seed, bounds):
    norm_cap, clip_norm = bounds
    replies, weights, reference = random_round(seed, 3 + 4 * seed)
    kwargs = {"norm_cap": norm_cap, "clip_norm": clip_norm, "reference": reference}
    old = _aggregate_all(replies, weights, "mean", 0, **kwargs)
    new = aggregate_round(replies, weights, "mean", **kwargs)
    same_bits(new.values, old.values)
    assert (new.bound, new.clipped, new.absorbed) == (old.bound, old.clipped, old.absorbed)
    if norm_cap == 1.0:
        assert new.clipped > 0  # the bound bites, so clipping is compared too
    once = aggregate_round(iter(replies), weights, "mean", **kwargs)  # a one-shot iterator, read twice
    same_bits(once.values, old.values)


def test_absent_keys_are_the_reference_and_late_keys_get_the_earlier_replies():
    ref = {"w": np.array([1.0, 2.0], np.float32)}
    replies = [{}, {"u": np.array([3.0], np.float32)}, {"w": np.array([3.0, 4.0], np.float32)}]
    out = aggregate_round(replies, [1, 1, 2], reference=ref).values
    assert list(out) == ["u", "w"]
    np.testing.assert_allclose(out["w"], [(1 + 1 + 2 * 3) / 4, (2 + 2 + 2 * 4) / 4])
    np.testing.assert_allclose(out["u"], [3 / 4])  # absent and unreferenced: 0
    same_bits(out, _aggregate_all(replies, [1, 1, 2], "mean", 0, 0.0, 0.0, ref).values)


def test_signed_zeros_and_dtypes_are_kept():
    replies = [{"z": np.array([-0.0, 1.0], np.float32)}, {"z": np.array([-0.0, 2.0], np.float64)}]
    out = aggregate_round(replies, [1.0, 3.0]).values
    same_bits(out, _aggregate_all(replies, [1.0, 3.0], "mean", 0, 0.0, 0.0, {}).values)
    assert out["z"].dtype == np.float32  # the dtype of the key's first appearance
    half = [{"h": np.array([0.5, -0.25], np.float16)}, {"h": np.array([0.75, 0.0], np.float16)}]
    same_bits(aggregate_round(half, [2, 1]).values, _aggregate_all(half, [2, 1], "mean", 0, 0.0, 0.0, {}).values)


def test_torch_in_torch_out():
    replies, weights, reference = random_round(7, 6)
    as_torch = [{k: torch.from_numpy(v) for k, v in r.items()} for r in replies]
    ref_torch = {k: torch.from_numpy(v) for k, v in reference.items()}
    new = aggregate_round(as_torch, weights, norm_cap=2.0, reference=ref_torch).values
    old = _aggregate_all(as_torch, weights, "mean", 0, 2.0, 0.0, ref_torch).values
    assert all(isinstance(v, torch.Tensor) for v in new.values())
    same_bits(new, old)


def test_weighted_mean_by_hand_and_its_errors():
    mean = WeightedMean([1, 3])
    mean.add({"x": np.array([4.0], np.float32)})
    mean.add({"x": torch.tensor([8.0])})
    out = mean.result()
    assert isinstance(out["x"], torch.Tensor) and float(out["x"][0]) == 7.0
    short = WeightedMean([1])
    short.add({"x": np.zeros(1)})
    with pytest.raises(ValueError, match="2 values but 1 weights"):
        short.add({"x": np.zeros(1)})
    with pytest.raises(ValueError, match="2 values but 3 weights"):
        aggregate_round([{"x": np.zeros(1)}] * 2, [1, 1, 1])
    with pytest.raises(ValueError, match="positive sum"):
        aggregate_round([{"x": np.zeros(1)}] * 2, [0, 0])
    assert aggregate_round([], []).values == {}


class LazyReplies(Sequence):
    """n replies of `size` float32 numbers each, made when asked for (as decoding a message would) and not
    kept: what a server holding one reply at a time sees."""

    def __init__(self, n: int, size: int) -> None:
        self.n, self.size = n, size

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < self.n:
            raise IndexError(i)
        rng = np.random.default_rng(i)
        return {"w": rng.standard_normal(self.size, dtype=np.float32), "b": rng.standard_normal(8, dtype=np.float32)}


def peak_bytes(n: int, size: int, **kwargs) -> int:
    replies = LazyReplies(n, size)
    tracemalloc.start()
    try:
        aggregate_round(replies, [1.0 + i % 7 for i in range(n)], **kwargs)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("norm_cap", [0.0, 2.0])
def test_peak_memory_does_not_grow_with_the_number_of_lazy_replies(norm_cap):
    size = 50_000  # 200 KB a reply
    few, many = peak_bytes(4, size, norm_cap=norm_cap), peak_bytes(64, size, norm_cap=norm_cap)
    assert many < 1.3 * few, (few, many)
    assert many < 10 * 4 * size  # a few replies' worth, where holding them all would be 64
    # the rule that cannot stream holds all of them
    assert peak_bytes(64, size, rule="median") > 64 * 4 * size


def test_capped_weights_are_the_counts_capped_at_a_multiple_of_their_median():
    counts = [10**12 if i == 3 else 500 + i % 300 for i in range(1000)]
    weights = capped_weights(counts, 4.0)
    limit = 4.0 * sorted(counts)[499]
    assert list(weights) == [float(min(c, limit)) for c in counts] and weights[3] == limit
    assert weights.dtype == np.float64  # 8 bytes a reply
    assert list(capped_weights(weights, 1.0)) == [min(w, sorted(weights)[499]) for w in weights]  # capped-mean's


@pytest.mark.parametrize("norm_cap", [0.0, 2.0])
def test_the_streaming_mean_holds_a_few_numbers_per_reply(norm_cap):
    """From 300 to 3,000 small lazily made replies the streaming mean's peak grows by the weights and the norms
    (float64 arrays, and the norms' copy while their median is taken: 24 bytes a reply, under 32), not by the
    replies' arrays."""

    def peak(n: int) -> int:
        replies, counts = LazyReplies(n, 16), [1 + i % 7 for i in range(n)]
        tracemalloc.start()
        try:
            aggregate_round(replies, capped_weights(counts, 4.0), norm_cap=norm_cap)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(300)  # the interpreter's free lists filled once
    few, many = peak(300), peak(3000)
    assert (many - few) / 2700 < 32, (few, many)
