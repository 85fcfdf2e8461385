"""common.robust's streaming mean: the same bits as the mean computed with every reply in memory (absent keys,
norm bounding, numpy and torch, late keys, signed zeros), and a peak memory that does not grow with the number
of replies when they are produced one at a time (tracemalloc; numpy, milliseconds)."""

from __future__ import annotations

import tracemalloc
from collections.abc import Sequence

import numpy as np
import pytest
import torch

from common.robust import SELECT_BUFFER, WeightedMean, _aggregate_all, aggregate_round, capped_weights, lower_median
from server_app.base import Picked

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


class Counted(Sequence):
    """Values computed from a function each time they are read (as the norms of lazily decoded replies are),
    counting the readings: what lower_median may hold of them is SELECT_BUFFER, not n."""

    def __init__(self, n: int, value) -> None:
        self.n, self.value, self.readings = n, value, 0

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> float:
        if not 0 <= i < self.n:
            raise IndexError(i)
        return self.value(i)

    def __iter__(self):
        self.readings += 1
        return (self.value(i) for i in range(self.n))


@pytest.mark.parametrize(
    "kind",
    ["normal", "magnitudes", "counts", "equal", "few distinct", "ulps apart", "signed zeros and infinities"],
)
@pytest.mark.parametrize("n", [1, 2, SELECT_BUFFER, SELECT_BUFFER + 1, 5000])
def test_lower_median_selects_the_sorted_value_reading_again(kind, n):
    """The value sorted() picks, however the values lie (the bins are of the floats' bit patterns, so values a
    few ulps apart and values 60 orders of magnitude apart are split alike); one reading up to SELECT_BUFFER
    values, a few beyond (at most ten, when they lie ulps apart)."""
    rng = np.random.default_rng(n)
    values = {
        "normal": rng.standard_normal(n),
        "magnitudes": rng.standard_normal(n) * 10.0 ** rng.integers(-30, 30, n),
        "counts": rng.integers(1, 10**12, n),
        "equal": np.full(n, 700),
        "few distinct": rng.integers(1, 4, n),
        "ulps apart": 1.0 + np.spacing(1.0) * rng.integers(0, 1000, n),
        "signed zeros and infinities": rng.choice([-np.inf, -1.0, -0.0, 0.0, 2.0, np.inf], n),
    }[kind].tolist()
    seq = Counted(n, values.__getitem__)
    assert lower_median(seq) == sorted(values)[(n - 1) // 2]
    assert seq.readings == 1 if n <= SELECT_BUFFER or kind == "equal" else 2 <= seq.readings <= 10
    if kind in ("normal", "magnitudes", "counts"):
        assert seq.readings <= 4  # spread values: the bins of [smallest, largest] split them at once or nearly


def test_lower_median_holds_a_bounded_buffer_and_refuses_a_sequence_that_changes():
    def peak(n: int) -> int:
        seq = Counted(n, lambda i: float((i * 7919) % 1000003))
        tracemalloc.start()
        try:
            lower_median(seq)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    few, many = peak(1000), peak(100_000)
    assert many < few + 4096 and many < 32 * 1024, (few, many)  # holding 100,000 floats: 800 KB at least
    shifting = Counted(1000, lambda i: float(i + 10_000 * shifting.readings))  # other values on every reading
    with pytest.raises(ValueError, match="different values"):
        lower_median(shifting)


def test_capped_weights_are_read_from_the_counts_when_asked():
    counts = Counted(1000, lambda i: 10**12 if i == 3 else 500 + i % 300)
    weights = capped_weights(counts, 4.0)
    eager = [float(min(c, 4.0 * sorted(counts)[499])) for c in counts]
    assert list(weights) == eager and [weights[i] for i in range(1000)] == eager and len(weights) == 1000
    assert weights[3] == weights.limit == 4.0 * sorted(counts)[499] and weights[2:5] == eager[2:5]
    assert list(capped_weights(weights, 1.0)) == [min(w, sorted(eager)[499]) for w in eager]  # capped-mean's


@pytest.mark.parametrize("norm_cap", [0.0, 2.0])
def test_the_streaming_mean_holds_nothing_per_reply_with_lazy_weights(norm_cap):
    """Weights read when asked (capped_weights of counts computed on reading, as the strategies' are): the mean
    is the same bits as with a list of them, and from 300 to 3,000 small replies its peak grows by under 2
    bytes a reply (a list of weights alone would be 8)."""
    lazy_counts = Counted(300, lambda i: 1 + i % 7)
    lazy = aggregate_round(LazyReplies(300, 16), capped_weights(lazy_counts, 4.0), norm_cap=norm_cap)
    eager = aggregate_round(LazyReplies(300, 16), list(capped_weights([1 + i % 7 for i in range(300)], 4.0)))
    if norm_cap == 0.0:
        assert all(np.array_equal(lazy.values[k], eager.values[k]) for k in eager.values)

    def peak(n: int) -> int:
        replies, counts = LazyReplies(n, 16), Counted(n, lambda i: 1 + i % 7)
        tracemalloc.start()
        try:
            aggregate_round(replies, capped_weights(counts, 4.0), norm_cap=norm_cap)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    peak(300)  # the interpreter's free lists filled once
    few, many = peak(300), peak(3000)
    assert (many - few) / 2700 < 2, (few, many)


def test_picked_is_a_view_without_the_skipped_positions():
    items = list(range(10))
    picked = Picked(items, [0, 3, 4, 9])
    assert list(picked) == [1, 2, 5, 6, 7, 8] == [picked[i] for i in range(len(picked))]
    assert picked[-1] == 8 and picked[1:3] == [2, 5] and len(picked) == 6
    assert list(Picked(items, [], lambda x: x * 10)) == [x * 10 for x in items]
    assert list(Picked(items, list(range(10)))) == []
    with pytest.raises(IndexError):
        picked[6]
