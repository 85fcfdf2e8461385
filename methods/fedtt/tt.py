"""FedTT mathematics: tensor-train bottleneck adapters, their aggregation and FedTT+'s core-selection rule.

Shared by the server strategy and the client trainer (docs/methods.md, FedTT and FedTT+).

Adapter (Houlsby-style, after a block's attention-output and feed-forward-output projection):
    y <- y + s * act(y W_down) W_up            W_down: d x b, W_up: b x d, act = GELU, s = tt.scale
Each of W_down and W_up is a tensor train: the matrix, in row-major order, reshaped into an order-L
tensor with mode sizes n_1..n_L (the factors of d followed by the factors of b for W_down, of b then d for
W_up), stored as cores G_i of shape (r_{i-1}, n_i, r_i), r_0 = r_L = 1:
    W[i_1..i_L] = G_1[:, i_1, :] G_2[:, i_2, :] ... G_L[:, i_L, :]
Initialisation: every core N(0, sigma^2) with sigma chosen so that the dense matrix has entries of
variance 1/fan_in, except the last core of W_up, which is 0: W_up = 0, so the adapter adds nothing and the
model's output is unchanged before training (the LoRA B = 0 idea); the last core of W_up is the one core
with a nonzero gradient at the start.

Aggregation (FedTT): the example-weighted mean of each core over the clients that sent it.
FedTT+: in each TT matrix at most `tt.plus-cores` (default 1) cores are trainable in a round and only those
travel. With one trainable core per matrix and the others frozen and identical on every node, the dense
matrix is linear in that core, so the mean of the cores IS the mean of the clients' dense matrices (exact
aggregation, the FFA-LoRA argument), and frozen cores cannot drift apart under non-IID data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

import torch
from torch import nn
from torch.nn import functional as F

from common import rng, robust

# Module-name suffixes of the projections an adapter follows: attention output and feed-forward output.
# BERT / RoBERTa / MiniLM: <layer>.attention.output.dense and <layer>.output.dense; LLaMA family:
# self_attn.o_proj and mlp.down_proj.
ENCODER_SITES = ("attention.output.dense", "output.dense")
DECODER_SITES = ("self_attn.o_proj", "mlp.down_proj")

# A core's identity on the wire and in the selection: (adapter index, "down" | "up", core index).
CoreKey = tuple[int, str, int]
K = TypeVar("K")
MATRICES = ("down", "up")


def factorize(n: int, max_factor: int = 4) -> list[int]:
    """Small factors of n (product n), balanced, about max_factor each:
    384 -> [6, 4, 4, 4], 64 -> [4, 4, 4] (max_factor 4); 768 -> [12, 8, 8], 64 -> [8, 8] (max_factor 8, LoRETTA's).

    The number of factors is round(log n / log max_factor); primes are dealt largest first to the factor
    with the smallest product so far. A prime above max_factor stays a factor of its own.
    """
    if n < 1:
        raise ValueError(f"cannot factor {n}")
    primes, m, p = [], n, 2
    while m > 1:
        while m % p == 0:
            primes.append(p)
            m //= p
        p += 1 if p == 2 else 2
        if p * p > m and m > 1:
            primes.append(m)
            break
    count = max(1, round(math.log(n) / math.log(max_factor))) if n > 1 else 1
    factors = [1] * count
    for prime in sorted(primes, reverse=True):
        i = min(range(count), key=lambda j: factors[j])
        factors[i] *= prime
    return sorted([f for f in factors if f > 1], reverse=True) or [1]


def mode_sizes(rows: int, cols: int, max_factor: int = 4) -> list[int]:
    """Mode sizes of a rows x cols matrix: the factors of rows, then those of cols (product rows * cols)."""
    return factorize(rows, max_factor) + factorize(cols, max_factor)


def core_shapes(modes: Sequence[int], rank: int) -> list[tuple[int, int, int]]:
    """(r_{i-1}, n_i, r_i) for each core; r_0 = r_L = 1 and no inner rank above what the modes allow."""
    shapes, left = [], 1
    total = math.prod(modes)
    for i, n in enumerate(modes):
        seen = math.prod(modes[: i + 1])
        right = 1 if i == len(modes) - 1 else min(rank, left * n, total // seen)
        shapes.append((left, n, right))
        left = right
    return shapes


def tt_to_matrix(cores: Sequence[torch.Tensor], rows: int, cols: int) -> torch.Tensor:
    """The dense rows x cols matrix a tensor train represents: contract the cores left to right.

    Each step is one (prod n_1..n_i, r_i) x (r_i, n_{i+1} r_{i+1}) matrix product; the row-major reshape
    puts the modes back in order. About 2 rows*cols*r multiply-adds, far below one forward through the
    adapter (timed against tensorly's tt_to_tensor by `make bench-extras`, bench/run.py).
    """
    out = cores[0].reshape(cores[0].shape[1], cores[0].shape[2])
    for g in cores[1:]:
        out = (out @ g.reshape(g.shape[0], -1)).reshape(-1, g.shape[2])
    return out.reshape(rows, cols)


def init_cores(shapes: Sequence[tuple[int, int, int]], variance: float, gen: torch.Generator) -> list[torch.Tensor]:
    """Cores whose contraction has entries of about `variance`: each of the prod(r_1..r_{L-1}) paths
    through the train is a product of L draws, so var(W) = prod(r_i) * sigma^(2L)."""
    paths = math.prod(s[2] for s in shapes[:-1])
    sigma = (variance / paths) ** (1.0 / (2 * len(shapes)))
    return [rng.normal(s, gen).mul_(sigma) for s in shapes]  # common.rng: the same bits on every CPU


class TTMatrix(nn.Module):
    """A rows x cols matrix kept as TT cores; `matrix()` contracts them (differentiably)."""

    def __init__(self, rows: int, cols: int, cores: Sequence[torch.Tensor]) -> None:
        super().__init__()
        self.rows, self.cols = rows, cols
        self.cores = nn.ParameterList([nn.Parameter(c.clone()) for c in cores])

    def matrix(self) -> torch.Tensor:
        return tt_to_matrix(list(self.cores), self.rows, self.cols)


class TTAdapter(nn.Module):
    """y + s * act(y W_down) W_up, with W_down (d x b) and W_up (b x d) tensor trains."""

    def __init__(
        self, d: int, bottleneck: int, rank: int, scale: float, gen: torch.Generator, max_factor: int = 4
    ) -> None:
        super().__init__()
        self.scale = scale
        down_shapes = core_shapes(mode_sizes(d, bottleneck, max_factor), rank)
        up_shapes = core_shapes(mode_sizes(bottleneck, d, max_factor), rank)
        self.down = TTMatrix(d, bottleneck, init_cores(down_shapes, 1.0 / d, gen))
        up = init_cores(up_shapes, 1.0 / bottleneck, gen)
        up[-1].zero_()  # W_up = 0: the adapter starts as the identity map of its block
        self.up = TTMatrix(bottleneck, d, up)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        w_down, w_up = self.down.matrix(), self.up.matrix()
        return y + self.scale * (F.gelu(y @ w_down.to(y.dtype)) @ w_up.to(y.dtype))

    def tt(self, which: str) -> TTMatrix:
        return self.down if which == "down" else self.up


def find_sites(model: nn.Module, exclude: Iterable[str] = ()) -> list[str]:
    """Names of the attention-output and feed-forward-output projections, in model order."""
    excluded = tuple(exclude)
    sites = [
        name
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
        and any(name == s or name.endswith("." + s) for s in ENCODER_SITES + DECODER_SITES)
        and not any(name == e or name.startswith(e + ".") for e in excluded)
    ]
    if not sites:
        raise ValueError(
            "no attention-output / feed-forward-output projection found for TT adapters "
            f"(looked for module names ending in {', '.join(ENCODER_SITES + DECODER_SITES)})"
        )
    return sites


class TTAdapters:
    """One TTAdapter after each site, attached with forward hooks (the model's own names stay unchanged).

    Adapter i follows site i (`find_sites` order); the cores are drawn from a CPU generator seeded by the
    run seed, so every node builds the same initial adapters.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: Sequence[str],
        bottleneck: int,
        rank: int,
        scale: float,
        seed: int,
        max_mode: int = 4,
    ) -> None:
        gen = torch.Generator(device="cpu").manual_seed(int(seed) + 7919)
        modules = dict(model.named_modules())
        self.sites = list(sites)
        self.adapters = [
            TTAdapter(modules[s].out_features, bottleneck, rank, scale, gen, max_mode).to(modules[s].weight.device)
            for s in self.sites
        ]
        self._handles = [
            modules[s].register_forward_hook(lambda mod, inp, out, a=a: a(out))
            for s, a in zip(self.sites, self.adapters, strict=True)
        ]

    def core_keys(self) -> list[CoreKey]:
        """Every core, in the canonical order (adapter, down before up, core index)."""
        return [(i, m, j) for i, a in enumerate(self.adapters) for m in MATRICES for j in range(len(a.tt(m).cores))]

    def core(self, key: CoreKey) -> nn.Parameter:
        i, m, j = key
        return self.adapters[i].tt(m).cores[j]

    def shapes(self) -> dict[CoreKey, tuple[int, ...]]:
        return {k: tuple(self.core(k).shape) for k in self.core_keys()}

    def num_cores(self, i: int, m: str) -> int:
        return len(self.adapters[i].tt(m).cores)

    def state(self, keys: Iterable[CoreKey] | None = None) -> dict[CoreKey, torch.Tensor]:
        return {k: self.core(k).detach().clone() for k in (self.core_keys() if keys is None else keys)}

    @torch.no_grad()
    def load(self, cores: Mapping[CoreKey, torch.Tensor]) -> None:
        for k, v in cores.items():
            self.core(k).copy_(v)

    def set_trainable(self, keys: Iterable[CoreKey]) -> list[nn.Parameter]:
        """Only these cores get gradients; returns them (in canonical order)."""
        wanted = set(keys)
        params = []
        for k in self.core_keys():
            p = self.core(k)
            p.requires_grad_(k in wanted)
            if k in wanted:
                params.append(p)
        return params

    def num_parameters(self, keys: Iterable[CoreKey] | None = None) -> int:
        return sum(self.core(k).numel() for k in (self.core_keys() if keys is None else keys))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def aggregate(replies: Sequence[tuple[float, Mapping[K, torch.Tensor]]]) -> dict[K, torch.Tensor]:
    """Per key (a core, a head parameter): the example-weighted mean over the replies (common.robust's mean;
    the server uses common.robust.aggregate directly, with the run's rule and clipping).

    FedTT averages every core; FedTT+ only the round's cores, which every reply carries.
    """
    if any(w <= 0 for w, _ in replies):
        raise ValueError("aggregate needs positive example counts")
    return robust.aggregate([values for _, values in replies], [w for w, _ in replies])


def score_votes(scores: Mapping[CoreKey, float]) -> dict[CoreKey, float]:
    """A client's FedTT+ gradient scores as a distribution over the cores of each TT matrix (each matrix's
    scores divided by their sum; all 0 if the sum is 0). The rule compares cores within a matrix only, and
    this bounds what one client's scores can weigh, whatever their scale."""
    sums: dict[tuple[int, str], float] = {}
    for (i, m, _), v in scores.items():
        sums[(i, m)] = sums.get((i, m), 0.0) + v
    return {k: (v / sums[k[:2]] if sums[k[:2]] > 0 else 0.0) for k, v in scores.items()}


# ---- FedTT+: which cores are trainable in a round -------------------------------------------------------
#
# The paper's adaptive rule is not public; this one is ours ("gradient" rule, tt.plus-rule):
#   - at most tt.plus-cores cores per TT matrix are trainable in a round (1 by default, which keeps the
#     aggregation exact, see the module docstring);
#   - which ones: the cores with the largest mean absolute gradient, measured by every client on one batch
#     at the end of its local training (a gradient-only pass over all cores, no step) and averaged by the
#     server, example-weighted. Under Adam a step moves every trained number by about lr, so the first-order
#     loss decrease of training core G is about lr * sum|dL/dG|, and per number sent lr * mean|dL/dG|: the
#     rule spends the round's bytes where they buy the most decrease. A core that has just been trained has a
#     smaller gradient the next round, so the choice moves on by itself.
#   - round 1 has no measurement: each W_up trains its last core (the zero one, the only core with a
#     nonzero gradient at the identity start) and W_down trains nothing (its gradient is zero while W_up = 0).
#   - a matrix whose scores are all zero trains nothing that round.
# The "cyclic" rule (ablation) trains core (L - t) mod L of every matrix in round t: the same start, then a
# fixed sweep from the last core to the first, blind to the data.


def plus_selection(
    adapters: TTAdapters, server_round: int, rule: str, per_matrix: int, scores: Mapping[CoreKey, float] | None
) -> list[CoreKey]:
    """The cores FedTT+ trains (and sends) in `server_round`, in canonical order."""
    chosen: list[CoreKey] = []
    for i in range(len(adapters.adapters)):
        for m in MATRICES:
            n = adapters.num_cores(i, m)
            if server_round == 1 or (rule == "gradient" and scores is None):
                picks = [n - 1] if m == "up" else []
            elif rule == "cyclic":
                first = (n - server_round) % n
                picks = [(first - q) % n for q in range(min(per_matrix, n))]
            else:
                ranked = sorted(range(n), key=lambda j, i=i, m=m: -scores.get((i, m, j), 0.0))
                picks = [j for j in ranked[:per_matrix] if scores.get((i, m, j), 0.0) > 0]
            chosen += [(i, m, j) for j in sorted(picks)]
    return chosen


def gradient_scores(model: nn.Module, adapters: TTAdapters, batch: Mapping[str, torch.Tensor]) -> dict[CoreKey, float]:
    """Mean |dL/dG| of every core on one batch (no optimizer step; requires_grad restored afterwards)."""
    keys = adapters.core_keys()
    before = {k: adapters.core(k).requires_grad for k in keys}
    params = adapters.set_trainable(keys)
    model.eval()  # no dropout: the score of the current model
    loss = model(**batch).loss
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for k in keys:
        adapters.core(k).requires_grad_(before[k])
    return {k: 0.0 if g is None else float(g.abs().mean()) for k, g in zip(keys, grads, strict=True)}
