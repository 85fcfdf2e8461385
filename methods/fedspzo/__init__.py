"""FedSPZO: split-perturbation zero-order federated fine-tuning.

config.py (`spzo.*`; `zo.*` is common.config's, shared with FedKSeed), spzo.py (the mathematics and the
model), wire.py (its messages), client.py (a node's round), server.py (its strategy and setup). Registered by
methods/__init__.py from SPECS.
"""

from common.methodspec import MethodSpec
from methods.fedspzo.config import SpzoConfig

# Steps with zo.lr, replayed from the update log, and never reads train.lr: "auto" resolves to the value it had
# before "auto" existed, so earlier records and checkpoints still match.
# aggregation.rule "capped-mean": honest zero-order scalars partly cancel in the mean, so under the bounded mean
# (norm-cap 2, weight-cap 4) attackers who adapt moved a round up to 3.8x an honest one at 1 of 3 and 6.4x at 3
# of 10; the capped mean (no reply above the round's median reply in norm or weight) held them to 1.6x and 2.3x
# (docs/results-robust.md, "Attackers who adapt").
SPEC = MethodSpec(
    name="fedspzo", label="FedSPZO", defaults={"train.lr": 5e-5, "aggregation.rule": "capped-mean"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"spzo": SpzoConfig},
    optimizer="zero-order", replayed=True, keeps_model=True, instruction_record="log", reply_record="scalars",
    attack_reference={"scalars": "zero"}, value_bound=f"{__name__}.wire:value_bound",
    global_model="common.modeling:model_tensors",
    summary="split-perturbation zero-order (forward passes only)",
    travels="a round seed down, S x (P1 + P2) float32 scalars up (720 B at the defaults)",
)  # fmt: skip
SPECS = (SPEC,)
