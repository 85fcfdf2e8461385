"""FedAvg-LoRA's server: FedAvg's strategy and setup (methods.fedavg.server) on the LoRA matrices and the head."""

from __future__ import annotations

from common.config import RunConfig
from common.records import RunRecorder
from methods.fedavg.server import params_setup
from methods.fedavg_lora.model import build
from server_app.round import ServerSetup


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    return params_setup(cfg, recorder, build)
