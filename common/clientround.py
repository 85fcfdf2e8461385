"""The client round every method shares: read the instruction, catch up, train, pack the reply.

A method's client (methods/<method>/client.py) is a `ClientRound` that fills in what is its own: `start`
(check the instruction and put the global model it describes in place: load the numbers it carries, or catch
up on the update log from the node's stored copy), `train` (the local update on the round's batches) and
`reply` (the method's wire format). `run` does the rest the same way for every method: the node's data and
the round's batches, the training time, the peak memory and the metrics every reply carries.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import RecordDict

from common.catchup import unpack_snapshot
from common.config import RunConfig
from common.memory import PeakRSS
from common.nodestore import NodeStore, reach_round, state_dir, sync_reply
from common.training import Encoded, client_data, node_view, step_batches


@dataclass(frozen=True)
class Start:
    """Where the node starts the round from."""

    server_round: int
    model_round: int  # the global round it trains from (server_round - 1), or the older one it holds
    caught_up: bool = True  # False: it could not reach server_round - 1 and answers sync-only


@dataclass(frozen=True)
class Local:
    """The round's local data: the node's encoded examples and this round's batches of them."""

    server_round: int
    encoded: Encoded
    data_key: str  # the node's partition key: the round's batches and dropout draws derive from it
    batches: list[list[int]]

    @property
    def num_examples(self) -> int:
        return len(self.encoded["labels"])


@dataclass
class Trained:
    """What the local update produced: what the reply carries, and what its metrics say."""

    update: Any
    loss: float  # the round's mean training loss
    steps: int  # local steps taken
    metrics: dict[str, float] = field(default_factory=dict)  # the method's own metrics, after the shared ones


class ClientRound:
    """One round on one node; `run()` is the method's ClientApp handler's whole work."""

    def __init__(
        self, content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int = 0, node_id: int = 0
    ) -> None:
        self.content, self.cfg, self.node_config = content, node_view(cfg, node_config), node_config
        self.run_id, self.node_id = run_id, node_id
        self.catchup_seconds = 0.0  # catch_up's: reading, checking and writing the node's state, replaying the log

    def start(self) -> Start:
        """Build the model, check the instruction (WireError refuses it) and set the global model it names."""
        raise NotImplementedError

    def train(self, local: Local) -> Trained:
        """The local update (timed: its wall time is the reply's train-seconds)."""
        raise NotImplementedError

    def finish(self, local: Local, trained: Trained) -> Trained:
        """After training, before the peak memory is read: what the reply needs beyond the update (untimed)."""
        return trained

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        """The reply in the method's wire format, with `metrics`."""
        raise NotImplementedError

    def catch_up(
        self,
        store_name: str,
        fingerprint: str,
        tensors: Mapping[str, torch.Tensor],
        server_round: int,
        log: Sequence[Any],
        apply: Callable[[Any], None],
    ) -> Start:
        """For methods whose nodes keep the global model: load the node's stored copy into `tensors` and apply
        the update-log entries it lacks, or the server's snapshot (common.nodestore.reach_round)."""
        clock = time.perf_counter()
        store = NodeStore(state_dir(self.node_config, self.run_id, self.node_id), store_name, fingerprint)
        snapshot = unpack_snapshot(self.content, server_round, tensors)  # common.catchup: a node far behind
        ok, reached = reach_round(store, tensors, server_round, log, apply, snapshot)
        self.catchup_seconds = time.perf_counter() - clock  # reported apart from (and inside) load-seconds
        return Start(server_round, reached, caught_up=ok)

    def run(self) -> RecordDict:
        with PeakRSS() as mem:
            loading = time.perf_counter()
            begun = self.start()
            if not begun.caught_up:
                return sync_reply(begun.model_round)  # the server resends the log from there next time
            encoded, data_key = client_data(self.cfg, self.node_config)
            load_seconds = time.perf_counter() - loading
            n = len(encoded["labels"])
            batches = step_batches(self.cfg, n, begun.server_round, data_key)
            local = Local(begun.server_round, encoded, data_key, batches)
            clock = time.perf_counter()
            trained = self.train(local)
            seconds = time.perf_counter() - clock
            trained = self.finish(local, trained)
        metrics = {
            "num-examples": n,
            "model-round": begun.model_round,
            "train-loss": trained.loss,
            "train-seconds": seconds,
            "load-seconds": load_seconds,  # building the model, catching up, reading the data
            "catchup-seconds": self.catchup_seconds,  # of which the catch-up: the node's stored state and the log
            "peak-rss-mb": mem.peak_mb,
            "local-steps": trained.steps,
            **trained.metrics,
        }
        return self.reply(trained, metrics)
