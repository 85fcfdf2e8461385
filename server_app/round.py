"""The round every method's server shares: its setup's shape, node waiting and sampling, the one checked
reply path (each reply checked once, what the round keeps of it, its update decoded again when aggregated),
robust aggregation, a failed round, and RoundStrategy, the round's template.

Each method's own strategy and setup live in its package (methods/<method>/server.py) and fill in only what
is the method's: its instruction, its reply check, its update. The methods whose nodes keep the model and
replay an update log build on LogStrategy (server_app/updatelog.py).
"""

from __future__ import annotations

import random
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from torch import nn

from common import robust
from common.config import RunConfig
from common.records import ClientStats, RunRecorder
from common.robust import capped_weights
from common.wire import INSTRUCTION_REFUSED, WireError, check_size, checked_metrics, content_bytes


@dataclass
class ServerSetup:
    model: nn.Module  # the global model, evaluated on the dev split (the strategy updates it in place)
    strategy: Strategy  # holds the global model's trained part; its state_dict is the checkpoint's


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


def failed_node(msg: Message, owed: dict[int, Message | None]) -> int | str:
    """The node an error reply reports on, marked as answered: its sender when that node was sent an instruction,
    else the node whose instruction it answers. Flower's SuperLink answers for a node it lost ("node
    unavailable") under its own id, replying to the instruction it could not deliver; "?" when neither says."""
    node = msg.metadata.src_node_id
    if node not in owed:
        asked = msg.metadata.reply_to_message_id
        node = next((n for n, m in owed.items() if m is not None and asked and m.metadata.message_id == asked), None)
    if node is None:
        return "?"
    owed[node] = None  # it failed this round: a later reply of its own is not the one it owed
    return node


def unexpected_reply(msg: Message, owed: dict[int, Message | None]) -> str | None:
    """Why `msg` is not the one reply its node owes this round, or None (`owed`: see checked_replies).

    A reply counts only from a node that was sent this round's instruction, only as an answer to that very
    instruction, and only once: Flower's transport ensures all three today, and the aggregate must not
    depend on it (a duplicated delivery would count twice; a reply relabelled as another node's would take
    that node's place). The instruction's id is the one the Grid gave it when pushing it; a Grid that pushed a
    copy leaves ours empty, and then the node alone is checked."""
    node = msg.metadata.src_node_id
    if node not in owed:
        return f"node {node} was sent no instruction this round"
    sent = owed[node]
    if sent is None:
        return f"node {node} already answered this round: a second reply (or the same one delivered twice) counts once"
    expected = sent.metadata.message_id
    if expected and msg.metadata.reply_to_message_id != expected:
        return f"it answers message {msg.metadata.reply_to_message_id[:16]!r}, not the instruction node {node} was sent"
    return None


class Accepted:
    """What a round keeps of its replies that passed checked_replies until it aggregates: per accepted reply its
    position in Flower's list of replies (which Flower holds through the round anyway; the reply's node is its
    Message's src_node_id), its example count and its train-loss (0 when absent), each as its check read it, in
    plain arrays (20 bytes a reply); the other client metrics the records use are folded into `stats`. Nothing
    of a reply's arrays is kept: the aggregation decodes them again from its Message when it reads them
    (`replies`, Replies)."""

    __slots__ = ("examples", "losses", "messages", "positions", "stats")

    def __init__(self, messages: Sequence[Message]) -> None:
        self.messages = messages  # Flower's list of the round's replies
        self.positions = array("I")  # 4 bytes: a round of more than 4 billion replies is not one Flower hands over
        self.examples, self.losses = array("d"), array("d")
        self.stats = ClientStats()

    def add(self, position: int, num_examples: int, metrics: Mapping[str, float]) -> None:
        """Keep one reply; all or nothing (the arrays stay the same length if any value does not fit)."""
        at = array(self.positions.typecode, [position])  # raises here or never
        examples, loss = float(num_examples), float(metrics.get("train-loss", 0.0))
        self.stats.add({**metrics, "num-examples": num_examples})
        self.positions.extend(at)
        self.examples.append(examples)
        self.losses.append(loss)

    def __len__(self) -> int:
        return len(self.positions)

    def replies(self, read: Callable[[RecordDict], Any]) -> Replies:
        """The accepted replies as the aggregation reads them: each decoded by `read` when read."""
        return Replies(self.messages, read, self.positions)


def checked_replies(
    server_round: int,
    replies: Iterable[Message],
    check: Callable[[int, RecordDict], tuple[int, Mapping[str, float]] | None],
    max_bytes: int,
    owed: dict[int, Message | None],
) -> tuple[Accepted, int, int, int]:
    """The replies that pass, failures, rejected, bytes up (all replies counted).

    The one checked path of every method's replies, each reply checked once (`owed`: the round's instruction to
    each node, from `instructions_owed`; a node's entry is set to None when it answers). A reply that carries
    an error (Message.has_error) is a failure, counted with its reason logged, whatever node id it carries
    (failed_node). A reply that is not the one its node owes (unexpected_reply) is rejected; a reply larger than
    `max_bytes` (content bytes) is rejected before anything in it is decoded; then `check(node, content)`
    decodes and checks it and returns its (example count, metrics), or None for a valid reply that carries no
    update (a sync-only reply: the strategy takes note of it and it is not aggregated). ANY exception while
    checking one reply (WireError for what the wire formats refuse, but also whatever a crafted reply might
    provoke in numpy or Flower) rejects that reply only, is logged, and the round goes on: `rejected` counts
    only replies that failed a check.
    """
    accepted = Accepted(replies if isinstance(replies, Sequence) else list(replies))
    failures = rejected = bytes_up = 0
    for position, msg in enumerate(accepted.messages):
        node = msg.metadata.src_node_id
        if msg.has_error():  # a failure, whoever reports it: the node itself, or the SuperLink for a node it lost
            failures += 1
            node = failed_node(msg, owed)
            what = "refused the instruction" if msg.error.code == INSTRUCTION_REFUSED else "failed"
            log(WARNING, "node %s %s in round %d: [code %s] %s", node, what, server_round, msg.error.code,
                str(msg.error.reason)[-500:])  # fmt: skip
            continue
        problem = unexpected_reply(msg, owed)
        if problem is None:
            owed[node] = None  # answered: a second reply counts once
        try:
            if problem is not None:
                raise WireError(problem)
            bytes_up += content_bytes(msg.content)
            check_size(msg.content, max_bytes)
            kept = check(node, msg.content)
            if kept is not None:
                accepted.add(position, *kept)
        except Exception as exc:  # noqa: BLE001 - see the docstring: one bad reply never ends the round
            rejected += 1
            log(WARNING, "reply of node %d rejected in round %d: %s", node, server_round, str(exc)[:500])
    return accepted, failures, rejected, bytes_up


def instructions_owed(sent: Iterable[Message]) -> dict[int, Message | None]:
    """node -> the instruction it was sent this round: what checked_replies accepts a reply to (made when the
    instructions are sent, beside them)."""
    return {m.metadata.dst_node_id: m for m in sent}


class RoundFailed(Exception):
    """The round's aggregate cannot be applied; the message is the reason the records keep."""


class Replies(Sequence):
    """A round's accepted replies as the aggregation reads them: each one's update decoded again from its Message
    every time it is read, and not kept, so that reading them one at a time holds one decoded reply, however
    many there are (common.robust's weighted mean reads them so: once, or twice with norm bounding; the robust
    rules hold every reply anyway). Only the update is decoded (RoundStrategy.read_update): the metrics were
    checked once, when the reply was (checked_replies).

    `read` is the decode and check the reply passed already, which is deterministic: a reply reads as the same
    values every time, bit for bit. If it raises all the same, the round cannot be aggregated with the weights
    already drawn up: RoundFailed, and the round ends as any failed round does (the global model unchanged).
    `map(f)`: the same replies read as f(update), e.g. the arrays a method aggregates. `positions`: which of
    `messages` they are, in order (default: all of them); no list of the Messages is made."""

    def __init__(
        self, messages: Sequence[Message], read: Callable[[RecordDict], Any], positions: Sequence[int] | None = None
    ) -> None:
        self._messages, self._read = messages, read
        self._positions = range(len(messages)) if positions is None else positions

    def map(self, f: Callable[[Any], Any]) -> Replies:
        read = self._read
        return Replies(self._messages, lambda content: f(read(content)), self._positions)

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return Replies(self._messages, self._read, self._positions[i])
        return self._decoded(self._messages[self._positions[i]])

    def _decoded(self, msg: Message):
        try:
            return self._read(msg.content)
        except Exception as exc:  # noqa: BLE001 - checked once already: the round fails, the server goes on
            node = msg.metadata.src_node_id
            raise RoundFailed(f"the reply of node {node}, decoded again to aggregate, failed: {exc}"[:500]) from exc

    def __iter__(self) -> Iterator:
        for p in self._positions:
            yield self._decoded(self._messages[p])


def robust_aggregate(
    cfg: RunConfig,
    recorder: RunRecorder,
    server_round: int,
    replies: Sequence[dict],
    weights: list[float],
    reference: dict | None = None,
) -> dict:
    """common.robust.aggregate_round by the run's aggregation.*, the one aggregation of every method, with
    what it did recorded: the replies it clipped, and a warning when the round has too few replies for its
    rule to absorb aggregation.attackers hostile ones. Raises RoundFailed when the aggregate is not finite (or
    when a reply of `replies`, a Replies, fails to decode again while it is read)."""
    ag = cfg.aggregation
    result = robust.aggregate_round(replies, weights, **robust.settings(ag), reference=reference)
    recorder.add_clipped(result.clipped)
    if ag.rule != "mean" and result.absorbed < ag.attackers:
        applied = robust.round_rule(len(replies), ag.rule, ag.attackers)
        message = (
            f"round {server_round}: {ag.rule} of {len(replies)} replies absorbs {result.absorbed} hostile one(s), "
            f"fewer than aggregation.attackers = {ag.attackers}"
            + (f" (that needs {needed} replies)" if (needed := robust.replies_needed(ag.rule, ag.attackers)) else "")
            + (f": the round is the {applied}" if applied != ag.rule else "")
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


def mean_train_loss(weights: Sequence[float], losses: Sequence[float]) -> float:
    """The round's train-loss: the replies' losses weighted by their (capped) example weights."""
    return float(sum(w * loss for w, loss in zip(weights, losses, strict=True)) / sum(weights))


class RoundStrategy(Strategy):
    """The round of every method: choose this round's nodes (choose_nodes), send each its instruction, check
    every reply once on the one checked path (checked_replies, `check_reply`), weigh the valid ones (capped
    example weights), apply their aggregate, record the round. A method fills in `instructions`,
    `read_update`, `reply_size_limit` and `apply` (and `check_reply` and `unchanged` where it keeps more state).
    Malformed replies are rejected and counted, failed ones counted as failures; a round without valid replies,
    or whose aggregate cannot be applied (RoundFailed), leaves the global model as it was. Evaluation is the
    server's, on the dev split. The strategy holds the global model's trained part: `state_dict` is what the
    checkpoint keeps of it.

    Each reply is checked once: its metrics (common.wire.checked_metrics) and its update (`read_update`), and
    the round keeps of it its position, example count and train-loss (Accepted, 20 bytes a reply), then its
    capped weight and, with norm bounding, its update norm (float64 arrays, 8 bytes each); the update is
    dropped and decoded again from its Message where the aggregation reads it (Replies, `apply`), so under the
    weighted mean the round holds one decoded reply at a time and its memory does not grow with the number of
    replies beyond those few numbers, 36 bytes a reply (bench/scale.py, docs/scale.md)."""

    def __init__(self, cfg: RunConfig, recorder: RunRecorder) -> None:
        self.cfg, self.recorder = cfg, recorder
        self._rng = random.Random(cfg.seed)  # client sampling: its state is checkpointed
        self._owed: dict[int, Message | None] = {}  # this round's instructions: the replies it may accept

    def instructions(self, server_round: int, nodes: list[int]) -> list[RecordDict]:
        """This round's instruction to each of `nodes`, in their order."""
        raise NotImplementedError

    def read_update(self, content: RecordDict, server_round: int):
        """A reply's update, decoded and checked (its records, keys, dtypes, shapes and bounds; not its metrics,
        which check_reply checks); raises WireError if malformed. Read when the reply is checked and again
        wherever the aggregation reads it (Replies): deterministic, the same values every time."""
        raise NotImplementedError

    def reply_size_limit(self, server_round: int) -> int:
        """The size limit of one reply (common.wire.reply_limit of what an honest reply carries)."""
        raise NotImplementedError

    def check_reply(self, server_round: int, node: int, content: RecordDict) -> tuple[int, Mapping[str, float]] | None:
        """Check node's reply once: its metrics and its update (read_update, then dropped). Returns its example
        count and metrics, or None for a valid reply that carries no update (default: every reply carries one)."""
        n, metrics = checked_metrics(content, server_round)
        self.read_update(content, server_round)
        return n, metrics

    def apply(self, server_round: int, weights: Sequence[float], replies: Replies) -> dict:
        """Aggregate the replies (capped example weights; `combine`, which raises RoundFailed for a non-finite
        aggregate, of `replies.map(...)`: each reply's update, decoded when read) into the global model;
        returns the round's metrics beyond train-loss and clients. Nothing is changed before the aggregate is
        complete: a reply that fails to decode again raises RoundFailed while it is read."""
        raise NotImplementedError

    def unchanged(self, server_round: int) -> None:
        """The round ends without an update (no valid reply, or RoundFailed)."""

    def combine(self, server_round: int, weights: Sequence[float], replies: Sequence[dict], reference=None) -> dict:
        return robust_aggregate(self.cfg, self.recorder, server_round, replies, weights, reference)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self.recorder.begin_round(server_round)
        chosen = choose_nodes(self._rng, grid, self.cfg)
        messages = []
        for node, content in zip(chosen, self.instructions(server_round, chosen), strict=True):
            self.recorder.add_down(content_bytes(content))
            messages.append(Message(content, dst_node_id=node, message_type=MessageType.TRAIN))
        self._owed = instructions_owed(messages)
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        accepted, failures, rejected, bytes_up = checked_replies(
            server_round,
            replies,
            lambda node, content: self.check_reply(server_round, node, content),
            self.reply_size_limit(server_round),
            self._owed,
        )
        self.recorder.add_replies(bytes_up, accepted.stats, failures, rejected)
        if not len(accepted):
            log(WARNING, "round %d: no valid reply, the global model is unchanged", server_round)
            self.unchanged(server_round)
            return None, None
        weights = capped_weights(accepted.examples, self.cfg.aggregation.weight_cap)
        loss = mean_train_loss(weights, accepted.losses)
        try:
            extra = self.apply(server_round, weights, accepted.replies(lambda c: self.read_update(c, server_round)))
        except RoundFailed as exc:
            fail_round(self.recorder, server_round, str(exc))
            self.unchanged(server_round)
            return None, None
        # the global model is the strategy's: Flower's Strategy.start carries nothing from round to round
        return ArrayRecord(), MetricRecord({"train-loss": loss, "clients": len(accepted), **extra})

    def configure_evaluate(self, server_round, arrays, config, grid) -> Iterable[Message]:
        return []  # evaluation is server-side, on the dev split

    def aggregate_evaluate(self, server_round, replies) -> MetricRecord | None:
        return None
