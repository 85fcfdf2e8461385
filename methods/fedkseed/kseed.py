"""FedKSeed mathematics (the zero-order reference): K candidate seeds, scalars accumulated per seed.

FedKSeed (Qin et al., ICML 2024; docs/methods.md). K candidate seeds s_0..s_{K-1} are fixed
for the run (derived from the run seed, so they never travel). Each local step draws P whole-model
perturbations, each with a candidate index j picked uniformly at random, and applies the two-sided
estimate in place (common.zeroorder.spsa_step):

    g = [L(θ + εz_j) − L(θ − εz_j)] / 2ε,   θ ← θ − (η/P)·g·z_j,   G[j] += g

The client sends G (at most K scalars: only the seeds it used). The server takes the example-weighted
mean Ḡ[j] = Σ_c n_c G_c[j] / Σ_c n_c and replays θ ← θ − (η/P)·Σ_j Ḡ[j]·z_j, one candidate at a time in
index order; so does every node that catches up. Since each client moved by −(η/P)·Σ_j G_c[j]·z_j,
the replayed mean is the example-weighted mean of the clients' models.

What runs below the first perturbed parameter is the same for every perturbation of a step: it runs once
per step (h0, common.split) and each loss runs only the rest, as FedSPZO's block 2 does; the losses are
those of the whole network. The cost per step is then C1 + 2·P·C2 instead of 2·P·(C1 + C2).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from common.seeds import derive_seed
from common.split import SplitModel, deepest_split
from common.training import Encoded, batch
from common.zeroorder import ModelCalls, Perturbation, ZoModel, load_zo_model, spsa_step


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
    # The network cut below the first block that runs a perturbed parameter (common.split.deepest_split), or
    # None when one runs before block 0: every perturbation leaves block 1 unchanged, so one clean pass gives
    # h0 for the step and each loss runs block 2 only. With zo.params = "head" this skips 5 of MiniLM's 6
    # blocks in all but one pass per step.
    split: SplitModel | None = None

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.zo.params

    @torch.no_grad()
    def whole_loss(self, x) -> float:
        """L(θ; x) through the whole network."""
        return float(self.zo.loaded.model(**x).loss)


def build(cfg) -> KseedModel:
    zm = load_zo_model(cfg)
    cut = deepest_split(zm.loaded.model, zm.params)
    split = SplitModel(zm.loaded.model, cut, zm.params) if cut >= 1 else None
    return KseedModel(zm, Perturbation(zm.params, cfg.zo.distribution), candidate_seeds(cfg.seed, cfg.kseed.k), split)


@dataclass
class LocalResult:
    scalars: np.ndarray  # (K,) float32: G, the sum of g per candidate index
    losses: list[float]
    calls: ModelCalls  # per step: 2·P whole-network passes, or 1 block-1 pass (h0) and 2·P block-2 passes

    @property
    def forward_passes(self) -> int:
        return self.calls.total


def local_update(
    km: KseedModel, cfg, lr: float, encoded: Encoded, batches: Sequence[Sequence[int]], pick_seed: int
) -> LocalResult:
    """S local steps; the candidate indices are drawn from `pick_seed` (per client and round)."""
    p, eps = cfg.kseed.perturbations, cfg.zo.eps
    pick = random.Random(pick_seed)
    acc = np.zeros(len(km.candidates), dtype=np.float64)
    losses: list[float] = []
    calls = ModelCalls()
    for idx in batches:
        x = batch(encoded, idx)
        if km.split is not None:
            loss = partial(km.split.loss_block2, x, km.split.hidden(x))
            calls.block1 += 1
            calls.block2 += 2 * p
        else:
            loss = partial(km.whole_loss, x)
            calls.full += 2 * p
        for _ in range(p):
            j = pick.randrange(len(km.candidates))
            g, mean = spsa_step(km.pert, km.candidates[j], eps, lr / p, loss)
            acc[j] += g
            losses.append(mean)
    return LocalResult(acc.astype(np.float32), losses, calls)


@torch.no_grad()
def replay(km: KseedModel, entry: LogEntry, perturbations: int) -> None:
    """θ ← θ − (η/P)·Σ_j Ḡ[j]·z_j over the candidates with Ḡ[j] ≠ 0, in index order."""
    for j in np.flatnonzero(entry.scalars):
        km.pert.add(km.candidates[int(j)], -entry.lr / perturbations * float(entry.scalars[j]))
