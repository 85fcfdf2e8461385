"""Seeded draws that every node reproduces on its own, bit for bit on every CPU.

A fleet mixes x86_64 servers and aarch64 nodes (Raspberry Pi, Jetson). torch's own Gaussian kernel
(`torch.randn`, `normal_`) turns its uniform bits into normals with vectorised log/cos kernels whose last bit
depends on the CPU's SIMD capability (AVX512, AVX2, NEON/SVE, none): the same seed gives different numbers on an
x86_64 server and an aarch64 node (docs/fleet.md; FedKRSO's P differed in 37% of its entries). Integer
draws agree everywhere (the Mersenne Twister and its integer transforms run serially in integer arithmetic).

So every draw that nodes must agree on goes through this module: integer bits from torch's CPU generator, turned
into numbers with IEEE operations that are correctly rounded (add, sub, mul, div, sqrt and exact bit/exponent
manipulation), each as its own tensor op so that no compiler can contract a multiply and an add into an FMA
differently on another CPU. No transcendental kernel is called: the logarithm is our own (exponent from the
bits, an atanh series for the mantissa), in float64.

- `normal`: N(0, 1) by the Marsaglia polar method. u, v uniform on (-1, 1) from 31 bits each (one 63-bit draw
  per pair), s = u^2 + v^2, pairs with s >= 1 rejected, then z = (u, v) * sqrt(-2 ln(s) / s), in float64, cast
  to the output dtype. Rejection consumes a variable number of draws: the batches are sized by a fixed rule of
  how many numbers are still missing, so the stream is the same on every node whatever its thread count.
- `uniform`: U[low, high) from 53 bits per number (exact in float64), then one mul and one add.
- `rademacher`: ±1 signs from random bytes (8 signs per byte), a table lookup: exact by construction.

The generator is a plain `torch.Generator` on the CPU (`generator(*parts)`: seeded from `derive_seed(*parts)`),
so a node can keep one and reseed it, as the zero-order perturbations do per (seed, parameter name).
"""

from __future__ import annotations

import math

import torch

from common.seeds import derive_seed

_LN2 = math.log(2.0)  # the float64 nearest ln 2 (a constant: the same bits on every machine)
_SQRT_HALF = math.sqrt(0.5)
# ln m = 2 atanh(f) = 2 (f + f^3/3 + f^5/5 + ...), f = (m - 1) / (m + 1): terms up to f^15. |f| <= 3 - 2 sqrt(2)
# = 0.172, so the first term left out is below 4e-14 |f|: far below the float32 rounding of the draws.
_ATANH_COEFFS = [1.0 / (2 * k + 1) for k in range(8)]
_U31 = 2.0**-30  # u = (k + 1/2) 2^-30 - 1 for k in [0, 2^31): uniform on (-1, 1), exact, never 0 or ±1
_U31_OFFSET = 2.0**-31 - 1.0
_U53 = 2.0**-53
_CHUNK = 1 << 15  # pairs per batch of the polar method: the working set stays in cache

# Row b holds the 8 signs encoded by the bits of byte b (bit i -> +1 if set, else -1).
_SIGNS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).to(torch.float32).mul_(2).sub_(1)


def generator(*parts: object) -> torch.Generator:
    """A CPU generator seeded from `derive_seed(*parts)` (e.g. generator("head", run_seed))."""
    return torch.Generator(device="cpu").manual_seed(derive_seed(*parts))


def _bits63(n: int, gen: torch.Generator) -> torch.Tensor:
    """n integers uniform on [0, 2^63): one 64-bit Mersenne Twister draw each (serial, integer: the same
    stream on every CPU and thread count)."""
    return torch.empty(n, dtype=torch.int64).random_(generator=gen)


def log_(x: torch.Tensor) -> torch.Tensor:
    """Natural logarithm of positive, finite, normal float64 values, with correctly rounded operations only
    (x is consumed: the result may be written into its memory).

    x = m 2^e with m in [sqrt(1/2), sqrt(2)) (torch.frexp, exact, then an exact doubling if m < sqrt(1/2));
    ln x = e ln 2 + 2 atanh(f), f = (m - 1) / (m + 1) (m - 1 exact), the series by Horner's rule in f^2.
    Relative error below 1e-13; the same bits on every CPU.
    """
    if x.dtype != torch.float64:
        raise TypeError("rng.log_ works in float64")
    m, e = torch.frexp(x)  # m in [0.5, 1)
    low = m < _SQRT_HALF
    m.add_(m * low)  # m <- 2m where m < sqrt(1/2): exact
    ln2e = e.sub_(low.to(e.dtype)).to(torch.float64).mul_(_LN2)
    f = m - 1.0
    f.div_(m.add_(1.0))
    f2 = f * f
    acc = torch.full_like(f2, _ATANH_COEFFS[-1])
    for c in reversed(_ATANH_COEFFS[:-1]):
        acc.mul_(f2).add_(c)
    acc.mul_(f).mul_(2.0)
    return acc.add_(ln2e)


def normal_(out: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Fill the contiguous floating tensor `out` with N(0, 1) draws (Marsaglia polar method), in place.

    Per pair: one 63-bit draw k gives u (bits 0-30) and v (bits 32-62), uniform on (-1, 1); s = u^2 + v^2;
    pairs with s >= 1 are rejected; z = (u, v) sqrt(-2 ln s / s) [Marsaglia & Bray 1964], in float64, then
    rounded to `out`'s dtype. The batch sizes depend only on how many numbers are still missing, so the values
    depend only on the generator state and numel: identical on every CPU and thread count.
    """
    if not out.is_contiguous() or not out.is_floating_point() or out.device.type != "cpu":
        raise ValueError("rng.normal_ fills a contiguous floating-point CPU tensor")
    flat = out.view(-1)
    n = flat.numel()
    have = 0
    while have < n:
        need = n - have
        # pairs in this batch: ~need / (2 pi/4) plus a margin, so that one batch almost always suffices
        pairs = min(_CHUNK, (need + 1) // 2 * 4 // 3 + 32)
        k = _bits63(pairs, gen)
        u = (k & 0x7FFFFFFF).to(torch.float64).mul_(_U31).add_(_U31_OFFSET)
        v = (k >> 32).to(torch.float64).mul_(_U31).add_(_U31_OFFSET)
        s = u * u
        s.add_(v * v)
        keep = s < 1.0
        u, v, s = u[keep], v[keep], s[keep]
        factor = log_(s.clone()).mul_(-2.0).div_(s).sqrt_()
        z = torch.stack((u.mul_(factor), v.mul_(factor)), dim=1).view(-1)
        take = min(need, z.numel())
        flat[have : have + take] = z[:take]
        have += take
    return out


def normal(
    shape: tuple[int, ...] | torch.Size, gen: torch.Generator, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """A new tensor of N(0, 1) draws (see `normal_`)."""
    return normal_(torch.empty(tuple(shape), dtype=dtype), gen)


def uniform(
    shape: tuple[int, ...] | torch.Size,
    gen: torch.Generator,
    low: float = 0.0,
    high: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """U[low, high) draws of `shape` (53 bits each, in float64, cast to `dtype`), identical on every CPU."""
    n = math.prod(shape)
    x = (_bits63(n, gen) >> 10).to(torch.float64) * _U53  # [0, 1), exact
    x = x * (float(high) - float(low))
    x = x + float(low)
    return x.to(dtype).view(tuple(shape))


def rademacher_(out: torch.Tensor, gen: torch.Generator, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Fill the contiguous float32 tensor `out` with ±1 signs (probability 1/2 each), one random byte per 8.

    `scratch` (uint8, at least ceil(numel / 8) + 1 bytes) and an `out` with room for whole bytes avoid
    allocations in hot loops; the values depend only on the generator state and numel.
    """
    m = out.numel()
    k = (m + 7) // 8
    by = (scratch[:k] if scratch is not None else torch.empty(k, dtype=torch.uint8)).random_(0, 256, generator=gen)
    flat = out.view(-1)
    if m == 8 * k:
        torch.index_select(_SIGNS, 0, by.long(), out=flat.view(k, 8))
    else:
        flat.copy_(torch.index_select(_SIGNS, 0, by.long()).view(-1)[:m])
    return out
