"""FedAvg-LoRA's server: FedAvg's strategy (methods.fedavg.server) on the LoRA matrices and the head."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from common.config import RunConfig
from common.records import RunRecorder
from methods.fedavg.server import RecordedFedAvg
from methods.fedavg_lora.model import build
from server_app.base import ServerSetup


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    model, params = build(cfg)

    def load(arrays: ArrayRecord) -> None:
        with torch.no_grad():
            for name, value in arrays.to_torch_state_dict().items():
                params[name].copy_(value)

    return ServerSetup(
        model, RecordedFedAvg(cfg, recorder), ArrayRecord({n: p.detach() for n, p in params.items()}), load
    )
