"""FedAvg's server: Flower's FedAvg with every reply checked and aggregated robustly, and its setup.

FedAvg-LoRA (methods/fedavg_lora) uses the same strategy on its LoRA matrices and head.
"""

from __future__ import annotations

import math
import random
from logging import WARNING

import torch
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp.strategy import FedAvg

from common.config import RunConfig
from common.modeling import load_run_model
from common.records import RunRecorder
from common.robust import capped_weights
from common.wire import VALUE_BOUND, checked_metrics, content_bytes, reply_limit, require, unpack_tensors
from server_app import checkpoint
from server_app.base import RoundFailed, ServerSetup, checked_replies, choose_nodes, fail_round, robust_aggregate


class RecordedFedAvg(FedAvg):
    """Flower's own FedAvg, with the round's bytes and client metrics recorded and every reply checked first.

    Replies go through checked_replies like every other method's: size, then each array decoded from its
    bytes against the global arrays' keys and shapes (float32, finite, within VALUE_BOUND), then the metrics
    (round, num-examples). The checked arrays are then aggregated like every other method's replies
    (robust_aggregate: each reply's update around the global arrays bounded, the run's rule per tensor and
    coordinate, the example weights capped), so an extra metric key, a renamed record or a list-valued metric
    in a reply cannot reach the aggregation. Flower's FedAvg still draws up the messages.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder, **kwargs) -> None:
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=0.0,
            min_train_nodes=cfg.min_clients,
            min_available_nodes=cfg.min_clients,
            **kwargs,
        )
        self.cfg, self.recorder, self.aggregation = cfg, recorder, cfg.aggregation
        self._rng = random.Random(cfg.seed)  # client sampling: choose_nodes, as every method
        self._global: ArrayRecord | None = None
        self._sent: list[Message] = []  # this round's instructions: the replies it may accept

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
        self._sent = messages
        return messages

    def _check(self, content: RecordDict, server_round: int, shapes: dict[str, tuple[int, ...]]):
        n, metrics = checked_metrics(content, server_round)
        arrays = unpack_tensors("arrays", require(content, "arrays", ArrayRecord), shapes, VALUE_BOUND)
        return n, metrics, {k: v.numpy() for k, v in arrays.items()}

    def aggregate_train(self, server_round, replies):
        shapes = {key: tuple(int(d) for d in ref.shape) for key, ref in self._global.items()}
        limit = reply_limit(4 * sum(math.prod(s) for s in shapes.values()), len(shapes))
        checked, failures, rejected, bytes_up = checked_replies(
            server_round, replies, lambda content: self._check(content, server_round, shapes), limit, self._sent
        )
        self.recorder.add_replies(bytes_up, [metrics for _, (_, metrics, _) in checked], failures, rejected)
        if not checked:
            return None, None
        weights = capped_weights([n for _, (n, _, _) in checked], self.aggregation.weight_cap)
        reference = {k: v.numpy() for k, v in self._global.items()}
        try:  # the aggregate is the new global model itself: finite aggregate, finite model
            merged = robust_aggregate(
                self.cfg, self.recorder, server_round, [arrays for _, (_, _, arrays) in checked], weights, reference
            )
        except RoundFailed as exc:
            fail_round(self.recorder, server_round, str(exc))
            return None, None
        aggregated = ArrayRecord({k: Array(v) for k, v in merged.items()})
        total = sum(weights)
        mean_loss = (
            sum(w * m.get("train-loss", 0.0) for w, (_, (_, m, _)) in zip(weights, checked, strict=True)) / total
        )
        return aggregated, MetricRecord({"train-loss": mean_loss, "clients": len(checked)})

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


def params_record(model: torch.nn.Module) -> ArrayRecord:
    """Every parameter of the model (full fine-tuning sends all of them)."""
    return ArrayRecord({n: p.detach() for n, p in model.named_parameters()})


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    model = load_run_model(cfg).model

    def load(arrays: ArrayRecord) -> None:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)

    return ServerSetup(model, RecordedFedAvg(cfg, recorder), params_record(model), load)
