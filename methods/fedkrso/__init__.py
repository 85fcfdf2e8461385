"""FedKRSO: federated K-seed random subspace optimization.

config.py (`krso.*`), subspace.py (the mathematics), model.py (the model it trains), wire.py (its messages),
client.py (a node's round), server.py (its strategy and setup). Registered by methods/__init__.py from SPECS.
"""

from common.methodspec import MethodSpec
from methods.fedkrso.config import KrsoConfig

# Trains in rank-r random subspaces: needs a larger Adam step than full fine-tuning (FedAvg).
SPEC = MethodSpec(
    name="fedkrso", label="FedKRSO", defaults={"train.lr": 5e-4, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"krso": KrsoConfig},
    keeps_model=True, instruction_record="log", reply_record="accumulators",
    attack_reference={"accumulators": "zero", "head": "global"}, value_bound=f"{__name__}.wire:value_bound",
    reference_values=f"{__name__}.wire:reference_values", global_model="common.modeling:model_tensors",
    summary="K-seed random subspaces",
    travels="K seeds down, per-seed accumulators (d_out x r) both ways",
)  # fmt: skip
SPECS = (SPEC,)
