"""common.rng: the laws of the draws, and the same bits on every CPU capability (aarch64: tests/test_arm64.py)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from common import rng
from methods.fedkrso.subspace import projection
from scripts.rng_draws import draws

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def ks_statistic(x: torch.Tensor, cdf) -> float:
    """sup |F_n - F| of a sample against a continuous CDF."""
    xs = x.double().sort().values
    n = xs.numel()
    f = cdf(xs)
    i = torch.arange(1, n + 1, dtype=torch.float64)
    return float(torch.maximum(i / n - f, f - (i - 1) / n).max())


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1 + torch.erf(x / math.sqrt(2)))


@pytest.mark.unit
def test_log_is_accurate_over_the_whole_range():
    x = torch.cat(
        [
            torch.tensor([10.0 ** (k / 100) for k in range(-30_000, 30_001, 3)], dtype=torch.float64),
            1 + torch.linspace(-1e-3, 1e-3, 2001, dtype=torch.float64),
            torch.tensor(
                [math.sqrt(0.5), math.nextafter(math.sqrt(0.5), 0), 0.5, 1.0, 2.0, 2.0**-1022, 1 - 2**-53],
                dtype=torch.float64,
            ),
        ]
    )
    got = rng.log_(x.clone())
    want = torch.tensor([math.log(v) for v in x.tolist()], dtype=torch.float64)
    assert torch.all((got - want).abs() <= 1e-13 * want.abs() + 1e-300)
    with pytest.raises(TypeError):
        rng.log_(torch.ones(3))


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    return rng.normal((1_000_003,), rng.generator("test", 1)).double()  # many batches of the polar method


@pytest.mark.unit
def test_normal_moments_and_tails(gaussian):
    z, n = gaussian, gaussian.numel()
    c = z - z.mean()
    # each bound is about 5 standard errors of the statistic under N(0, 1)
    assert abs(float(z.mean())) < 5 / math.sqrt(n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float((c**3).mean())) < 5 * math.sqrt(15 / n)
    assert abs(float((c**4).mean()) - 3) < 5 * math.sqrt(96 / n)
    tail = float((z.abs() > 3).double().mean())  # 0.0027 for N(0, 1)
    assert abs(tail - 0.0026998) < 5 * math.sqrt(0.0027 / n)
    assert torch.isfinite(z).all() and float(z.abs().max()) < 7


@pytest.mark.unit
def test_normal_passes_kolmogorov_smirnov(gaussian):
    # D sqrt(n) > 1.95 has probability 0.001 under the null hypothesis
    assert ks_statistic(gaussian, normal_cdf) * math.sqrt(gaussian.numel()) < 1.95
    # and a shifted or scaled law is rejected: the test can fail
    assert ks_statistic(gaussian * 1.01, normal_cdf) * math.sqrt(gaussian.numel()) > 1.95


@pytest.mark.unit
def test_successive_normals_are_independent(gaussian):
    z, n = gaussian, gaussian.numel()
    for lag in (1, 2, 3):  # lag 1 pairs the two outputs of one polar pair, half the time
        for f in (lambda t: t, lambda t: t * t - 1, lambda t: t.abs() - math.sqrt(2 / math.pi)):
            a, b = f(z[:-lag]), f(z[lag:])
            r = float(((a - a.mean()) * (b - b.mean())).mean() / (a.std() * b.std()))
            assert abs(r) < 5 / math.sqrt(n), (lag, r)


@pytest.mark.unit
def test_draws_depend_only_on_the_generator_state_not_on_threads():
    a = rng.normal((70_001,), rng.generator(1, "w"))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        b = rng.normal((70_001,), rng.generator(1, "w"))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a, b) and a.dtype == torch.float32
    assert not torch.equal(a, rng.normal((70_001,), rng.generator(1, "v")))
    assert torch.equal(rng.normal((3, 5), rng.generator(9)).flatten(), rng.normal((15,), rng.generator(9)))
    d = rng.normal((1000,), rng.generator(9), dtype=torch.float64)
    assert d.dtype == torch.float64 and torch.equal(d.float(), rng.normal((1000,), rng.generator(9)))
    with pytest.raises(ValueError, match="contiguous"):
        rng.normal_(torch.empty(4, 4).t(), rng.generator(9))


@pytest.mark.unit
def test_uniform_law():
    x = rng.uniform((500_000,), rng.generator("u"), -2.0, 3.0).double()
    n = x.numel()
    assert float(x.min()) >= -2 and float(x.max()) < 3
    assert abs(float(x.mean()) - 0.5) < 5 * 5 / math.sqrt(12 * n)
    assert abs(float(x.var()) - 25 / 12) < 0.02
    assert ks_statistic(x, lambda t: (t + 2) / 5) * math.sqrt(n) < 1.95


@pytest.mark.unit
def test_rademacher_signs():
    for m in (64, 67, 200_003):
        out = torch.empty(m)
        z = rng.rademacher_(out, rng.generator("r", m))
        assert z is out and set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 5 / math.sqrt(z.numel())
    r = float((z[:-1] * z[1:]).mean())
    assert abs(r) < 5 / math.sqrt(z.numel())
    # whole bytes or not, the first signs are the same stream
    assert torch.equal(
        rng.rademacher_(torch.empty(67), rng.generator(5))[:64], rng.rademacher_(torch.empty(64), rng.generator(5))
    )


@pytest.mark.unit
def test_projection_has_entries_of_variance_one_over_r_and_is_isotropic():
    r, d_in, seeds = 8, 64, 2000
    pts = torch.zeros(d_in, d_in, dtype=torch.float64)
    ppt = torch.zeros(r, r, dtype=torch.float64)
    entries = []
    for s in range(seeds):
        p = projection(s, "w", r, d_in).double()
        pts += p.T @ p
        ppt += p @ p.T
        entries.append(p.flatten())
    e = torch.cat(entries)
    assert abs(float(e.mean())) < 5 / math.sqrt(r * e.numel())
    assert abs(float(e.var()) * r - 1) < 5 * math.sqrt(2 / e.numel())
    pts /= seeds
    ppt /= seeds
    # E[P^T P] = I_{d_in} (diagonal: chi^2_r / r, sd sqrt(2/r) per draw); E[P P^T] = (d_in / r) I_r
    assert float((pts.diagonal() - 1).abs().max()) < 5 * math.sqrt(2 / r / seeds)
    off = pts - torch.diag(pts.diagonal())
    assert float(off.abs().max()) < 5.5 * math.sqrt(1 / r / seeds)
    assert float((ppt.diagonal() / (d_in / r) - 1).abs().max()) < 5 * math.sqrt(2 / d_in / seeds)
    assert ks_statistic(e * math.sqrt(r), normal_cdf) * math.sqrt(e.numel()) < 1.95


def _draws_in_subprocess(env: dict[str, str], model_dir: str) -> dict[str, str]:
    out = subprocess.run(
        [sys.executable, "-m", "scripts.rng_draws", model_dir],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


@pytest.mark.integration
def test_draws_are_bit_identical_across_cpu_capabilities(tiny_bert):
    """FedKRSO's P, z of both laws, replay, TT and LoRA init and the head: the same SHA-256 here, with the AVX2
    kernels and with torch's portable (aarch64-like) ones; torch.randn, the control, differs where it can."""
    here = draws(tiny_bert)
    capability = torch.backends.cpu.get_cpu_capability()
    for cap in ("default", "avx2"):
        other = _draws_in_subprocess({"ATEN_CPU_CAPABILITY": cap}, tiny_bert)
        assert set(other) == set(here)
        diff = [k for k in here if not k.startswith("control:") and here[k] != other[k]]
        assert not diff, f"draws differ between {capability} and ATEN_CPU_CAPABILITY={cap}: {diff}"
        if cap == "default" and capability != "DEFAULT":
            # the control: torch's own Gaussian kernel does differ, so this comparison can see a difference
            assert here["control:torch.randn"] != other["control:torch.randn"]
