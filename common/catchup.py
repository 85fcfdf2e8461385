"""Bounded catch-up: a node far behind gets a snapshot of the tensors it keeps instead of the update log.

FedKRSO, FedSPZO and FedKSeed nodes keep "the tensors the method changes" at the round they reached
(common.nodestore) and normally replay the log entries they lack. A node that starts fresh or rejoins after
k rounds would get k entries: without bound in bytes (FedKRSO on MiniLM: 2.6 MB a round) and in replay time
(a zero-order entry is S x P passes over the perturbed numbers, 11M each with zo.params = "all"). The server
instead sends the current global values of exactly those tensors when they cost less:

    snapshot  iff  bytes(missed entries) > bytes(snapshot)  or  passes(missed entries) > MAX_REPLAY_PASSES

so a node k rounds behind receives min(log since its round, snapshot) in bytes, replays at most
MAX_REPLAY_PASSES passes, and a node one or a few rounds behind still gets only those rounds' entries.

What the snapshot is: the values themselves (W_{T-1}), not the accumulated change W_{T-1} - W_0. Same size,
but setting them needs no base and reproduces the server's tensors bit for bit: W_0 + (W_{T-1} - W_0)
rounds in float32, so the node would differ from the server in the last bits and the zero-order methods'
bit-exact replay (common.zeroorder) would be lost from that round on. Their values are weights, bounded
like every other model-like number on the wire.

Wire format (server -> client, in the method's "train" instruction, IN PLACE of its log entries):
  "snapshot" ArrayRecord   for every tensor the node keeps (its NodeStore's names: FedKRSO's target matrices,
                           module name -> weight; the zero-order methods' perturbed parameters, parameter
                           name -> value): float32 of the node's own shape, the server's global values
                           after round T-1, exactly
  "config"   ConfigRecord  the method's keys, plus snapshot-round: int = T-1; log-first = T (no entries)
Checks (client, `unpack_snapshot`, before its state is read; a refusal raises WireError and changes
nothing): the record and snapshot-round come together; snapshot-round = server-round - 1 >= 1; log-first =
server-round; exactly the kept tensors' names (common.wire.unpack_tensors), each float32 of its shape
(read from the bytes, common.wire.decode_array), finite, within the instruction bound 2 x VALUE_BOUND.
Then (common.nodestore.reach_round) the values are set, saved at round T-1, and the node trains as after
any catch-up. Sizes: 4 bytes a kept number (+ keys and .npy headers). MiniLM: FedKRSO's targets 42.5 MB
(0.47 of FedAvg's 90.3 MB download); zo.params = "bitfit" 137 KB, "all" 42.6 MB.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import log

from common.wire import (
    VALUE_BOUND,
    WireError,
    config_int,
    content_bytes,
    instruction_bound,
    pack_tensors,
    require,
    unpack_tensors,
)

SNAPSHOT = "snapshot"  # the record
ROUND = "snapshot-round"  # its key in "config"

# Replay budget, in passes over the kept numbers (one pass: draw one z and add it, or one rank-r update
# W += Bbar P of FedKRSO; it touches each number once). Measured here (x86_64, one thread) a Rademacher pass
# costs 1.5 ns a number; a snapshot costs 4 bytes a number. 1024 passes then take as long as downloading the
# snapshot at 2.6 MB/s: beyond that the snapshot is the faster catch-up on any such link.
MAX_REPLAY_PASSES = 1024


@dataclass(frozen=True)
class Cost:
    """What replaying log entries costs a node: bytes on the wire, passes over its kept numbers."""

    bytes: int
    passes: float


def use_snapshot(missed: Sequence[Cost], snapshot_bytes: int) -> bool:
    """Whether the snapshot is cheaper than these entries (the rule in the module docstring)."""
    return sum(c.bytes for c in missed) > snapshot_bytes or sum(c.passes for c in missed) > MAX_REPLAY_PASSES


class CatchUp:
    """The server's side: each node's instruction with either its missed entries or the snapshot.

    `pack(server_round, entries)` is the method's instruction, `kept()` the global tensors its nodes keep,
    `passes(entry)` an entry's replay passes. Each entry's cost is computed once (packed alone) and only as far
    back as the decision needs; the snapshot is packed at most once a round and shared by that round's nodes.
    """

    def __init__(
        self,
        pack: Callable[[int, Sequence], RecordDict],
        kept: Callable[[], Mapping[str, torch.Tensor]],
        passes: Callable[[Any], float],
    ) -> None:
        self.pack, self.kept, self.passes = pack, kept, passes
        self._costs: dict[int, Cost] = {}
        self._record: tuple[int, ArrayRecord | None] | None = None  # (server round, its snapshot)
        self._bytes: int | None = None  # of a snapshot record: the same every round (same names and shapes)

    def cost(self, entry: Any) -> Cost:
        if entry.round not in self._costs:
            t = entry.round
            size = content_bytes(self.pack(t + 1, [entry])) - content_bytes(self.pack(t + 1, []))
            self._costs[entry.round] = Cost(size, float(self.passes(entry)))
        return self._costs[entry.round]

    def snapshot(self, server_round: int) -> ArrayRecord | None:
        """The kept tensors' values now (after round T-1), or None where they exceed what a node accepts."""
        if self._record is None or self._record[0] != server_round:
            self._record = (server_round, pack_snapshot(self.kept()))
            if self._record[1] is not None:
                self._bytes = self._record[1].count_bytes()
        return self._record[1]

    def instruction(self, server_round: int, missed: Sequence) -> tuple[RecordDict, int]:
        """(the instruction for a node that lacks `missed`, the bytes of its snapshot record or 0 if it has none)."""
        if missed and self._bytes is None:
            self.snapshot(server_round)  # learns the size
        if missed and self._bytes is not None and self._cheaper(missed):
            record = self.snapshot(server_round)
            if record is not None:
                return attach(self.pack(server_round, []), record, server_round), record.count_bytes()
        return self.pack(server_round, missed), 0

    def _cheaper(self, missed: Sequence) -> bool:
        costs: list[Cost] = []
        for entry in reversed(missed):  # newest first; stop as soon as the snapshot wins
            costs.append(self.cost(entry))
            if use_snapshot(costs, self._bytes):
                return True
        return False


def pack_snapshot(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord | None:
    """The "snapshot" record of these float32 tensors, or None (a warning logged) where a value lies beyond
    the instruction bound nodes accept: then the log is sent, which they do accept."""
    bound = instruction_bound(VALUE_BOUND)
    for name, t in tensors.items():
        if t.dtype != torch.float32:
            raise TypeError(f"a snapshot holds float32 values exactly; {name} is {t.dtype}")
        top = float(t.detach().abs().max()) if t.numel() else 0.0
        if not (math.isfinite(top) and top <= bound):
            log(WARNING, "no snapshot: |%s| reaches %.3g, beyond the bound %g nodes accept", name, top, bound)
            return None
    return pack_tensors(tensors)


def attach(content: RecordDict, record: ArrayRecord, server_round: int) -> RecordDict:
    """Add the snapshot of round T-1 to an instruction that carries no log entries."""
    config = content["config"]
    if config["log-first"] != server_round:
        raise ValueError("a snapshot replaces the log entries: pack the instruction without them")
    config[ROUND] = int(server_round) - 1
    content[SNAPSHOT] = record
    return content


def unpack_snapshot(
    content: RecordDict, server_round: int, kept: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor] | None:
    """The checked snapshot of an instruction (None: it has none); raises WireError (see the module docstring)."""
    config = require(content, "config", ConfigRecord)
    if SNAPSHOT not in content and ROUND not in config:
        return None
    if SNAPSHOT not in content or ROUND not in config:
        raise WireError(f"an instruction with a snapshot needs both the '{SNAPSHOT}' record and config {ROUND}")
    at = config_int(config, ROUND)
    if at != server_round - 1 or at < 1:
        raise WireError(f"{ROUND} {at} in server-round {server_round}: a snapshot holds round server-round - 1 >= 1")
    if config_int(config, "log-first", 1) != server_round:
        raise WireError("an instruction carries a snapshot or log entries, not both")
    shapes = {name: tuple(t.shape) for name, t in kept.items()}
    return unpack_tensors(SNAPSHOT, require(content, SNAPSHOT, ArrayRecord), shapes, instruction_bound(VALUE_BOUND))


def apply_snapshot(tensors: Mapping[str, torch.Tensor], snapshot: Mapping[str, torch.Tensor]) -> None:
    """Set the kept tensors to the snapshot's values (checked by unpack_snapshot: the same names and shapes)."""
    with torch.no_grad():
        for name, t in tensors.items():
            t.copy_(snapshot[name])
