"""FedAvg-LoRA's export: the LoRA matrices merged into the base weights (a copy: W + (alpha / r) B A) as the
folder's model, and the peft adapter itself (adapter_config.json, adapter_model.safetensors: the LoRA matrices
and the head, peft's modules_to_save) in its adapter/ folder, for PeftModel.from_pretrained on the base."""

from __future__ import annotations

import os
from typing import Any

from common.export import ExportError, find_peft, tokenizer_of, unwrap, write_pretrained


def export(setup, cfg, folder: str) -> dict[str, Any]:
    peft_model = find_peft(setup.model)
    if peft_model is None:
        raise ExportError(f"the fedavg-lora run's model is a {type(setup.model).__name__}, not a peft model")
    peft_model.save_pretrained(os.path.join(folder, "adapter"), safe_serialization=True)
    write_pretrained(unwrap(setup.model), tokenizer_of(cfg), folder)  # unwrap merges a copy
    return {"kind": "LoRA merged into the base weights; the peft adapter in adapter/"}
