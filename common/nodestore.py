"""A node's copy of the global model, kept on its own disk, and the catch-up from the update log.

Methods whose global update is compact (FedKRSO, FedSPZO, FedKSeed) never send weights: each node keeps
the tensors the method changes at the global round it last reached, and applies the log entries it lacks.
The protocol is the same for all of them:
- the server sends the entries after the round it believes the node holds (normally only round T-1);
- a node whose stored state is newer than T-1 (the server went back) ignores it and asks for the whole log;
- a node whose stored state does not verify (NodeStore) treats it as absent and asks for the whole log;
- a node whose state is older than the first entry sent (it lost its disk) replies "sync-only" with the
  round it holds, and the server sends the log from there next time;
- a node far behind gets, instead of the entries, the values of round T-1 (common.catchup's snapshot).
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import xxhash
from flwr.app import MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file

from common.catchup import apply_snapshot
from common.files import kind, make_folder, move_aside, replace_file
from common.wire import WireError

STATE_DIR_ENV = "FEDSUBSPACE_STATE_DIR"
CHECKSUM = "fedsubspace-nodestore-v2"  # the header key of the state's checksum, and its first bytes

log = logging.getLogger(__name__)


def all_finite(t: torch.Tensor) -> bool:
    """Whether a tensor holds no NaN and no infinity (an integer one always does). One pass of aminmax, whose
    minimum and maximum are NaN where any value is and infinite where any value is: 20x faster than
    torch.isfinite(t).all(), which writes a mask as large as the tensor (0.26 s for a FedKRSO node's 405 MB of
    SmolLM2 targets, twice a round)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    low, high = torch.aminmax(t.detach())
    return bool(torch.isfinite(low) and torch.isfinite(high))


class DamagedState(Exception):
    """The stored state does not verify; the message says why."""


def state_checksum(tensors: Mapping[str, torch.Tensor], server_round: int, fingerprint: str) -> str:
    """XXH3-128 over the round, the fingerprint and every tensor's name, dtype, shape and bytes (sorted by name).

    The round and fingerprint are inside the hash, so a round label changed in the file's header does not
    verify even though the header itself is plain JSON. The check is against damage (a torn write, flipped
    bits, a file of another run), not against someone who can write the node's disk: with no secret in it a
    SHA-256 would not stop them either, and XXH3 (the `xxhash` package, which `datasets` already needs) hashes a
    FedKRSO node's 405 MB of SmolLM2 targets at memory speed where SHA-256 took about 0.25 s each way a round.
    """
    h = xxhash.xxh3_128(f"{CHECKSUM}\0{int(server_round)}\0{fingerprint}\0".encode())
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(raw_bytes(t))
    return h.hexdigest()


def raw_bytes(t: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's bytes, in place (no copy): what is hashed and what is written."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def safetensors_parts(tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> list[bytes | memoryview]:
    """A safetensors file (the format https://huggingface.co/docs/safetensors defines, read back by the library)
    as its header and then each tensor's bytes in place.

    The library's own writer (`safetensors.torch.save`) copies every tensor into one buffer first: 2.3 s and
    twice the memory for a FedKRSO node's 405 MB of SmolLM2 targets, every round. Here nothing is copied; the
    header is the library's: 8 bytes of little-endian length, JSON padded with spaces to a multiple of 8."""
    plain = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in plain.items():
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _SAFETENSORS_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return [struct.pack("<Q", len(text)) + text, *(raw_bytes(t) for t in plain.values() if t.numel())]


def state_dir(node_config: Mapping[str, Any], run_id: int, node_id: int) -> str:
    """Node config `state-dir`, else $FEDSUBSPACE_STATE_DIR, else ~/.cache/fedsubspace; one folder per run and node."""
    root = (
        node_config.get("state-dir")
        or os.environ.get(STATE_DIR_ENV)
        or os.path.join(os.path.expanduser("~"), ".cache", "fedsubspace")
    )
    return os.path.join(str(root), f"run-{run_id}", f"node-{node_id}")


class NodeStore:
    """Named tensors at a global round, in `<directory>/<name>.safetensors`.

    Written atomically (common.files.replace_file: an exclusive temporary file renamed over the file, not
    fsynced: the state is a cache that the log rebuilds): a crash of the process leaves the previous state
    or the new one; a power cut can leave a torn file, which the checksum refuses. The header carries the round, the fingerprint and a checksum (`state_checksum`)
    over both and the tensors' bytes. A file written under another setting (`fingerprint`), with other names or shapes,
    unreadable or truncated, whose checksum does not verify (flipped bits, a round label changed), or holding
    a non-finite value counts as absent: the node starts again from the pretrained weights and asks for the
    whole log; it never trains on such a state. A warning says why it was discarded. Something other than a
    file at the state's path (a folder, a pipe) is moved aside (common.files.move_aside) and counts as absent too.
    """

    def __init__(self, directory: str, name: str, fingerprint: str) -> None:
        self.path = os.path.join(directory, f"{name}.safetensors")
        self.fingerprint = fingerprint

    def load(self, tensors: Mapping[str, torch.Tensor], newest: int | None = None) -> int:
        """Copy the stored values into `tensors`; returns the global round they are at (0 = pretrained).

        A state past round `newest` is not copied (0 is returned) and the file is kept: it is replaced only when
        the node has rebuilt a state from the whole log (or got a snapshot, common.catchup)."""
        found = kind(self.path)
        if found == "link":  # the target decides (a link to a folder is as wrong as a folder)
            found = "file" if os.path.isfile(self.path) else "absent" if not os.path.exists(self.path) else "other"
        if found == "absent":
            return 0
        if found != "file":  # a folder or a pipe here would fail every read and every save, round after round
            move_aside(self.path, "is not a file: the node state counts as absent, the node resyncs from the whole log")
            return 0
        try:
            stored, reached = self._verified(tensors)
        except Exception as e:  # anything that does not verify is absent: the node resyncs from the whole log
            reason = str(e) if isinstance(e, DamagedState) else f"unreadable ({type(e).__name__}: {e})"
            log.warning(
                "Node state %s discarded, %s; starting from the pretrained weights and the whole log", self.path, reason
            )
            return 0
        if newest is not None and reached > newest:
            log.warning(
                "Node state %s holds round %d, past round %d: starting from the whole log", self.path, reached, newest
            )
            return 0
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(stored[name])
        return reached

    def _verified(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
        with safe_open(self.path, "pt") as f:
            meta = f.metadata() or {}
        if meta.get("fingerprint") != self.fingerprint:
            raise DamagedState("it was written under another setting (fingerprint differs)")
        stored = load_file(self.path)
        if set(stored) != set(tensors) or any(stored[n].shape != t.shape for n, t in tensors.items()):
            raise DamagedState("its tensor names or shapes differ from the model's")
        reached = int(meta["round"])
        if reached < 0:
            raise DamagedState(f"its round {reached} is negative")
        if CHECKSUM not in meta:
            raise DamagedState(f"it has no '{CHECKSUM}' checksum (written by an older version)")
        if meta[CHECKSUM] != state_checksum(stored, reached, self.fingerprint):
            raise DamagedState("its checksum does not verify (damaged data or a changed round label)")
        bad = [n for n, t in stored.items() if not all_finite(t)]
        if bad:
            raise DamagedState(f"it holds non-finite values in {bad[0]}")
        return stored, reached

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def save(self, tensors: Mapping[str, torch.Tensor], server_round: int) -> None:
        make_folder(os.path.dirname(self.path))
        plain = {n: t.detach().contiguous().cpu() for n, t in tensors.items()}
        meta = {
            "round": str(server_round),
            "fingerprint": self.fingerprint,
            CHECKSUM: state_checksum(plain, server_round, self.fingerprint),
        }
        # not fsynced: the state is a cache of what the update log (or a snapshot) rebuilds, checked whole when
        # read, so a file a power cut left torn is discarded and rebuilt (common.files.replace_file)
        replace_file(self.path, safetensors_parts(plain, meta), durable=False)


class LogEntry(Protocol):
    round: int


def reach_round(
    store: NodeStore,
    tensors: Mapping[str, torch.Tensor],
    server_round: int,
    log: Sequence[LogEntry],
    apply: Callable[[Any], None],
    snapshot: Mapping[str, torch.Tensor] | None = None,
) -> tuple[bool, int]:
    """Bring `tensors` to global round `server_round - 1`: load the stored state, apply the entries after it.

    Returns (True, server_round - 1), or (False, the round the node holds) when it cannot get there from
    its state and the entries sent; the caller then answers `sync_reply(that round)`. Raises WireError (the
    instruction is refused) if the entries would make the model non-finite; nothing is saved then.
    `snapshot` (common.catchup, checked): the server's values of round T-1, set and saved instead of a replay.
    """
    # A state past T-1 (the server went back: a restart without resume-from, or an instruction that lies about
    # the round) counts as absent but is not deleted: an instruction can make a node ignore its state, not lose it.
    holds = store.load(tensors, newest=server_round - 1)
    if snapshot is not None:  # common.catchup: a node far behind gets the values of T-1, not the log
        apply_snapshot(tensors, snapshot)
        store.save(tensors, server_round - 1)
        return True, server_round - 1
    first = log[0].round if log else server_round
    if holds + 1 < first:
        return False, holds
    start = holds
    for entry in log:
        if entry.round == holds + 1:
            apply(entry)
            holds = entry.round
    if holds != start:
        bad = [n for n, t in tensors.items() if not all_finite(t)]
        if bad:  # the bounds of common.wire make this unreachable for a checked log; never store such a state
            raise WireError(f"the update log makes {bad[0]} non-finite at round {holds}: refused, state not saved")
        store.save(tensors, holds)
    return holds == server_round - 1, holds


def sync_reply(holds_round: int) -> RecordDict:
    """The reply of a node that cannot train this round: it tells the server which round it holds."""
    return RecordDict({"metrics": MetricRecord({"model-round": int(holds_round), "sync-only": 1, "num-examples": 0})})
