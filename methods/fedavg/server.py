"""FedAvg's server: Flower's FedAvg with every reply checked and aggregated robustly, and its setup.

FedAvg-LoRA (methods/fedavg_lora) uses the same strategy on its LoRA matrices and head.
"""

from __future__ import annotations

import random
from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.records import RunRecorder
from common.wire import content_bytes
from methods.fedavg.model import Build, build
from methods.fedavg.wire import max_reply_bytes, unpack_reply
from server_app import checkpoint
from server_app.base import (
    ServerSetup,
    aggregate_checked,
    choose_nodes,
    instructions_owed,
    robust_aggregate,
)


class RecordedFedAvg(FedAvg):
    """Flower's own FedAvg, with the round's bytes and client metrics recorded and every reply checked first.

    Replies go through checked_replies like every other method's: size, then each array decoded from its
    bytes against the global arrays' keys and shapes (float32, finite, within VALUE_BOUND), then the metrics
    (round, num-examples). The checked arrays are then aggregated like every other method's replies
    (robust_aggregate: each reply's update around the global arrays bounded, the run's rule per tensor and
    coordinate, the example weights capped), so an extra metric key, a renamed record or a list-valued metric
    in a reply cannot reach the aggregation. Flower's FedAvg still draws up the messages. As in every method,
    the round keeps each reply's example count and metrics and decodes its arrays again when the aggregation
    reads them (server_app.base.Replies): one decoded reply at a time under the mean.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, **kwargs) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            **kwargs,
        )
        self.cfg, self.recorder = cfg, recorder
        self._rng = random.Random(cfg.seed)  # client sampling: choose_nodes, as every method
        self._global: ArrayRecord | None = None
        self._owed: dict[int, Message | None] = {}  # this round's instructions: the replies it may accept

    def configure_train(self, server_round, arrays, config, grid):
        """Flower's FedAvg.configure_train, with the nodes drawn by choose_nodes (seeded, checkpointed) instead of
        Flower's sample_nodes (the unseeded global `random`)."""
        self.recorder.begin_round(server_round)
        self._global = arrays
        chosen = choose_nodes(self._rng, grid, self.cfg)
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config})
        messages = list(self._construct_messages(record, chosen, MessageType.TRAIN))
        for m in messages:
            self.recorder.add_down(content_bytes(m.content))
        self._owed = instructions_owed(messages)
        return messages

    def aggregate_train(self, server_round, replies):
        shapes = {key: tuple(int(d) for d in ref.shape) for key, ref in self._global.items()}
        reference = {k: v.numpy() for k, v in self._global.items()}

        def unpack(content):
            return unpack_reply(content, server_round, shapes)

        def apply(weights, arrays):  # the aggregate is the new global model itself: finite aggregate, finite model
            merged = robust_aggregate(self.cfg, self.recorder, server_round, arrays, weights, reference)
            return ArrayRecord({k: Array(v) for k, v in merged.items()}), {}

        # kept: (num-examples, metrics); the arrays are decoded again from each Message when aggregated (Replies)
        done = aggregate_checked(
            self.cfg,
            self.recorder,
            server_round,
            replies,
            unpack,
            max_reply_bytes(shapes),
            self._owed,
            lambda node, reply: reply[:2],
            lambda content: unpack(content)[2],
            apply,
        )
        return (None, None) if done is None else done

    def state_dict(self) -> tuple[dict, dict]:
        """The sampling RNG; the global arrays are Strategy.start's, which the checkpoint keeps beside."""
        return {}, {"rng": checkpoint.rng_state(self._rng)}

    def load_state_dict(self, tensors, state: dict, done: int, same_run: bool, segments=None) -> None:
        if tensors or set(state) - {"rng"} or segments:
            raise checkpoint.CheckpointError("the checkpoint holds a strategy state FedAvg does not have")
        if "rng" in state:
            checkpoint.set_rng_state(self._rng, state)
        else:  # written before FedAvg drew its nodes with a seeded RNG (it used Flower's unseeded sampling)
            log(
                WARNING,
                "the checkpoint holds no client-sampling state: sampling starts again from seed %d",
                self.cfg.seed,
            )


def params_setup(cfg: RunConfig, recorder: RunRecorder, build: Build) -> ServerSetup:
    """The server model `build` makes, and FedAvg's strategy on the parameters it names (FedAvg: all of them;
    FedAvg-LoRA: the LoRA matrices and the head)."""
    model, params = build(cfg)

    def load(arrays: ArrayRecord) -> None:
        with torch.no_grad():
            for name, value in arrays.to_torch_state_dict().items():
                params[name].copy_(value)

    return ServerSetup(
        model, RecordedFedAvg(cfg, recorder), ArrayRecord({n: p.detach() for n, p in params.items()}), load
    )


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    return params_setup(cfg, recorder, build)
