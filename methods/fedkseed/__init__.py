"""FedKSeed: zero-order federated fine-tuning over K candidate seeds (the reference for FedSPZO).

config.py (`kseed.*`; `zo.*` is common.config's, shared with FedSPZO), kseed.py (the mathematics and the
model), wire.py (its messages), client.py (a node's round), server.py (its strategy and setup). Registered by
methods/__init__.py from SPECS.
"""

from common.methodspec import MethodSpec
from methods.fedkseed.config import KseedConfig

# Steps with zo.lr, replayed from the update log, and never reads train.lr (see FedSPZO's).
# aggregation.rule "capped-mean": honest zero-order scalars partly cancel in the mean, so under the bounded mean
# (norm-cap 2, weight-cap 4) attackers who adapt moved a round up to 3.8x an honest one at 1 of 3 and 6.4x at 3
# of 10; the capped mean (no reply above the round's median reply in norm or weight) held them to 1.6x and 2.3x
# (docs/results-robust.md, "Attackers who adapt").
SPEC = MethodSpec(
    name="fedkseed", label="FedKSeed", defaults={"train.lr": 5e-5, "aggregation.rule": "capped-mean"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"kseed": KseedConfig},
    optimizer="zero-order", replayed=True, keeps_model=True, instruction_record="log", reply_record="scalars",
    attack_reference={"scalars": "zero"}, value_bound=f"{__name__}.wire:value_bound",
    reply_arrays=f"{__name__}.wire:reply_arrays",
    global_model="common.modeling:model_tensors",
    summary="zero-order over K fixed seeds (reference)",
    travels="at most K scalars each way (sparse index + value when smaller)",
)  # fmt: skip
SPECS = (SPEC,)
