"""FedKSeed mathematics (the zero-order reference): K candidate seeds, scalars accumulated per seed.

FedKSeed (Qin et al., ICML 2024, ../shared/docs/methods.md). K candidate seeds s_0..s_{K-1} are fixed
for the run (derived from the run seed, so they never travel). Each local step draws P whole-model
perturbations, each with a candidate index j picked uniformly at random, and applies the two-sided
estimate in place (common.zeroorder.spsa_step):

    g = [L(θ + εz_j) − L(θ − εz_j)] / 2ε,   θ ← θ − (η/P)·g·z_j,   G[j] += g

The client sends G (at most K scalars: only the seeds it used). The server takes the example-weighted
mean Ḡ[j] = Σ_c n_c G_c[j] / Σ_c n_c and replays θ ← θ − (η/P)·Σ_j Ḡ[j]·z_j, one candidate at a time in
index order; so does every node that catches up. Since each client moved by −(η/P)·Σ_j G_c[j]·z_j,
the replayed mean is the example-weighted mean of the clients' models.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from common.seeds import derive_seed
from common.training import Encoded, batch
from common.zeroorder import Perturbation, ZoModel, load_zo_model, spsa_step


def candidate_seeds(run_seed: int, k: int) -> list[int]:
    return [derive_seed("fedkseed-candidate", run_seed, j) for j in range(k)]


@dataclass
class LogEntry:
    round: int
    lr: float  # η of that round
    scalars: np.ndarray  # (K,) float32: Ḡ, the aggregated per-seed scalars (zeros where no client used j)


@dataclass
class KseedModel:
    zo: ZoModel
    pert: Perturbation  # over every perturbed parameter
    candidates: list[int]

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.zo.params


def build(cfg) -> KseedModel:
    zm = load_zo_model(cfg)
    return KseedModel(zm, Perturbation(zm.params, cfg.zo.distribution), candidate_seeds(cfg.seed, cfg.kseed.k))


@dataclass
class LocalResult:
    scalars: np.ndarray  # (K,) float32: G, the sum of g per candidate index
    losses: list[float]
    forward_passes: int  # 2·P per step


def local_update(
    km: KseedModel, cfg, lr: float, encoded: Encoded, batches: Sequence[Sequence[int]], pick_seed: int
) -> LocalResult:
    """S local steps; the candidate indices are drawn from `pick_seed` (per client and round)."""
    p, eps = cfg.kseed.perturbations, cfg.zo.eps
    pick = random.Random(pick_seed)
    acc = np.zeros(len(km.candidates), dtype=np.float64)
    losses: list[float] = []
    model = km.zo.loaded.model
    for idx in batches:
        x = batch(encoded, idx)
        for _ in range(p):
            j = pick.randrange(len(km.candidates))
            g, loss = spsa_step(km.pert, km.candidates[j], eps, lr / p, lambda x=x: float(model(**x).loss))
            acc[j] += g
            losses.append(loss)
    return LocalResult(acc.astype(np.float32), losses, 2 * p * len(batches))


@torch.no_grad()
def replay(km: KseedModel, entry: LogEntry, perturbations: int) -> None:
    """θ ← θ − (η/P)·Σ_j Ḡ[j]·z_j over the candidates with Ḡ[j] ≠ 0, in index order."""
    for j in np.flatnonzero(entry.scalars):
        km.pert.add(km.candidates[int(j)], -entry.lr / perturbations * float(entry.scalars[j]))
