"""FedKRSO mathematics: projections, subspace training, aggregation, apply."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from methods.fedkrso.subspace import (
    Subspaces,
    aggregate,
    apply_update,
    find_targets,
    projection,
    projection_seed,
    round_seeds,
    target_shapes,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.integration
def test_projection_is_deterministic_within_and_across_processes():
    p = projection(1234, "bert.encoder.layer.0.attention.self.query", 8, 384)
    assert p.shape == (8, 384) and p.dtype == torch.float32
    assert torch.equal(p, projection(1234, "bert.encoder.layer.0.attention.self.query", 8, 384))
    code = (
        "import hashlib;from methods.fedkrso.subspace import projection;"
        "print(hashlib.sha256(projection(1234,'bert.encoder.layer.0.attention.self.query',8,384).numpy().tobytes()).hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    import hashlib

    assert other == hashlib.sha256(p.numpy().tobytes()).hexdigest()


@pytest.mark.unit
def test_projection_depends_on_seed_and_name_and_has_variance_one_over_r():
    a = projection(1, "w", 8, 4096)
    assert not torch.equal(a, projection(2, "w", 8, 4096))
    assert not torch.equal(a, projection(1, "v", 8, 4096))
    assert projection_seed(1, "w") != projection_seed(1, "v")
    assert abs(a.var().item() - 1 / 8) < 0.01
    assert round_seeds(0, 3, 4) == round_seeds(0, 3, 4) and round_seeds(0, 3, 4) != round_seeds(0, 4, 4)


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


@pytest.mark.unit
def test_subspace_forward_equals_the_merged_weight_and_forms_no_weight_gradient():
    torch.manual_seed(0)
    net = TwoLayer()
    for p in net.parameters():
        p.requires_grad_(False)
    targets = find_targets(net, "all-linear", exclude=["head"])
    assert list(targets) == ["a", "b"]
    spaces = Subspaces(targets, rank=2)
    bs = spaces.begin(7)
    with torch.no_grad():
        for b in bs:
            b.normal_()
    x = torch.randn(4, 6)
    y_hooked = net(x)
    y_hooked.sum().backward()
    assert all(b.grad is not None for b in bs)
    assert all(m.weight.grad is None for m in targets.values())  # no d_out x d_in gradient
    merged = spaces.merge()
    spaces.remove()
    y_merged = net(x)  # hooks are gone; W now holds W + B P
    torch.testing.assert_close(y_hooked.detach(), y_merged, rtol=0, atol=1e-6)
    for name, mod in targets.items():
        assert merged[name].shape == (mod.out_features, 2)


@pytest.mark.unit
def test_aggregation_equals_the_weighted_mean_of_client_updates():
    torch.manual_seed(1)
    net = TwoLayer()
    targets = find_targets(net, "all-linear", exclude=["head"])
    shapes = target_shapes(targets, 3)
    seeds = [11, 22, 33]
    clients, weights = [], [5.0, 1.0, 2.0]
    for c in range(3):  # client 1 used only seed 0: its other accumulators are absent (= 0)
        used = [0] if c == 1 else [0, 1, 2]
        clients.append({(j, n): torch.randn(*shapes[n]) for j in used for n in targets})
    bbar = aggregate(list(zip(weights, clients, strict=False)), shapes, k=3)

    def update(acc):
        return {
            n: sum(acc[(j, n)] @ projection(s, n, 3, m.in_features) for j, s in enumerate(seeds) if (j, n) in acc)
            for n, m in targets.items()
        }

    total = sum(weights)
    for name in targets:
        expected = sum(w / total * update(acc)[name] for w, acc in zip(weights, clients, strict=False))
        torch.testing.assert_close(update(bbar)[name], expected, rtol=1e-5, atol=1e-6)
    before = {n: m.weight.detach().clone() for n, m in targets.items()}
    apply_update(targets, seeds, bbar, 3)
    for name, mod in targets.items():
        torch.testing.assert_close(mod.weight.detach() - before[name], update(bbar)[name], rtol=1e-5, atol=1e-6)


@pytest.mark.unit
def test_find_targets_by_suffix_and_clear_errors():
    net = TwoLayer()
    assert list(find_targets(net, "b", exclude=["head"])) == ["b"]
    try:
        find_targets(net, "query", exclude=["head"])
    except ValueError as exc:
        assert "query" in str(exc) and "match no linear layer" in str(exc)
    else:
        raise AssertionError("an unmatched target name must be refused")
