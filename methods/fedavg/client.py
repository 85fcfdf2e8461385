"""FedAvg full fine-tuning client: receive all weights, train all of them with Adam, send all back.

The wire format is methods/fedavg/wire.py. FedAvg-LoRA (methods/fedavg_lora) uses the same round on the LoRA
parameters and the head only: `ParamsRound` serves both, with the method's `build`.
"""

from __future__ import annotations

from typing import Any

import torch
from flwr.app import RecordDict

from common.clientround import ClientRound, Local, Start, Trained
from common.config import RunConfig
from common.training import dropout_seed, make_optimizer, train_steps
from methods.fedavg.model import Build, build
from methods.fedavg.wire import pack_reply, unpack_instruction


class ParamsRound(ClientRound):
    """Load the global values of the parameters `build` names, train those, send them back."""

    def __init__(self, content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], build: Build) -> None:
        super().__init__(content, cfg, node_config)
        self.build = build

    def start(self) -> Start:
        self.net, self.params = self.build(self.cfg)
        shapes = {n: tuple(p.shape) for n, p in self.params.items()}
        server_round, weights = unpack_instruction(self.content, shapes)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(weights.pop(name))
        return Start(server_round, server_round - 1)

    def train(self, local: Local) -> Trained:
        optimizer = make_optimizer(self.params.values(), self.cfg.train)
        dropout = dropout_seed(self.cfg, local.server_round, local.data_key)
        losses = train_steps(self.net, local.encoded, local.batches, [optimizer], dropout)
        return Trained(self.params, sum(losses) / len(losses), len(losses))

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        return pack_reply(trained.update, metrics)


def train(
    content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int = 0, node_id: int = 0
) -> RecordDict:
    return ParamsRound(content, cfg, node_config, build).run()
