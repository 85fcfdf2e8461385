"""Cost of the CPU-independent draws (common/rng.py) against torch's own, on MiniLM's shapes; writes
docs/results-rng.md.

    python -m bench.rng [--threads 1] [--repeats 5]

- FedKRSO: the projections P of one seed for all 37 target matrices (r = 8), as `projection` draws them.
- Zero-order: z for every perturbed parameter of MiniLM (embedding tables excluded, the default), Gaussian and
  Rademacher, and one whole perturbation θ += α·z as `Perturbation.add` does it.
"Before" is what the code did until common/rng.py: torch.randn / normal_ (whose last bit depends on the CPU) and
θ.add_(z, alpha=α) (a fused multiply-add on some CPUs); "after" is the code as it is.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import torch

from common.fedkrso.subspace import find_targets, projection, projection_seed
from common.modeling import load_model
from common.seeds import derive_seed
from common.zeroorder import Perturbation, zo_parameters

OUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "results-rng.md")


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    net = load_model("", 2, 0).model
    targets = find_targets(net, "all-linear", exclude=("classifier",))
    params = zo_parameters(net, perturb_embeddings=False)
    numel = sum(p.numel() for p in params.values())
    rank = 8
    p_numel = sum(rank * m.in_features for m in targets.values())

    def krso_before():
        for name, m in targets.items():
            gen = torch.Generator().manual_seed(projection_seed(1, name))
            torch.randn(rank, m.in_features, generator=gen).div_(math.sqrt(rank))

    def krso_after():
        for name, m in targets.items():
            projection(1, name, rank, m.in_features)

    buf = torch.empty(max(p.numel() for p in params.values()) + 8)
    gen = torch.Generator()

    def z_before_gaussian():
        for name, p in params.items():
            gen.manual_seed(derive_seed(1, name))
            buf[: p.numel()].normal_(generator=gen)

    pert = {d: Perturbation(params, d) for d in ("gaussian", "rademacher")}

    def z_after(d):
        def run():
            for name in params:
                pert[d].z(1, name)

        return run

    def add_before(d):
        def run():  # the code before common/rng.py: torch's normal_ (or the same signs) and a fused add
            with torch.no_grad():
                for name, p in params.items():
                    if d == "gaussian":
                        gen.manual_seed(derive_seed(1, name))
                        z = buf[: p.numel()].normal_(generator=gen).view(p.shape)
                    else:
                        z = pert[d].z(1, name)
                    p.add_(z, alpha=1e-3)

        return run

    def add_after(d):
        return lambda: pert[d].add(1, 1e-3)

    rows = [
        ("FedKRSO: P of one seed, 37 matrices", p_numel, best_of(krso_before, args.repeats), best_of(krso_after, args.repeats)),
        ("zero-order z, Gaussian", numel, best_of(z_before_gaussian, args.repeats), best_of(z_after("gaussian"), args.repeats)),
        ("zero-order z, Rademacher", numel, None, best_of(z_after("rademacher"), args.repeats)),
        ("θ += α·z, Gaussian", numel, best_of(add_before("gaussian"), args.repeats), best_of(add_after("gaussian"), args.repeats)),
        ("θ += α·z, Rademacher", numel, best_of(add_before("rademacher"), args.repeats), best_of(add_after("rademacher"), args.repeats)),
    ]  # fmt: skip
    lines = [
        "# Cost of CPU-independent random draws (common/rng.py)",
        "",
        f"`python -m bench.rng --threads {args.threads}` on {platform.machine()}, torch {torch.__version__} "
        f"({torch.backends.cpu.get_cpu_capability()} kernels), {args.threads} thread(s), best of {args.repeats}; "
        f"MiniLM (all-MiniLM-L6-v2): {len(targets)} FedKRSO targets (rank {rank}), {numel:,} zero-order parameters.",
        "'before': torch.randn / normal_ (last bit depends on the CPU) and θ.add_(z, alpha=α) (a fused multiply-add",
        "on some CPUs); 'after': common/rng.py and θ + (α·z), the same bits on every CPU. The Rademacher z was already",
        "drawn from random bytes (identical everywhere); it goes through common/rng.py unchanged.",
        "",
        "| draw | numbers | before (ms) | after (ms) | after (ns per number) | after / before |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, n, before, after in rows:
        ratio = f"{after / before:.1f}x" if before else "—"
        b = f"{1e3 * before:.1f}" if before else "(same code)"
        lines.append(f"| {name} | {n:,} | {b} | {1e3 * after:.1f} | {1e9 * after / n:.1f} | {ratio} |")
    text = "\n".join(lines) + "\n"
    with open(OUT, "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
