"""FedSPZO mathematics: split-perturbation zero-order steps, their aggregation and their replay.

Both the client trainer and the server strategy import this module; docs/methods.md (FedSPZO)
gives the method. Round t, with round seed ρ_t, local step s on minibatch x (every client draws the same
perturbations at the same (s, j): the seeds depend on ρ_t, s, the block and j only):

    h0 = block1(x)                                                   once, clean, cached
    for j < P2:  z = z2(seed(ρ_t, s, 2, j)) over block 2's parameters
                 g2[s, j] = [L(block2_{θ+εz}(h0)) − L(block2_{θ−εz}(h0))] / 2ε      (block 2 only)
                 θ2 ← θ2 − (η / P2)·g2[s, j]·z
    for i < P1:  z = z1(seed(ρ_t, s, 1, i)) over block 1's parameters
                 g1[s, i] = [L_{θ+εz}(x) − L_{θ−εz}(x)] / 2ε                        (whole network)
                 θ1 ← θ1 − (η / P1)·g1[s, i]·z

Forward cost per step: C1 + 2·P2·C2 + 2·P1·(C1 + C2), against 2·P·(C1 + C2) for P whole-model
perturbations (FedKSeed, MeZO). A client sends only g1 (S x P1) and g2 (S x P2).

Server: ḡ = Σ_c n_c g_c / Σ_c n_c per (s, j), and the global model is replayed in the client's order:
θ ← θ − (η / P)·ḡ[s, j]·z(seed). A client's round moved its model by −Σ (η/P)·g_c[s, j]·z along the
same z for every client, so the replayed mean is the example-weighted mean of the clients' models (FedAvg),
without a single weight on the wire. Replay is exact (server and clients agree bit for bit on the same
platform) because η is constant and logged, and nothing else touches the weights (see common.config).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from common.seeds import derive_seed
from common.split import SplitModel
from common.training import Encoded, batch
from common.zeroorder import ModelCalls, Perturbation, ZoModel, load_zo_model, spsa_step


def round_seed(run_seed: int, server_round: int) -> int:
    """ρ_t: the base seed of round t, from which every step's perturbation seeds derive."""
    return derive_seed("fedspzo-round", run_seed, server_round)


def step_seed(rho: int, step: int, block: int, index: int) -> int:
    return derive_seed("fedspzo", rho, step, block, index)


@dataclass
class LogEntry:
    """One round of the global update: everything a node needs to replay it."""

    round: int
    seed: int  # ρ_t
    lr: float  # η of that round
    g1: np.ndarray  # (S, P1) float32: aggregated block-1 scalars (empty (0, P1) when no client replied)
    g2: np.ndarray  # (S, P2) float32


@dataclass
class SpzoModel:
    zo: ZoModel
    split: SplitModel
    pert1: Perturbation | None  # over block 1's parameters (None: block 1 holds none, spzo.p1 = 0)
    pert2: Perturbation  # over block 2's parameters

    @property
    def params(self) -> dict[str, torch.Tensor]:
        return self.zo.params

    @property
    def perturbations(self) -> list[Perturbation]:
        return [p for p in (self.pert1, self.pert2) if p is not None]


def build(cfg) -> SpzoModel:
    zm = load_zo_model(cfg)
    split = SplitModel(zm.loaded.model, cfg.spzo.split_layer, zm.params)
    if not split.block1 and cfg.spzo.p1:
        raise ValueError(
            f"zo.params = '{cfg.zo.params}' perturbs nothing before spzo.split-layer {split.split_layer}: "
            "set spzo.p1 = 0 (block 2 only) or perturb more parameters"
        )
    pert1 = Perturbation(split.block1, cfg.zo.distribution) if split.block1 else None
    return SpzoModel(zm, split, pert1, Perturbation(split.block2, cfg.zo.distribution))


@dataclass
class LocalResult:
    g1: np.ndarray
    g2: np.ndarray
    losses: list[float]
    calls: ModelCalls  # per step: 1 block-1 pass (h0), 2·P2 block-2 passes, 2·P1 whole-network passes

    @property
    def forward_passes(self) -> int:
        return self.calls.total


def local_update(
    sm: SpzoModel, cfg, rho: int, lr: float, encoded: Encoded, batches: Sequence[Sequence[int]]
) -> LocalResult:
    """S local steps from round seed ρ with learning rate η = lr (the server's, as it will be replayed)."""
    p1, p2, eps = cfg.spzo.p1, cfg.spzo.p2, cfg.zo.eps
    g1 = np.zeros((len(batches), p1), dtype=np.float32)
    g2 = np.zeros((len(batches), p2), dtype=np.float32)
    losses: list[float] = []
    for s, idx in enumerate(batches):
        x = batch(encoded, idx)
        h0 = sm.split.hidden(x)
        for j in range(p2):
            g2[s, j], loss = spsa_step(
                sm.pert2, step_seed(rho, s, 2, j), eps, lr / p2, partial(sm.split.loss_block2, x, h0)
            )
            if not p1:  # block 2's loss is the whole network's (block 1 is unperturbed, h0 exact)
                losses.append(loss)
        for i in range(p1):
            g1[s, i], loss = spsa_step(sm.pert1, step_seed(rho, s, 1, i), eps, lr / p1, partial(sm.split.loss, x))
            losses.append(loss)
    steps = len(batches)
    return LocalResult(g1, g2, losses, ModelCalls(full=2 * p1 * steps, block1=steps, block2=2 * p2 * steps))


@torch.no_grad()
def replay(sm: SpzoModel, entry: LogEntry) -> None:
    """Apply one round of the global update, in the order the clients trained."""
    p1, p2 = entry.g1.shape[1], entry.g2.shape[1]
    for s in range(entry.g1.shape[0]):
        for j in range(p2):
            sm.pert2.add(step_seed(entry.seed, s, 2, j), -entry.lr / p2 * float(entry.g2[s, j]))
        for i in range(p1):
            sm.pert1.add(step_seed(entry.seed, s, 1, i), -entry.lr / p1 * float(entry.g1[s, i]))
