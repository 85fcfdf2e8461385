"""FedAvg: the full fine-tuning baseline, on the shared round (server_app.round.RoundStrategy).

model.py (the model it trains: all of it), wire.py (its messages), client.py (a node's round, which FedAvg-LoRA
shares), server.py (its strategy, which FedAvg-LoRA shares, and its setup). No config section of its own.
Registered by methods/__init__.py from SPECS.
"""

from common.methodspec import MethodSpec

SPEC = MethodSpec(
    name="fedavg", label="FedAvg", defaults={"train.lr": 5e-5, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup",
    attack_reference={"arrays": "global"}, value_bound=f"{__name__}.wire:value_bound",
    reference_values=f"{__name__}.wire:reference_values", global_model="common.modeling:model_tensors",
    summary="full fine-tuning (Flower's `FedAvg`)",
    travels="all weights both ways",
)  # fmt: skip
SPECS = (SPEC,)
