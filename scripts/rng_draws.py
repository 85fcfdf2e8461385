"""SHA-256 of every kind of seeded draw that nodes reproduce on their own, as JSON on stdout.

    python -m scripts.rng_draws [MODEL_DIR]

Run on two CPUs (or under `ATEN_CPU_CAPABILITY=default`, or under aarch64 emulation: scripts/arm64_env.sh), the
outputs must be equal: FedKRSO's projections P, the zero-order z of both distributions (and θ after a replay of
perturbations), TT core initialisation, LoRA A and, given a model folder, the new classification head. `torch.randn`
is hashed as well, under "control:", as the draw that does NOT agree across CPU capabilities (the test that
compares the outputs expects it to differ where torch's vectorised Gaussian kernel is in use).
"""

from __future__ import annotations

import hashlib
import json
import sys

import torch
from torch import nn

from common.zeroorder import Perturbation
from methods.fedavg_lora.model import init_lora_a
from methods.fedkrso.subspace import projection
from methods.fedtt.tt import core_shapes, init_cores, mode_sizes

# (seed, target name, r, d_in): MiniLM's shapes, another rank and a width that is not a multiple of 8 or 16
PROJECTIONS = [
    (12345, "bert.encoder.layer.0.attention.self.query", 8, 384),
    (12345, "bert.encoder.layer.5.output.dense", 8, 1536),
    (987654321, "bert.pooler.dense", 4, 384),
    (3, "model.layers.0.self_attn.q_proj", 16, 77),
]


def sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()


def draws(model_dir: str | None = None) -> dict[str, str]:
    out: dict[str, str] = {}
    for seed, name, r, d_in in PROJECTIONS:
        out[f"projection:{seed}:{name}:{r}:{d_in}"] = sha(projection(seed, name, r, d_in))
    for dist in ("gaussian", "rademacher"):
        # θ built exactly (integers times a power of two): torch.linspace's last bit depends on the CPU too
        theta = {"w": torch.arange(-50_001, 50_002).reshape(1, -1).float().mul_(2.0**-16), "b": torch.zeros(37)}
        pert = Perturbation(theta, dist)
        out[f"z:{dist}:w"] = sha(pert.z(7, "w"))
        out[f"z:{dist}:b"] = sha(pert.z(7, "b"))
        for seed, alpha in ((1, 1e-3), (2, -2.5e-4), (1, -1e-3 + 3.7e-5)):  # perturb, restore-and-update as in replay
            pert.add(seed, alpha)
        out[f"replay:{dist}"] = sha(torch.cat([theta["w"].flatten(), theta["b"]]))
    gen = torch.Generator(device="cpu").manual_seed(7919)
    cores = init_cores(core_shapes(mode_sizes(384, 64, 4), 4), 1.0 / 384, gen)
    cores += init_cores(core_shapes(mode_sizes(64, 384, 4), 4), 1.0 / 64, gen)
    out["tt-init"] = sha(torch.cat([c.flatten() for c in cores]))
    lora = {"base.query.lora_A.default.weight": nn.Parameter(torch.empty(8, 384))}
    init_lora_a(lora, 0)
    out["lora-A"] = sha(lora["base.query.lora_A.default.weight"])
    if model_dir:
        from common.modeling import head_parameters, load_model

        loaded = load_model(model_dir, 2, 0)
        out["head"] = sha(torch.cat([p.flatten() for p in head_parameters(loaded.model, loaded.head).values()]))
    gen = torch.Generator(device="cpu").manual_seed(12345)
    out["control:torch.randn"] = sha(torch.randn(3072, generator=gen))
    return out


if __name__ == "__main__":
    json.dump(draws(sys.argv[1] if len(sys.argv) > 1 else None), sys.stdout, indent=1, sort_keys=True)
    print()
