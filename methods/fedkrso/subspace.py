"""FedKRSO mathematics: K-seed random subspaces, shared by the server strategy and the client trainer.

Per target weight W (d_out x d_in) and seed s a projection P_s (r x d_in), entries N(0, 1/r), is drawn
from a CPU generator seeded by (s, parameter name), through common.rng (bit-identical on every CPU). Training
in the subspace trains B (d_out x r, starting at 0) on the loss of W + B P_s; the forward is
y = x W^T + (x P_s^T) B^T, so autograd forms the gradient of B (= dL/dW P_s^T) and never a d_out x d_in
weight gradient.

Round t (docs/methods.md, FedKRSO):
    client:  I intervals of J steps; interval i trains B in seed k = i mod K, then W <- W + B P_k and
             A_k <- A_k + B                                                  (accumulator per seed)
    server:  Bbar_k = sum_c n_c A_k^c / sum_c n_c  (a client that did not use seed k adds 0)
             W <- W + sum_k Bbar_k P_k                                       (the global update)
Because the global update is the example-weighted mean of the clients' local updates sum_k A_k^c P_k,
FedKRSO aggregation equals FedAvg of the clients' (subspace) updates.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from common import rng, robust
from common.seeds import derive_seed

# (seed index j within the round, target name) -> tensor of shape (d_out, r)
Accumulators = dict[tuple[int, str], torch.Tensor]


def projection_seed(seed: int, name: str) -> int:
    """The generator seed of P for (seed, parameter name)."""
    return derive_seed(int(seed), name)


def projection(seed: int, name: str, rank: int, d_in: int) -> torch.Tensor:
    """P_s for one target: (rank x d_in), N(0, 1/rank), fp32, the same bits on every node whatever its CPU
    (common.rng: torch.randn's last bit depends on the CPU's SIMD capability)."""
    gen = torch.Generator(device="cpu").manual_seed(projection_seed(seed, name))
    return rng.normal((rank, d_in), gen).div_(math.sqrt(rank))


def find_targets(model: nn.Module, spec: str, exclude: Iterable[str] = ()) -> dict[str, nn.Linear]:
    """The weight matrices trained in random subspaces.

    `spec` is "all-linear" (every nn.Linear outside `exclude`, i.e. outside the classification head) or a
    comma list of module-name suffixes ("query,value", "q_proj,v_proj"). Sorted by name: the order in
    which updates are applied is part of the protocol.
    """
    excluded = tuple(exclude)
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear) and not any(name == e or name.startswith(e + ".") for e in excluded)
    }
    if spec.strip() != "all-linear":
        wanted = [s.strip() for s in spec.split(",") if s.strip()]
        linears = {
            n: m for n, m in linears.items() if any(n.split(".")[-1] == w or n.endswith("." + w) for w in wanted)
        }
        unmatched = [w for w in wanted if not any(n.split(".")[-1] == w or n.endswith("." + w) for n in linears)]
        if unmatched:
            raise ValueError(
                f"krso.targets names {unmatched} match no linear layer of this model; "
                f"linear layers end in: {sorted({n.split('.')[-1] for n in linears} or ['(none)'])}"
            )
    if not linears:
        raise ValueError("krso.targets selects no linear layer of this model")
    return dict(sorted(linears.items()))


def target_shapes(targets: Mapping[str, nn.Linear], rank: int) -> dict[str, tuple[int, int]]:
    """Shape (d_out, r) of each target's accumulator."""
    return {name: (mod.out_features, rank) for name, mod in targets.items()}


@torch.no_grad()
def apply_update(
    targets: Mapping[str, nn.Linear], seeds: Sequence[int], bbar: Mapping[tuple[int, str], torch.Tensor], rank: int
) -> None:
    """W <- W + sum_k Bbar_k P_k, one P at a time (bounded memory), in a fixed order on every node."""
    for j, seed in enumerate(seeds):
        for name, mod in targets.items():
            b = bbar.get((j, name))
            if b is None:
                continue
            p = projection(seed, name, rank, mod.in_features)
            mod.weight.addmm_(b.to(mod.weight.dtype), p.to(mod.weight.device, mod.weight.dtype))


def aggregate(
    replies: Sequence[tuple[float, Accumulators]], shapes: Mapping[str, tuple[int, int]], k: int
) -> Accumulators:
    """Bbar_k per (seed, target): the example-weighted mean of the clients' accumulators (absent = 0), which
    is common.robust's mean (the server calls common.robust.aggregate with the run's rule and clipping)."""
    if float(sum(w for w, _ in replies)) <= 0:
        raise ValueError("aggregate needs at least one reply with a positive example count")
    for _, acc in replies:
        for j, name in acc:
            if not (0 <= j < k) or name not in shapes:
                raise ValueError(f"accumulator {(j, name)} is not part of this round")
    return robust.aggregate([acc for _, acc in replies], [w for w, _ in replies])


class Subspaces:
    """Forward hooks that add (x P^T) B^T to every target Linear while an interval is open.

    Hooks keep the model's module names and state_dict keys unchanged; between intervals the model is
    the plain pretrained architecture.
    """

    def __init__(self, targets: Mapping[str, nn.Linear], rank: int) -> None:
        self.targets = dict(targets)
        self.rank = rank
        self._active: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._handles = [mod.register_forward_hook(self._hook(name)) for name, mod in self.targets.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            pb = self._active.get(name)
            if pb is None:
                return output
            p, b = pb
            return output + F.linear(F.linear(inputs[0], p), b)

        return hook

    def begin(self, seed: int) -> list[torch.Tensor]:
        """Open an interval in seed `seed`'s subspace; returns the trainable B tensors (zeros)."""
        if self._active:
            raise RuntimeError("merge() the open interval before beginning another")
        bs = []
        for name, mod in self.targets.items():
            w = mod.weight
            p = projection(seed, name, self.rank, mod.in_features).to(w.device, w.dtype)
            b = torch.zeros(mod.out_features, self.rank, device=w.device, dtype=w.dtype, requires_grad=True)
            self._active[name] = (p, b)
            bs.append(b)
        return bs

    @torch.no_grad()
    def merge(self) -> dict[str, torch.Tensor]:
        """Close the interval: W <- W + B P for every target; returns each B (detached)."""
        merged = {}
        for name, (p, b) in self._active.items():
            self.targets[name].weight.addmm_(b, p)
            merged[name] = b.detach().clone()
        self._active.clear()
        return merged

    def remove(self) -> None:
        self._active.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()


@dataclass(frozen=True)
class LogEntry:
    """One round of the global update log: its seeds and the aggregated accumulators Bbar."""

    round: int
    seeds: tuple[int, ...]
    bbar: Accumulators


def round_seeds(run_seed: int, server_round: int, k: int) -> list[int]:
    """The K seeds of a round, derived from the run seed so that a resumed run draws the same ones."""
    gen = torch.Generator().manual_seed(derive_seed("fedkrso-seeds", run_seed, server_round))
    return [int(s) for s in torch.randint(0, 2**31 - 1, (k,), generator=gen)]
