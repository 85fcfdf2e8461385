"""FedAvg-LoRA: FedAvg on peft's LoRA matrices and the head.

config.py (`lora.*`), model.py (the peft-wrapped model), client.py and server.py (FedAvg's round and strategy
on those parameters; the wire format is FedAvg's, methods/fedavg/wire.py). Registered by methods/__init__.py
from SPECS.
"""

from common.methodspec import MethodSpec
from methods.fedavg_lora.config import LoraConfig

# The small adapters need a larger Adam step than FedKRSO.
SPEC = MethodSpec(
    name="fedavg-lora", label="FedAvg-LoRA", defaults={"train.lr": 2e-3, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"lora": LoraConfig},
    export=f"{__name__}.export:export", attack_reference={"arrays": "global"},
    value_bound="methods.fedavg.wire:value_bound",  # FedAvg's wire
    reference_values="methods.fedavg.wire:reference_values", global_model="common.modeling:model_tensors",
    summary="LoRA adapters (`peft`, r = 8 on query/value)",
    travels="LoRA A, B + head both ways (MiniLM: 74,498 numbers, 296 KB)",
)  # fmt: skip
SPECS = (SPEC,)
