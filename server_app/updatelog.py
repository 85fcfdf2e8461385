"""LogStrategy: the round of the methods whose nodes keep the model (FedKRSO, FedSPZO, FedKSeed), whose
global update is compact and replayed by every node from an update log; and that log's segments on disk
beside the checkpoint (their file format: server_app/checkpoint.py, "Update-log segments").
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from logging import INFO

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log

from common import catchup, robust
from common.config import RunConfig
from common.records import RunRecorder
from common.wire import WireError, sync_only_round
from server_app import checkpoint
from server_app.round import Replies, RoundFailed, RoundStrategy
from server_app.state import (
    CheckpointError,
    check_model_digest,
    is_configs,
    is_digest,
    is_node_rounds,
    is_sha256,
    model_digest,
    records_to_state,
    rng_state,
    set_rng_state,
    state_to_records,
    strategy_field,
)


class LogStrategy(RoundStrategy):
    """A strategy whose global update is compact and replayed by every node from an update log.

    The round trip is the same for FedKRSO, FedSPZO and FedKSeed: send each chosen node this round's
    instruction plus the log entries it lacks (from the round it is known to hold), check every reply,
    aggregate the valid ones into one global update, apply it to the server's model and log it. A method
    supplies the three parts in between: `instruction`, `read_update`, `update` (and `empty_entry` for a
    round without valid replies). Malformed replies are rejected and counted; the round goes on.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.log: list = []  # log[i] is the entry of round i + 1
        self.node_round: dict[int, int] = {}  # global round each node is known to hold (absent: 0)
        # The update log on disk (server_app/checkpoint.py, "Update-log segments"): rounds 1.._written are in
        # _log_dir, the last one's digest is _log_head.
        self._log_dir = os.path.join(recorder.dir, checkpoint.LOG_DIR)
        self._written, self._log_head = 0, checkpoint.GENESIS
        self._catchup = catchup.CatchUp(self.instruction, self.kept_tensors, self.replay_passes)  # far behind: snapshot

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        raise NotImplementedError

    def update(self, server_round: int, weights: Sequence[float], replies: Replies):
        """Aggregate the valid replies (capped example weights, `combine` of `replies.map(...)`, which raises
        RoundFailed for a non-finite aggregate or a reply that fails to decode again), apply the update to the
        global model, return its log entry (what every node replays)."""
        raise NotImplementedError

    def empty_entry(self, server_round: int):
        raise NotImplementedError

    def max_reply_bytes(self) -> int:
        """The size limit of one reply (common.wire.reply_limit of what an honest reply carries)."""
        raise NotImplementedError

    def restore(self, content: RecordDict) -> list:
        """Unpack (checked) an instruction carrying the whole log (see state_dict), replay that log onto the
        freshly built global model (and set whatever else the instruction carries); return the log."""
        raise NotImplementedError

    def global_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors of the global model the method changes."""
        raise NotImplementedError

    # common.catchup: what a node far behind gets instead of the log (the tensors its NodeStore keeps), and
    # what replaying one entry costs it
    def kept_tensors(self) -> dict[str, torch.Tensor]:
        return self.global_tensors()  # unless the instruction carries part of them every round (FedKRSO's head)

    def replay_passes(self, entry) -> float:
        raise NotImplementedError

    def segment(self, t: int) -> tuple[dict[str, np.ndarray], dict]:
        """Round t's entry as its update-log segment: the "log" record and the ConfigRecords of the instruction
        for round t+1 to a node that holds round t-1 (the records the checkpoint holds left out)."""
        tensors, configs = records_to_state(self.instruction(t + 1, self.log[t - 1 : t]))
        return {k: v for k, v in tensors.items() if k.startswith(checkpoint.LOG_RECORD + "/")}, configs

    def state_dict(self) -> tuple[dict[str, np.ndarray], dict]:
        """Appends the log entries not yet on disk to the update log beside the checkpoint (one segment each,
        written once: normally only the last round's), and returns what the checkpoint holds: the records of
        the next instruction other than its log (FedKRSO's head), the node_round map, the sampling RNG, a
        digest of the global model and the log's chain head (server_app/checkpoint.py)."""
        for t in range(self._written + 1, len(self.log) + 1):
            tensors, configs = self.segment(t)
            self._log_head = checkpoint.write_segment(self._log_dir, t, tensors, configs, self._log_head)
            self._written = t
        tensors, _ = records_to_state(self.instruction(len(self.log) + 1, []))
        return tensors, {
            checkpoint.LOG_HEAD: self._log_head,
            "node-round": {str(n): r for n, r in self.node_round.items()},
            "rng": rng_state(self._rng),
            "digest": model_digest(self.global_tensors()),
        }

    def load_state_dict(
        self, tensors, state: dict, done: int, same_run: bool, segments: list[checkpoint.Segment] | None = None
    ) -> None:
        """Rebuild the global model of round `done` by replaying the log: the checkpoint's `segments`
        (checked and chained by checkpoint.read) one instruction at a time, or a version-1 checkpoint's single
        instruction carrying the whole log. Nodes keep their copy per Flower run (common.nodestore.state_dir),
        so under a new run the node_round map starts empty: every node gets the whole log with its first
        instruction and catches up, instead of answering sync-only first."""
        if self.log:
            raise RuntimeError("load_state_dict needs a freshly built strategy")
        set_rng_state(self._rng, state)  # every field is checked before the log is replayed
        digest = strategy_field(state, "digest", is_digest, "a model digest ({tensor: [sum, sum of squares]})")
        node_round = strategy_field(state, "node-round", is_node_rounds, "a map of node ids to rounds")
        held, _ = records_to_state(self.instruction(done + 1, []))  # what state_dict writes
        foreign = sorted(k for k in tensors if k not in held and not k.startswith(checkpoint.LOG_RECORD + "/"))
        if foreign:
            raise CheckpointError(f"the checkpoint holds tensors this method does not have: {foreign[:3]}")
        if "instruction" in state:  # version 1
            instruction = strategy_field(state, "instruction", is_configs, "the ConfigRecords of an instruction")
            contents = [state_to_records(tensors, instruction)]
        else:
            strategy_field(state, checkpoint.LOG_HEAD, is_sha256, "the SHA-256 of the update log's last segment")
            stray = [k for k in tensors if k.startswith(checkpoint.LOG_RECORD + "/")]
            if stray:
                raise CheckpointError(f"the checkpoint holds log tensors beside its segments: {stray[:3]}")
            contents = [state_to_records({**s.tensors, **tensors}, s.configs) for s in segments or ()]
        try:
            entries = [e for content in contents for e in self.restore(content)]
        except WireError as exc:
            raise CheckpointError(f"the checkpoint's update log does not fit this run: {exc}") from exc
        if [e.round for e in entries] != list(range(1, done + 1)):
            raise CheckpointError(f"the checkpoint's update log does not hold rounds 1..{done}")
        check_model_digest(digest, self.global_tensors())
        self.log = entries
        if segments and os.path.realpath(os.path.dirname(segments[-1].path)) == os.path.realpath(self._log_dir):
            self._written, self._log_head = done, segments[-1].digest  # resumed in place: segments 1..done are there
        # otherwise the next state_dict writes segments 1..done into this run's folder, the same digests again
        self.node_round = {int(n): r for n, r in node_round.items()} if same_run else {}

    def instructions(self, server_round: int, nodes: list[int]) -> list[RecordDict]:
        """Each node's instruction with the log entries it lacks, or the snapshot where that is cheaper
        (common.catchup)."""
        contents = []
        for node in nodes:
            content, snapshot = self._catchup.instruction(server_round, self.log[self.node_round.get(node, 0) :])
            self.recorder.add_snapshot(snapshot)  # 0 when the node got log entries
            contents.append(content)
        return contents

    def reply_size_limit(self, server_round: int) -> int:
        return self.max_reply_bytes()

    def check_reply(self, server_round: int, node: int, content: RecordDict) -> tuple[int, Mapping[str, float]] | None:
        held = sync_only_round(content)
        if held is not None and held <= server_round - 1:  # the node holds an older round than we believed:
            self.node_round[node] = held  # it gets the log from there next time
            log(INFO, "node %d holds round %d; it gets the log from there next time", node, held)
            return None
        kept = super().check_reply(server_round, node, content)
        self.node_round[node] = server_round - 1
        return kept

    def apply(self, server_round: int, weights: Sequence[float], replies: Replies) -> dict:
        before = {k: v.detach().clone() for k, v in self.global_tensors().items()}
        try:
            entry = self.update(server_round, weights, replies)
            reason = robust.non_finite(self.global_tensors())
            if reason is not None:  # a finite update can still overflow the model it is applied to
                raise RoundFailed(f"applied, {reason}")
        except RoundFailed:
            with torch.no_grad():
                for k, v in self.global_tensors().items():
                    v.copy_(before[k])
            raise
        self.log.append(entry)
        return {}

    def unchanged(self, server_round: int) -> None:
        self.log.append(self.empty_entry(server_round))
