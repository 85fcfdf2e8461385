"""FedAvg's server: the strategy (send the global parameters, average what returns, on the shared round of
server_app.round.RoundStrategy) and its setup.

FedAvg-LoRA (methods/fedavg_lora) uses the same strategy on its LoRA matrices and head. As FedTT owns its cores,
the strategy owns the parameters it trains: it sends them, aggregates the replies into them, and keeps them in
its checkpoint state.
"""

from __future__ import annotations

from collections.abc import Sequence
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log
from torch import nn

from common.config import RunConfig
from common.records import RunRecorder
from methods.fedavg.model import Build, build
from methods.fedavg.wire import max_reply_bytes, pack_instruction, unpack_update
from server_app.round import Replies, RoundStrategy, ServerSetup
from server_app.state import CheckpointError, checked_tensors, rng_state, set_rng_state

STATE_PREFIX = "arrays/"  # the checkpoint names each parameter "arrays/<name>" (as every checkpoint since version 1)


class FedAvg(RoundStrategy):
    """Round t: send every node the global parameters; aggregate the trained ones that return into them.

    Replies go through the checked path of every method (server_app.round.checked_replies): size, then each array
    decoded from its bytes against the global parameters' names and shapes (float32, finite, within
    VALUE_BOUND), then the metrics (round, num-examples). The checked arrays are aggregated like every other
    method's replies (robust_aggregate: each reply's update around the global parameters bounded, the run's rule
    per tensor and coordinate, the example weights capped), and the aggregate is the new global parameters."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, params: dict[str, nn.Parameter]) -> None:
        super().__init__(cfg, recorder)
        self.params = params  # the global values of the trained parameters, by wire name (the server's model's)
        self.shapes = {n: tuple(int(d) for d in p.shape) for n, p in params.items()}

    def summary(self) -> None:
        numbers = sum(p.numel() for p in self.params.values())
        log(INFO, "FedAvg: %d parameter tensors, %d numbers trained and sent each way", len(self.params), numbers)

    def global_arrays(self) -> dict[str, np.ndarray]:
        """The global parameters as float32 arrays (views of the model's)."""
        return {n: p.detach().numpy() for n, p in self.params.items()}

    def instructions(self, server_round: int, nodes: list[int]) -> list[RecordDict]:
        """The same instruction to every node: the global parameters and the round (methods/fedavg/wire.py)."""
        return [pack_instruction(server_round, self.params)] * len(nodes)

    def read_update(self, content: RecordDict, server_round: int) -> dict[str, np.ndarray]:
        return unpack_update(content, self.shapes)

    def reply_size_limit(self, server_round: int) -> int:
        return max_reply_bytes(self.shapes)

    def apply(self, server_round: int, weights: Sequence[float], replies: Replies) -> dict:
        # the aggregate is the new global parameters themselves: finite aggregate (or RoundFailed), finite model
        merged = self.combine(server_round, weights, replies, self.global_arrays())
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(torch.from_numpy(np.asarray(merged[name])))
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The global parameters ("arrays/<name>") and the sampling RNG (server_app/checkpoint.py)."""
        return {STATE_PREFIX + n: p.detach() for n, p in self.params.items()}, {"rng": rng_state(self._rng)}

    def load_state_dict(self, tensors, state: dict, done: int, same_run: bool, segments=None) -> None:
        if set(state) - {"rng"} or segments:
            raise CheckpointError("the checkpoint holds a strategy state FedAvg does not have")
        values = checked_tensors(tensors, {STATE_PREFIX + n: s for n, s in self.shapes.items()})
        if "rng" in state:
            set_rng_state(self._rng, state)
        else:  # written before FedAvg drew its nodes with a seeded RNG (it used Flower's unseeded sampling)
            log(
                WARNING,
                "the checkpoint holds no client-sampling state: sampling starts again from seed %d",
                self.cfg.seed,
            )
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(values[STATE_PREFIX + name])


def params_setup(cfg: RunConfig, recorder: RunRecorder, build: Build) -> ServerSetup:
    """The server model `build` makes, and FedAvg's strategy on the parameters it names (FedAvg: all of them;
    FedAvg-LoRA: the LoRA matrices and the head)."""
    model, params = build(cfg)
    return ServerSetup(model, FedAvg(cfg, recorder, params))


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    return params_setup(cfg, recorder, build)
