"""A node's copy of the global model, kept on its own disk, and the catch-up from the update log.

Methods whose global update is compact (FedKRSO, FedSPZO, FedKSeed) never send weights: each node keeps
the tensors the method changes at the global round it last reached, and applies the log entries it lacks.
The protocol is the same for all of them:
- the server sends the entries after the round it believes the node holds (normally only round T-1);
- a node whose stored state is newer than T-1 (the server went back) wipes it and asks for the whole log;
- a node whose state is older than the first entry sent (it lost its disk) replies "sync-only" with the
  round it holds, and the server sends the log from there next time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from flwr.app import MetricRecord, RecordDict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

STATE_DIR_ENV = "FEDSUBSPACE_STATE_DIR"


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

    Written atomically (temporary file, fsync, rename): a crash mid-write leaves the previous state. A file
    written under another setting (`fingerprint`), with other names or shapes, or unreadable, counts as
    absent: the node starts again from the pretrained weights.
    """

    def __init__(self, directory: str, name: str, fingerprint: str) -> None:
        self.path = os.path.join(directory, f"{name}.safetensors")
        self.fingerprint = fingerprint

    def load(self, tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy the stored values into `tensors`; returns the global round they are at (0 = pretrained)."""
        if not os.path.exists(self.path):
            return 0
        try:
            with safe_open(self.path, "pt") as f:
                meta = f.metadata() or {}
            if meta.get("fingerprint") != self.fingerprint:
                return 0
            stored = load_file(self.path)
            if set(stored) != set(tensors) or any(stored[n].shape != t.shape for n, t in tensors.items()):
                return 0
            reached = int(meta["round"])
        except Exception:  # unreadable or truncated: start again from the pretrained weights
            return 0
        with torch.no_grad():
            for name, t in tensors.items():
                t.copy_(stored[name])
        return reached

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.remove(self.path)

    def save(self, tensors: Mapping[str, torch.Tensor], server_round: int) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = self.path + ".tmp"
        save_file(
            {n: t.detach().contiguous() for n, t in tensors.items()},
            tmp,
            metadata={"round": str(server_round), "fingerprint": self.fingerprint},
        )
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class LogEntry(Protocol):
    round: int


def reach_round(
    store: NodeStore,
    tensors: Mapping[str, torch.Tensor],
    server_round: int,
    log: Sequence[LogEntry],
    apply: Callable[[Any], None],
) -> tuple[bool, int]:
    """Bring `tensors` to global round `server_round - 1`: load the stored state, apply the entries after it.

    Returns (True, server_round - 1), or (False, the round the node holds) when it cannot get there from
    its state and the entries sent; the caller then answers `sync_reply(that round)`.
    """
    holds = store.load(tensors)
    if holds > server_round - 1:  # a state from the future (the server went back): start over
        store.clear()
        return False, 0
    first = log[0].round if log else server_round
    if holds + 1 < first:
        return False, holds
    start = holds
    for entry in log:
        if entry.round == holds + 1:
            apply(entry)
            holds = entry.round
    if holds != start:
        store.save(tensors, holds)
    return holds == server_round - 1, holds


def sync_reply(holds_round: int) -> RecordDict:
    """The reply of a node that cannot train this round: it tells the server which round it holds."""
    return RecordDict({"metrics": MetricRecord({"model-round": int(holds_round), "sync-only": 1, "num-examples": 0})})
