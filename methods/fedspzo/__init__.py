"""FedSPZO: split-perturbation zero-order federated fine-tuning.

config.py (`spzo.*`; `zo.*` is common.config's, shared with FedKSeed), spzo.py (the mathematics and the
model), wire.py (its messages), client.py (a node's round), server.py (its strategy and setup). Registered by
methods/__init__.py from SPECS.
"""

from common.methodspec import MethodSpec
from methods.fedspzo.config import SpzoConfig

# Steps with zo.lr, replayed from the update log, and never reads train.lr: "auto" resolves to the value it had
# before "auto" existed, so earlier records and checkpoints still match.
SPEC = MethodSpec(
    name="fedspzo", label="FedSPZO", defaults={"train.lr": 5e-5, "aggregation.rule": "mean"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"spzo": SpzoConfig},
    optimizer="zero-order", replayed=True, keeps_model=True, instruction_record="log", reply_record="scalars",
    attack_reference={"scalars": "zero"}, value_bound=f"{__name__}.wire:value_bound",
    global_model="common.modeling:model_tensors",
    summary="split-perturbation zero-order (forward passes only)",
    travels="a round seed down, S x (P1 + P2) float32 scalars up (720 B at the defaults)",
)  # fmt: skip
SPECS = (SPEC,)
