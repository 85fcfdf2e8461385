"""FedAvg-LoRA client: FedAvg's round (methods.fedavg.client) on the LoRA matrices and head."""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from common.config import RunConfig
from methods.fedavg.client import ParamsRound
from methods.fedavg_lora.model import build


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    return ParamsRound(content, cfg, node_config, build).run()
