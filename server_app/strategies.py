"""Server strategies: FedKRSO, FedSPZO, FedKSeed (update-log methods) and FedAvg with records.

Both stay thin: the mathematics is in common.fedkrso.subspace, the wire format in common.fedkrso.wire.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from logging import INFO, WARNING
from typing import TypeVar

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from common import catchup, robust
from common.config import RunConfig
from common.fedkrso.state import KrsoModel
from common.fedkrso.subspace import LogEntry, apply_update, round_seeds
from common.fedkrso.wire import pack_instruction, unpack_instruction, unpack_reply
from common.fedkseed import kseed
from common.fedkseed import wire as kseed_wire
from common.fedkseed.kseed import KseedModel
from common.fedspzo import spzo
from common.fedspzo import wire as spzo_wire
from common.fedspzo.spzo import SpzoModel
from common.records import RunRecorder
from common.robust import capped_weights
from common.wire import (
    INSTRUCTION_REFUSED,
    VALUE_BOUND,
    WireError,
    check_size,
    checked_metrics,
    content_bytes,
    reply_limit,
    require,
    sync_only_round,
    unpack_tensors,
)
from server_app import checkpoint

T = TypeVar("T")


def wait_for_nodes(grid: Grid, minimum: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while len(nodes := sorted(grid.get_node_ids())) < minimum:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of min-clients={minimum} nodes connected after {timeout:.0f} s")
        log(INFO, "Waiting for nodes: %d connected, %d needed", len(nodes), minimum)
        time.sleep(1)
    return nodes


def choose_nodes(rng: random.Random, grid: Grid, cfg: RunConfig) -> list[int]:
    """This round's nodes: fraction-train of the connected ones (at least min-clients), drawn with the strategy's
    seeded `rng`, whose state the checkpoint keeps. Every method draws the same way, so with the same seed and
    the same nodes every method trains the same nodes in the same rounds, and a resumed run continues the draws."""
    nodes = wait_for_nodes(grid, cfg.min_clients, cfg.round_timeout)
    return sorted(rng.sample(nodes, max(cfg.min_clients, int(len(nodes) * cfg.fraction_train))))


def unexpected_reply(msg: Message, sent: dict[int, Message], answered: set[int]) -> str | None:
    """Why `msg` is not the one reply its node owes this round, or None.

    A reply counts only from a node that was sent this round's instruction, only as an answer to that very
    instruction, and only once: Flower's transport ensures all three today, and the aggregate must not
    depend on it (a duplicated delivery would count twice; a reply relabelled as another node's would take
    that node's place). The instruction's id is the one the Grid gave it when pushing it; a Grid that pushed a
    copy leaves ours empty, and then the node alone is checked."""
    node = msg.metadata.src_node_id
    if node not in sent:
        return f"node {node} was sent no instruction this round"
    if node in answered:
        return f"node {node} already answered this round: a second reply (or the same one delivered twice) counts once"
    expected = sent[node].metadata.message_id
    if expected and msg.metadata.reply_to_message_id != expected:
        return f"it answers message {msg.metadata.reply_to_message_id[:16]!r}, not the instruction node {node} was sent"
    return None


def checked_replies(
    server_round: int,
    replies: Iterable[Message],
    unpack: Callable[[RecordDict], T],
    max_bytes: int,
    sent: Iterable[Message],
) -> tuple[list[tuple[int, T]], int, int, int]:
    """(node, unpacked reply) of every reply that passes, failures, rejected, bytes up (all replies counted).

    The one checked path of every method's replies (`sent`: the round's instructions): a reply that is not
    the one its node owes (unexpected_reply) is rejected; a reply larger than `max_bytes` (content bytes) is
    rejected before anything in it is decoded; then `unpack` decodes and checks it. ANY exception while
    checking one reply (WireError for what the wire formats refuse, but also whatever a crafted reply
    might provoke in numpy or Flower) rejects that reply only, is logged, and the round goes on.
    """
    instructions = {m.metadata.dst_node_id: m for m in sent}
    answered: set[int] = set()
    accepted: list[tuple[int, T]] = []
    failures = rejected = bytes_up = 0
    for msg in replies:
        node = msg.metadata.src_node_id
        problem = unexpected_reply(msg, instructions, answered)
        answered.add(node)
        if msg.has_error() and problem is None:
            failures += 1
            what = "refused the instruction" if msg.error.code == INSTRUCTION_REFUSED else "failed"
            log(WARNING, "node %d %s in round %d: %s", node, what, server_round, str(msg.error.reason)[-500:])
            continue
        try:
            if problem is not None:
                raise WireError(problem)
            bytes_up += content_bytes(msg.content)
            check_size(msg.content, max_bytes)
            accepted.append((node, unpack(msg.content)))
        except Exception as exc:  # noqa: BLE001 - see the docstring: one bad reply never ends the round
            rejected += 1
            log(WARNING, "reply of node %d rejected in round %d: %s", node, server_round, str(exc)[:500])
    return accepted, failures, rejected, bytes_up


class RoundFailed(Exception):
    """The round's aggregate cannot be applied; the message is the reason the records keep."""


def robust_aggregate(
    cfg: RunConfig,
    recorder: RunRecorder,
    server_round: int,
    replies: list[dict],
    weights: list[float],
    reference: dict | None = None,
) -> dict:
    """common.robust.aggregate_round by the run's aggregation.*, the one aggregation of every method, with
    what it did recorded: the replies it clipped, and a warning when the round has too few replies for its
    rule to absorb aggregation.attackers hostile ones. Raises RoundFailed when the aggregate is not finite."""
    ag = cfg.aggregation
    result = robust.aggregate_round(replies, weights, **robust.settings(ag), reference=reference)
    recorder.add_clipped(result.clipped)
    if ag.rule != "mean" and result.absorbed < ag.attackers:
        message = (
            f"round {server_round}: {ag.rule} of {len(replies)} replies absorbs {result.absorbed} hostile one(s), "
            f"fewer than aggregation.attackers = {ag.attackers} (that needs {2 * ag.attackers + 1} replies)"
        )
        log(WARNING, "%s", message)
        recorder.warn(message)
    reason = robust.non_finite(result.values)
    if reason is not None:
        raise RoundFailed(reason)
    return result.values


def fail_round(recorder: RunRecorder, server_round: int, reason: str) -> None:
    """Record a round whose aggregate was not applied; the run goes on from the previous global model."""
    log(WARNING, "round %d failed, the global model is unchanged: %s", server_round, reason)
    recorder.fail_round(reason)


class LogStrategy(Strategy):
    """A strategy whose global update is compact and replayed by every node from an update log.

    The round trip is the same for FedKRSO, FedSPZO and FedKSeed: send each chosen node this round's
    instruction plus the log entries it lacks (from the round it is known to hold), check every reply,
    aggregate the valid ones into one global update, apply it to the server's model and log it. A method
    supplies the three parts in between: `instruction`, `check_reply`, `update` (and `empty_entry` for a
    round without valid replies). Malformed replies are rejected and counted; the round goes on.
    """

    def __init__(self, cfg: RunConfig, recorder: RunRecorder) -> None:
        self.cfg, self.recorder = cfg, recorder
        self.log: list = []  # log[i] is the entry of round i + 1
        self.node_round: dict[int, int] = {}  # global round each node is known to hold (absent: 0)
        self._rng = random.Random(cfg.seed)
        self._sent: list[Message] = []  # this round's instructions: the replies it may accept
        # The update log on disk (server_app/checkpoint.py, "Update-log segments"): rounds 1.._written are in
        # _log_dir, the last one's digest is _log_head.
        self._log_dir = os.path.join(recorder.dir, checkpoint.LOG_DIR)
        self._written, self._log_head = 0, checkpoint.GENESIS
        self._catchup = catchup.CatchUp(self.instruction, self.kept_tensors, self.replay_passes)  # far behind: snapshot

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        raise NotImplementedError

    def check_reply(self, content: RecordDict, server_round: int):
        """The method's checked reply (with `num_examples` and `metrics`); raises WireError if malformed."""
        raise NotImplementedError

    def update(self, server_round: int, weights: list[float], replies: list):
        """Aggregate the valid replies (capped example weights, `combine`, which raises RoundFailed for a
        non-finite aggregate), apply the update to the global model, return its log entry (what every node
        replays)."""
        raise NotImplementedError

    def combine(self, server_round: int, weights: list[float], replies: list[dict], reference: dict | None = None):
        return robust_aggregate(self.cfg, self.recorder, server_round, replies, weights, reference)

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
        raise NotImplementedError

    def replay_passes(self, entry) -> float:
        raise NotImplementedError

    def segment(self, t: int) -> tuple[dict[str, np.ndarray], dict]:
        """Round t's entry as its update-log segment: the "log" record and the ConfigRecords of the instruction
        for round t+1 to a node that holds round t-1 (the records the checkpoint holds left out)."""
        tensors, configs = checkpoint.records_to_state(self.instruction(t + 1, self.log[t - 1 : t]))
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
        tensors, _ = checkpoint.records_to_state(self.instruction(len(self.log) + 1, []))
        return tensors, {
            checkpoint.LOG_HEAD: self._log_head,
            "node-round": {str(n): r for n, r in self.node_round.items()},
            "rng": checkpoint.rng_state(self._rng),
            "digest": checkpoint.model_digest(self.global_tensors()),
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
        checkpoint.set_rng_state(self._rng, state)  # every field is checked before the log is replayed
        field = checkpoint.strategy_field
        digest = field(state, "digest", checkpoint.is_digest, "a model digest ({tensor: [sum, sum of squares]})")
        node_round = field(state, "node-round", checkpoint.is_node_rounds, "a map of node ids to rounds")
        if "instruction" in state:  # version 1
            instruction = field(state, "instruction", checkpoint.is_configs, "the ConfigRecords of an instruction")
            contents = [checkpoint.state_to_records(tensors, instruction)]
        else:
            field(state, checkpoint.LOG_HEAD, checkpoint.is_sha256, "the SHA-256 of the update log's last segment")
            stray = [k for k in tensors if k.startswith(checkpoint.LOG_RECORD + "/")]
            if stray:
                raise checkpoint.CheckpointError(f"the checkpoint holds log tensors beside its segments: {stray[:3]}")
            contents = [checkpoint.state_to_records({**s.tensors, **tensors}, s.configs) for s in segments or ()]
        try:
            entries = [e for content in contents for e in self.restore(content)]
        except WireError as exc:
            raise checkpoint.CheckpointError(f"the checkpoint's update log does not fit this run: {exc}") from exc
        if [e.round for e in entries] != list(range(1, done + 1)):
            raise checkpoint.CheckpointError(f"the checkpoint's update log does not hold rounds 1..{done}")
        checkpoint.check_model_digest(digest, self.global_tensors())
        self.log = entries
        if segments and os.path.realpath(os.path.dirname(segments[-1].path)) == os.path.realpath(self._log_dir):
            self._written, self._log_head = done, segments[-1].digest  # resumed in place: segments 1..done are there
        # otherwise the next state_dict writes segments 1..done into this run's folder, the same digests again
        self.node_round = {int(n): r for n, r in node_round.items()} if same_run else {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.begin_round(server_round)
        chosen = choose_nodes(self._rng, grid, self.cfg)
        messages = []
        for node in chosen:
            content, snapshot = self._catchup.instruction(server_round, self.log[self.node_round.get(node, 0) :])
            self.recorder.add_down(content_bytes(content))
            self.recorder.add_snapshot(snapshot)  # common.catchup: 0 when the node got log entries
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        def unpack(content: RecordDict):
            held = sync_only_round(content)
            if held is not None and held <= server_round - 1:
                return "sync", held
            return "reply", self.check_reply(content, server_round)

        checked, failures, rejected, bytes_up = checked_replies(
            server_round, replies, unpack, self.max_reply_bytes(), self._sent
        )
        accepted, metrics = [], []
        for node, (kind, reply) in checked:
            if kind == "sync":  # the node holds an older round than we believed
                self.node_round[node] = reply
                log(INFO, "node %d holds round %d; it gets the log from there next time", node, reply)
                continue
            self.node_round[node] = server_round - 1
            accepted.append(reply)
            metrics.append(reply.metrics)
        self.recorder.add_replies(bytes_up, metrics, failures, rejected)
        if not accepted:
            log(WARNING, "round %d: no valid reply, the global model is unchanged", server_round)
            self.log.append(self.empty_entry(server_round))
            return None, None
        weights = capped_weights([r.num_examples for r in accepted], self.cfg.aggregation.weight_cap)
        before = {k: v.detach().clone() for k, v in self.global_tensors().items()}
        try:
            entry = self.update(server_round, weights, accepted)
            reason = robust.non_finite(self.global_tensors())
            if reason is not None:  # a finite update can still overflow the model it is applied to
                raise RoundFailed(f"applied, {reason}")
        except RoundFailed as exc:
            with torch.no_grad():
                for k, v in self.global_tensors().items():
                    v.copy_(before[k])
            fail_round(self.recorder, server_round, str(exc))
            self.log.append(self.empty_entry(server_round))
            return None, None
        self.log.append(entry)
        total = sum(weights)
        mean_loss = sum(w * r.metrics.get("train-loss", 0.0) for w, r in zip(weights, accepted, strict=True)) / total
        return ArrayRecord(), MetricRecord({"train-loss": mean_loss, "clients": len(accepted)})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation is server-side, on the dev split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None


class FedKRSO(LogStrategy):
    """Round t: send K fresh seeds + the log entries each node lacks; average accumulators; apply; log."""

    def __init__(self, cfg: RunConfig, km: KrsoModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.km = km

    def summary(self) -> None:
        k = self.cfg.krso
        log(
            INFO,
            "FedKRSO: K=%d seeds/round, rank r=%d, I=%d intervals x J=%d steps, %d target matrices",
            k.k,
            k.rank,
            k.intervals,
            self.cfg.interval_steps,
            len(self.km.targets),
        )

    def _seeds(self, server_round: int) -> list[int]:
        return round_seeds(self.cfg.seed, server_round, self.cfg.krso.k)

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return pack_instruction(server_round, self._seeds(server_round), missed, self.km.head_state())

    def check_reply(self, content: RecordDict, server_round: int):
        return unpack_reply(content, server_round, self.cfg.krso.k, self.km.shapes, self.km.head_shapes)

    def max_reply_bytes(self) -> int:
        k = self.cfg.krso.k
        numbers = k * sum(math.prod(s) for s in self.km.shapes.values())
        numbers += sum(math.prod(s) for s in self.km.head_shapes.values())
        return reply_limit(4 * numbers, k * len(self.km.shapes) + len(self.km.head_shapes))

    def empty_entry(self, server_round: int) -> LogEntry:
        return LogEntry(server_round, tuple(self._seeds(server_round)), {})

    def restore(self, content: RecordDict) -> list[LogEntry]:
        ins = unpack_instruction(content, self.cfg.krso.k, self.km.shapes, self.km.head_shapes, self.cfg.seed)
        for entry in ins.log:
            apply_update(self.km.targets, entry.seeds, entry.bbar, self.cfg.krso.rank)
        self.km.set_head(ins.head)
        return ins.log

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return {**self.km.target_weights(), **self.km.head}

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        return self.km.target_weights()  # the head travels in every instruction

    def replay_passes(self, entry: LogEntry) -> float:
        return catchup.krso_passes(entry, {n: w.numel() for n, w in self.km.target_weights().items()})

    def update(self, server_round: int, weights: list[float], replies: list) -> LogEntry:
        # One update per reply: its accumulators (differences already) and its head (against the global head),
        # clipped together; absent accumulators are zero updates (common.robust).
        head = {("head", n): v for n, v in self.km.head_state().items()}
        merged = self.combine(
            server_round,
            weights,
            [{**r.accumulators, **{("head", n): v for n, v in r.head.items()}} for r in replies],
            head,
        )
        bbar = {k: v for k, v in merged.items() if k[0] != "head"}
        seeds = self._seeds(server_round)
        apply_update(self.km.targets, seeds, bbar, self.cfg.krso.rank)  # W <- W + sum_k Bbar_k P_k
        self.km.set_head({n: merged[("head", n)] for n in self.km.head})
        return LogEntry(server_round, tuple(seeds), bbar)


class FedSPZO(LogStrategy):
    """Round t: send the round seed ρ_t (+ the log a node lacks); average the scalars per (step, perturbation); replay."""

    def __init__(self, cfg: RunConfig, sm: SpzoModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.sm = sm

    def summary(self) -> None:
        c = self.cfg
        log(
            INFO,
            "FedSPZO: split at block %d (%d + %d perturbed numbers), P1=%d, P2=%d, %d steps, eps=%g, lr=%g",
            self.sm.split.split_layer,
            self.sm.pert1.numel if self.sm.pert1 else 0,
            self.sm.pert2.numel,
            c.spzo.p1,
            c.spzo.p2,
            c.train.local_steps,
            c.zo.eps,
            c.zo.lr,
        )

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return spzo_wire.pack_instruction(
            server_round, spzo.round_seed(self.cfg.seed, server_round), self.cfg.zo.lr, missed
        )

    def check_reply(self, content: RecordDict, server_round: int):
        c = self.cfg
        return spzo_wire.unpack_reply(content, server_round, c.spzo.p1, c.spzo.p2, c.train.local_steps, c.zo.eps)

    def max_reply_bytes(self) -> int:
        c = self.cfg
        return reply_limit(4 * c.train.local_steps * (c.spzo.p1 + c.spzo.p2), 2)

    def empty_entry(self, server_round: int) -> spzo.LogEntry:
        c = self.cfg
        rho = spzo.round_seed(c.seed, server_round)
        return spzo.LogEntry(
            server_round, rho, c.zo.lr, np.zeros((0, c.spzo.p1), np.float32), np.zeros((0, c.spzo.p2), np.float32)
        )

    def restore(self, content: RecordDict) -> list[spzo.LogEntry]:
        c = self.cfg
        entries = spzo_wire.unpack_instruction(content, c).log
        for entry in entries:
            spzo.replay(self.sm, entry)
        return entries

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.sm.params

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        return self.sm.params

    def replay_passes(self, entry: spzo.LogEntry) -> float:
        return catchup.spzo_passes(entry, self.sm.pert1.numel if self.sm.pert1 else 0, self.sm.pert2.numel)

    def update(self, server_round: int, weights: list[float], replies: list) -> spzo.LogEntry:
        g = self.combine(server_round, weights, [{"g1": r.g1, "g2": r.g2} for r in replies])  # per (step, pert.)
        entry = spzo.LogEntry(
            server_round, spzo.round_seed(self.cfg.seed, server_round), self.cfg.zo.lr, g["g1"], g["g2"]
        )
        spzo.replay(self.sm, entry)
        return entry


class FedKSeed(LogStrategy):
    """Round t: send the log a node lacks (K candidate seeds are fixed); average G per seed; replay."""

    def __init__(self, cfg: RunConfig, km: KseedModel, recorder: RunRecorder) -> None:
        super().__init__(cfg, recorder)
        self.km = km

    def summary(self) -> None:
        c = self.cfg
        log(
            INFO,
            "FedKSeed: K=%d candidate seeds, %d perturbation(s)/step over %d numbers, %d steps, eps=%g, lr=%g",
            c.kseed.k,
            c.kseed.perturbations,
            self.km.pert.numel,
            c.train.local_steps,
            c.zo.eps,
            c.zo.lr,
        )

    def instruction(self, server_round: int, missed: list) -> RecordDict:
        return kseed_wire.pack_instruction(server_round, self.cfg.zo.lr, missed)

    def check_reply(self, content: RecordDict, server_round: int):
        c = self.cfg
        estimates = c.train.local_steps * c.kseed.perturbations
        return kseed_wire.unpack_reply(content, server_round, c.kseed.k, c.zo.eps, estimates)

    def max_reply_bytes(self) -> int:
        return reply_limit(4 * self.cfg.kseed.k, 2)  # dense; sparse is smaller (8 B per seed used, < K/2 used)

    def empty_entry(self, server_round: int) -> kseed.LogEntry:
        return kseed.LogEntry(server_round, self.cfg.zo.lr, np.zeros(self.cfg.kseed.k, np.float32))

    def restore(self, content: RecordDict) -> list[kseed.LogEntry]:
        entries = kseed_wire.unpack_instruction(content, self.cfg).log
        for entry in entries:
            kseed.replay(self.km, entry, self.cfg.kseed.perturbations)
        return entries

    def global_tensors(self) -> dict[str, torch.Tensor]:
        return self.km.params

    def kept_tensors(self) -> dict[str, torch.Tensor]:
        return self.km.params

    def replay_passes(self, entry: kseed.LogEntry) -> float:
        return catchup.kseed_passes(entry)

    def update(self, server_round: int, weights: list[float], replies: list) -> kseed.LogEntry:
        # per candidate seed, absent = 0
        g = self.combine(server_round, weights, [{"G": r.scalars} for r in replies])["G"]
        entry = kseed.LogEntry(server_round, self.cfg.zo.lr, g)
        kseed.replay(self.km, entry, self.cfg.kseed.perturbations)
        return entry


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
