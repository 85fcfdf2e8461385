"""FedTT and FedTT+: tensor-train adapters, all cores per round (FedTT) or a rule's selection (FedTT+).

config.py (`tt.*`), tt.py (the mathematics), model.py (the adapted model), wire.py (its messages), client.py
(a node's round), server.py (its strategy and setup: one for both, which reads the run's method). Registered
by common/methods.py from SPECS: FedTT+ is FedTT's variant, declared here beside it.
"""

from common.methodspec import MethodSpec
from methods.fedtt.config import TTConfig

# The small adapters need a larger Adam step than FedKRSO.
SPEC = MethodSpec(
    name="fedtt", label="FedTT", defaults={"train.lr": 1e-2, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"tt": TTConfig},
    instruction_record="cores", reply_record="cores", export=f"{__name__}.export:export",
)  # fmt: skip
PLUS = MethodSpec(  # FedTT training part of the cores per round: its setup reads the method's name
    name="fedtt-plus", label="FedTT+", defaults={"train.lr": 1e-2, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"tt": TTConfig},
    instruction_record="cores", reply_record="cores", export=f"{__name__}.export:export",
)  # fmt: skip
SPECS = (SPEC, PLUS)
