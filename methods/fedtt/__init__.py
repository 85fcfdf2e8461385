"""FedTT and FedTT+: tensor-train adapters, all cores per round (FedTT) or a rule's selection (FedTT+).

config.py (`tt.*`), tt.py (the mathematics), model.py (the adapted model), wire.py (its messages), client.py
(a node's round), server.py (its strategy and setup: one for both, which reads the spec's option "plus").
Registered by methods/__init__.py from SPECS: FedTT+ is FedTT's variant, declared here beside it.
"""

import dataclasses

from common.methodspec import MethodSpec
from methods.fedtt.config import TTConfig

# The small adapters need a larger Adam step than FedKRSO.
SPEC = MethodSpec(
    name="fedtt", label="FedTT", defaults={"train.lr": 1e-2, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"tt": TTConfig},
    instruction_record="cores", reply_record="cores", export=f"{__name__}.export:export",
    attack_reference={"cores": "global", "head": "global"}, value_bound=f"{__name__}.wire:value_bound",
    reference_values=f"{__name__}.wire:reference_values", global_model=f"{__name__}.model:global_tensors",
    options={"plus": False},
    summary="tensor-train bottleneck adapters",
    travels="all TT cores + head both ways (MiniLM: 9,698 numbers, 41 KB)",
)  # fmt: skip
# FedTT training part of the cores per round: the same code, told apart by its option (server.py reads it)
PLUS = dataclasses.replace(
    SPEC, name="fedtt-plus", label="FedTT+", options={"plus": True}, summary="part of the cores per round",
    travels="all cores down; up only the round's cores (one per TT matrix) + head + gradient scores",
)  # fmt: skip
SPECS = (SPEC, PLUS)
