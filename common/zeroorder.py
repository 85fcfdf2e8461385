"""Zero-order (SPSA / MeZO) mathematics shared by FedSPZO and FedKSeed: seeded perturbations, in place.

The two-sided estimate of the directional derivative along a perturbation z drawn from a seed:

    g = [L(θ + εz) − L(θ − εz)] / (2ε),        update  θ ← θ − η·g·z

runs in place in fp32, without a copy of the parameters and without autograd:

    θ += εz;  L+ = L(θ);  θ −= 2εz;  L− = L(θ);  θ += (ε − η·g)·z     (restore and update in one pass)

z is regenerated from its seed at each use, one tensor at a time (memory: one buffer the size of the
largest tensor), from a CPU generator seeded by (seed, parameter name), through common.rng, so every node
draws the same z, bit for bit, whatever its CPU (x86_64 or aarch64, any SIMD capability) or thread count;
θ + α·z is a multiply then an add (never a fused multiply-add), so replayed parameters agree bit for bit too.
A node that replays the update θ ← θ − η·g·z needs only (seed, g).

Distributions (`zo.distribution`): "rademacher" (default; z_i = ±1 with probability 1/2) or "gaussian"
(z_i ~ N(0, 1)). Both have E[z zᵀ] = I, so E[g·z] is the gradient (of the ε-smoothed loss for Gaussian,
to O(ε²) for Rademacher): the estimator stays unbiased. Rademacher signs cost one random byte per 8
parameters (a table lookup turns each byte into 8 signs), about 30x cheaper to draw than common.rng's
CPU-independent Gaussians (docs/results-rng.md, `python -m scripts.rng_report`), which keeps drawing a small
part of a step's time.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common import rng
from common.configchecks import ZO_PARAMS
from common.modeling import LoadedModel
from common.precision import train_in_float32
from common.runmodel import load_run_model
from common.seeds import derive_seed

DISTRIBUTIONS = ("rademacher", "gaussian")


def zo_parameters(
    model: nn.Module,
    perturb_embeddings: bool,
    subset: str = "all",
    head: tuple[str, ...] = (),
    lm_head: tuple[str, ...] = (),
) -> dict[str, torch.Tensor]:
    """The parameters zero-order training perturbs (`zo.params`):

    - "all": every parameter except the embedding tables (unless `perturb_embeddings`). Embedding tables
      (token, position, token-type) are half of MiniLM's 22.7M numbers, and a batch touches a few rows of
      them: perturbing them adds variance to every estimate for little signal. A decoder's LM head (`lm_head`:
      its module names; often the token table itself, tied) is such a table too: a label-word classifier
      reads a few of its rows.
    - "bitfit": the biases, the normalisation weights and the classification head (`head`: its module
      names) only, as MeZO's parameter-efficient variants do. The estimate's noise grows with the number of
      perturbed numbers (E|g z|² ≈ d |∇L|²): 11M for "all" on MiniLM against about 31K here.
    - "head": the classification head only.
    """
    if subset not in ZO_PARAMS:
        raise ValueError(f"zo.params '{subset}' is unknown; choose one of: {', '.join(ZO_PARAMS)}")
    tables = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    tables |= {id(p) for n, m in model.named_modules() if n in lm_head for p in m.parameters()}
    norms = {id(p) for m in model.modules() if "norm" in type(m).__name__.lower() for p in m.parameters(False)}

    def in_head(name: str) -> bool:
        return any(name == h or name.startswith(h + ".") for h in head)

    params: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if subset == "all":
            keep = perturb_embeddings or id(p) not in tables
        elif subset == "bitfit":
            keep = in_head(name) or name.endswith(".bias") or id(p) in norms
        else:
            keep = in_head(name)
        if keep:
            params[name] = p
    return params


class Perturbation:
    """θ ← θ + α·z(seed) over a fixed set of named parameters, z drawn per tensor from (seed, name)."""

    def __init__(self, params: Mapping[str, torch.Tensor], distribution: str = "rademacher") -> None:
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"zo.distribution '{distribution}' is unknown; choose one of: {', '.join(DISTRIBUTIONS)}")
        if not params:
            raise ValueError("nothing to perturb: the parameter set is empty")
        self.params = dict(params)
        self.distribution = distribution
        largest = max(p.numel() for p in self.params.values())
        self._z = torch.empty(largest + 8, dtype=torch.float32)  # +8: Rademacher fills whole bytes
        self._bytes = torch.empty(largest // 8 + 1, dtype=torch.uint8)
        self._gen = torch.Generator(device="cpu")
        self.seconds = 0.0  # time spent drawing and applying perturbations (for the benchmark)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params.values())

    def z(self, seed: int, name: str) -> torch.Tensor:
        """z for one parameter (a view of an internal buffer: valid until the next call)."""
        p = self.params[name]
        m = p.numel()
        self._gen.manual_seed(derive_seed(int(seed), name))
        if self.distribution == "gaussian":
            z = rng.normal_(self._z[:m], self._gen)
        else:
            z = rng.rademacher_(self._z[: 8 * ((m + 7) // 8)], self._gen, self._bytes)[:m]
        return z.view(p.shape)

    @torch.no_grad()
    def add(self, seed: int, alpha: float) -> None:
        """θ += α·z(seed), tensor by tensor."""
        start = time.perf_counter()
        for name, p in self.params.items():
            # α·z first, then θ + (α·z): two correctly rounded operations, never a fused multiply-add (which
            # some CPUs' kernels use and others do not), so every node's θ has the same bits.
            z = self.z(seed, name).mul_(alpha)
            p.add_(z if p.device.type == "cpu" else z.to(p.device))
        self.seconds += time.perf_counter() - start


@torch.no_grad()
def spsa_step(pert: Perturbation, seed: int, eps: float, step: float, loss) -> tuple[float, float]:
    """One two-sided estimate along z(seed) and its update θ ← θ − step·g·z, in place; returns (g, mean loss).

    `loss()` evaluates the current parameters. `step` is η (divided by the number of perturbations that
    share a step). Replay of this update is `pert.add(seed, -step * g)` with the same g.
    """
    pert.add(seed, eps)
    plus = loss()
    pert.add(seed, -2.0 * eps)
    minus = loss()
    g = float(np.float32((plus - minus) / (2.0 * eps)))  # the fp32 value that goes on the wire and is replayed
    if not math.isfinite(g):  # a diverged loss: restore and skip this estimate rather than corrupt θ
        pert.add(seed, eps)
        return 0.0, float("nan")
    pert.add(seed, eps - step * g)
    return g, (plus + minus) / 2.0


def aggregate_scalars(weights: Sequence[float], scalars: Sequence[np.ndarray]) -> np.ndarray:
    """Example-weighted mean of the clients' scalar arrays (same shape), in float64, returned as float32:
    the float32 values are what the log holds, so server and clients replay the same numbers. (common.robust's
    mean; the server calls common.robust.aggregate with the run's rule and clipping.)"""
    from common.robust import combine

    return combine([np.asarray(s, np.float32) for s in scalars], list(weights))


@dataclass
class ModelCalls:
    """A client's forward passes in its local training, by what each ran: the whole network, block 1 only
    (h0, stopped at the split) or block 2 only (on a cached h0); common.split. Their costs differ (block 2
    is the last transformer block and the head by default), so they are counted apart, and the records keep
    all three for the accuracy-against-compute comparison."""

    full: int = 0
    block1: int = 0
    block2: int = 0

    @property
    def total(self) -> int:
        return self.full + self.block1 + self.block2

    def metrics(self) -> dict[str, int]:
        """The reply's metrics (common.wire.METRIC_BOUNDS): forward-passes is every model call of any kind."""
        return {
            "forward-passes": self.total,
            "full-passes": self.full,
            "block1-passes": self.block1,
            "block2-passes": self.block2,
        }


def mean_loss(losses: list[float]) -> float:
    """Mean training loss of the estimates that were applied (skipped, diverged ones are NaN)."""
    kept = [x for x in losses if math.isfinite(x)]
    return sum(kept) / len(kept) if kept else float("nan")


def fingerprint(cfg, method: str) -> str:
    """What a node's stored zero-order state depends on: a state saved under another setting is not reused."""
    key = json.dumps(
        [
            method,
            cfg.model,
            cfg.task,
            cfg.seed,
            cfg.zo.perturb_embeddings,
            cfg.zo.params,
            cfg.head.pooling,
            cfg.head.init,
        ]
    )
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@dataclass
class ZoModel:
    """A model prepared for zero-order training: eval mode (no dropout: both passes of an estimate must see
    the same function), no gradients, and the parameters it perturbs."""

    loaded: LoadedModel
    params: dict[str, torch.Tensor]


def load_zo_model(cfg) -> ZoModel:
    loaded = load_run_model(cfg)
    loaded.model.eval()
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    if cfg.zo.params == "head" and not loaded.head:
        raise ValueError(
            "zo.params = 'head' perturbs a new classification head, and this run scores label words with the "
            "decoder's own LM head (head.kind = 'lm'): use zo.params = 'bitfit' or 'all', or head.kind = 'classifier'"
        )
    params = zo_parameters(loaded.model, cfg.zo.perturb_embeddings, cfg.zo.params, loaded.head, loaded.lm_head)
    train_in_float32(params.values())  # perturbed in place and restored exactly: float32 (common/precision.py)
    return ZoModel(loaded, params)
