"""docs/results-rng.md: the seeded draws that nodes reproduce are the same bits on every CPU, and what they cost.

    flock "$HOME/.cpu.lock" .venv/bin/python -m scripts.rng_report [--threads 1] [--repeats 5]

1. The same bits: scripts/rng_draws.py (SHA-256 of FedKRSO's P, z of both laws and θ after a replay, TT init,
   LoRA A and MiniLM's new head) run with this CPU's kernels, under ATEN_CPU_CAPABILITY=avx2 and =default, and on
   aarch64 under qemu user-mode emulation (scripts/arm64_env.sh: the torch a Raspberry Pi installs). torch.randn
   is hashed too, as the control that does differ.
2. The cost, against torch's own draws, on MiniLM's shapes:
- FedKRSO: the projections P of one seed for all 37 target matrices (r = 8), as `projection` draws them.
- Zero-order: z for every perturbed parameter of MiniLM (embedding tables excluded, the default), Gaussian and
  Rademacher, and one whole perturbation θ += α·z as `Perturbation.add` does it.
"Before" is what the code did until common/rng.py: torch.randn / normal_ (whose last bit depends on the CPU) and
θ.add_(z, alpha=α) (a fused multiply-add on some CPUs); "after" is the code as it is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import subprocess
import sys
import time

import torch

from common.modeling import default_model_path, load_model
from common.seeds import derive_seed
from common.zeroorder import Perturbation, zo_parameters
from methods.fedkrso.subspace import find_targets, projection, projection_seed
from scripts.arm64_emulation import ROOT, EmulationUnavailable, emulated_python, run_arm64

OUT = os.path.join(ROOT, "docs", "results-rng.md")


def draw_hashes(model_dir: str) -> list[str]:
    """The markdown of part 1: one column per CPU (kernel set), one row per kind of draw."""
    columns: list[tuple[str, dict[str, str] | None]] = []
    for cap in (None, "avx2", "default"):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"} | (
            {"ATEN_CPU_CAPABILITY": cap} if cap else {}
        )
        out = subprocess.run(
            [sys.executable, "-c", "import torch; print(torch.backends.cpu.get_cpu_capability())"],
            env=env, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-m", "scripts.rng_draws", model_dir], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise SystemExit(f"scripts.rng_draws failed:\n{proc.stderr[-3000:]}")
        label = f"{platform.machine()}, {out} kernels" + (f" (`ATEN_CPU_CAPABILITY={cap}`)" if cap else "")
        columns.append((label, json.loads(proc.stdout)))
    with open(os.path.join(ROOT, "Makefile")) as f:
        pi_torch = re.search(r"^TORCH_AARCH64 \?= (\S+)", f.read(), re.M).group(1)
    label = f"aarch64 (qemu user-mode, {pi_torch})"
    try:
        proc = run_arm64(emulated_python(), "-m", "scripts.rng_draws", model_dir)
        if proc.returncode != 0:
            raise SystemExit(f"scripts.rng_draws failed under aarch64 emulation:\n{proc.stderr[-3000:]}")
        columns.append((label, json.loads(proc.stdout)))
    except EmulationUnavailable as exc:
        columns.append((f"{label}: not available here ({exc})", None))
    present = [h for _, h in columns if h is not None]
    keys = sorted(present[0], key=lambda k: (k.startswith("control:"), k))
    same = [k for k in keys if not k.startswith("control:") and all(h[k] == present[0][k] for h in present)]
    lines = [
        "## 1. The same bits on every CPU",
        "",
        "SHA-256 (first 16 hex digits) of each draw, `python -m scripts.rng_draws MODEL_DIR` with all-MiniLM-L6-v2's",
        "folder (for the head) in each column's setting. `control:torch.randn` is torch's own Gaussian kernel, which",
        "no seeded draw uses any more: it shows that the columns do come from different kernels.",
        "",
        "| draw | " + " | ".join(label for label, _ in columns) + " | identical |",
        "| --- | " + " | ".join("---" for _ in columns) + " | --- |",
    ]
    for k in keys:
        cells = [h[k][:16] if h is not None else "—" for _, h in columns]
        verdict = "yes" if len({h[k] for h in present}) == 1 else "**no**"
        lines.append(f"| `{k}` | " + " | ".join(f"`{c}`" for c in cells) + f" | {verdict} |")
    lines += [
        "",
        f"{len(same)} of {len([k for k in keys if not k.startswith('control:')])} seeded draws are identical in all "
        f"{len(present)} columns.",
        "",
    ]
    return lines


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
        "# Seeded draws on every CPU (common/rng.py): the proof and the cost",
        "",
        'Written by `flock "$HOME/.cpu.lock" .venv/bin/python -m scripts.rng_report'
        f" --threads {args.threads} --repeats {args.repeats}` (scripts/rng_report.py).",
        "",
        *draw_hashes(default_model_path()),
        "## 2. The cost",
        "",
        f"On {platform.machine()}, torch {torch.__version__} "
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
