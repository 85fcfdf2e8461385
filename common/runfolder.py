"""A run folder, `<results-dir>/<run name>/`: what it holds of a run's records, and who may write it.

A new run never starts in a folder that holds another run's records (check_not_overwriting): nothing recorded
is truncated. The one exception is a run stopped before its first checkpoint (records, but neither a
checkpoint nor a summary): it cannot be resumed, so its records are moved aside (kept, renamed) and a run
started again under its name begins afresh (set_aside_unresumable).

One writer per run folder: the server holds `<run folder>/.lock` locked (flock, exclusive) for the whole run
(hold_run_folder), and checks and writes the folder only while it holds it, so two servers started on one
run-name at the same moment cannot both pass check_not_overwriting, and a second server started with
`resume-from` on a folder whose first server still runs is refused, by a message naming that server (its pid,
host, Flower run id and start time, which the holder writes into the lock file). The kernel drops the lock
when the process ends, however it ends (a SIGKILL, a crashed container): nothing stale is left to clean up.
A run that resumes from another folder is refused while a server writes that folder (check_not_written).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator, Sequence

from common.config import ConfigError
from common.files import move_aside

CHECKPOINT = "checkpoint.safetensors"  # the server checkpoint beside the records (server_app/checkpoint.py)
LOCK = ".lock"  # the run folder's writer lock (hold_run_folder)
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def held_records(folder: str) -> list[str]:
    """What a run folder holds of a run's records: summary.json, the checkpoint, every .jsonl with a row."""
    if not os.path.isdir(folder):
        return []
    return sorted(
        name
        for name in os.listdir(folder)
        if name in ("summary.json", CHECKPOINT)
        or (name.endswith(".jsonl") and os.path.isfile(p := os.path.join(folder, name)) and os.path.getsize(p) > 0)
    )


def stopped_before_checkpoint(held: Sequence[str]) -> bool:
    """Whether a run folder holding `held` (held_records) is that of a run stopped before its first checkpoint:
    records but neither a checkpoint nor a summary (stopped in round 1, or killed while writing that checkpoint,
    which leaves rows 0 and 1 and no checkpoint).

    Such a run is started again rather than resumed: a checkpoint is written after every completed round, so
    it has none to resume from, and what it recorded is only round 0 (the starting model's evaluation) and a
    round 1 that a fresh start with the same config does again, with the same seeds. The alternative, a
    checkpoint of the starting state before round 1, would cost every run a checkpoint write (FedAvg's whole
    model) to save nothing the config does not already hold."""
    return bool(held) and CHECKPOINT not in held and "summary.json" not in held


def check_not_overwriting(folder: str, resume_from: str) -> None:
    """Refuse to start a run in a folder that holds another run's records (a stopped run has rounds.jsonl and
    a checkpoint but no summary.json), unless `resume-from` continues the run of that very folder. A run
    stopped before its first checkpoint is not refused: RunRecorder sets its records aside and starts again."""
    held = held_records(folder)
    if not held or stopped_before_checkpoint(held):
        return
    source = resume_from if not resume_from or os.path.isdir(resume_from) else os.path.dirname(resume_from)
    if resume_from and os.path.realpath(source) == os.path.realpath(folder):
        return  # the same run, continued: it appends to its own records
    raise ConfigError(
        f"'{folder}' already holds a run's records ({', '.join(held)}); a new run there would overwrite them. "
        f"Continue that run with resume-from='{folder}' (and num-server-rounds above its last round), or choose "
        "another run-name"
    )


class RunFolderBusy(ConfigError):
    """A run folder that another live server is writing: one writer per run folder."""


def hold_run_folder(folder: str, run_id: int = 0) -> contextlib.AbstractContextManager[None]:
    """Hold `folder`'s writer lock for the block (the folder is made if missing); RunFolderBusy if another
    process holds it. Take it before check_not_overwriting and hold it until the last record is written:
    the check and the writes then belong to one server. A link at the run folder or at its lock is refused
    (the folder is checked once, here): the run's records are written where its name says."""
    os.makedirs(folder, exist_ok=True)
    if os.path.islink(folder):
        raise ConfigError(
            f"run folder '{folder}' is a symbolic link (to '{os.readlink(folder)}'): a run's records are never "
            "written through a link; point results-dir at the folder you want, or choose another run-name"
        )
    return _locked(os.path.join(folder, LOCK), fcntl.LOCK_EX, os.O_RDWR | os.O_CREAT, _holder(run_id))


def check_not_written(folder: str) -> None:
    """Refuse (RunFolderBusy) a run folder that a running server writes: a run resumed from it into another
    folder would fork a run that is still going. The lock is taken shared for an instant only, so a server
    starting on the folder at that moment waits for it rather than being refused. A folder no server ever
    locked (a copy, or one written before this lock existed) has no lock file: nothing is written into it."""
    path = os.path.join(folder, LOCK)
    if os.path.lexists(path):
        with _locked(path, fcntl.LOCK_SH, os.O_RDONLY, None):
            pass


@contextlib.contextmanager
def _locked(path: str, how: int, flags: int, holder: bytes | None) -> Iterator[None]:
    try:
        fd = os.open(path, flags | _NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ConfigError(
                f"'{path}' is a symbolic link, not a run folder's lock: remove it (the server makes its own)"
            ) from exc
        raise
    try:
        _flock(fd, how, os.path.dirname(path))
        if holder is not None:  # who holds it, for the message a second server gets
            os.ftruncate(fd, 0)
            os.pwrite(fd, holder, 0)
        yield
    finally:
        os.close(fd)  # closing the file drops the lock


def _flock(fd: int, how: int, folder: str, tries: int = 20) -> None:
    """flock without waiting on a writer: a few short retries ride over another process's instant check
    (check_not_written), then RunFolderBusy naming the holder."""
    for attempt in range(tries):
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if attempt + 1 == tries:
                raise RunFolderBusy(_busy(folder, os.pread(fd, 4096, 0))) from None
            time.sleep(0.05)


def _holder(run_id: int) -> bytes:
    started = time.strftime("%Y-%m-%d %H:%M:%S %z")
    return json.dumps(
        {"pid": os.getpid(), "host": socket.gethostname(), "flower-run-id": run_id, "started": started}
    ).encode()


def _busy(folder: str, holder: bytes) -> str:
    try:
        h = json.loads(holder)
        who = f"pid {h['pid']} on host {h['host']}, Flower run {h['flower-run-id']}, started {h['started']}"
    except (ValueError, TypeError, KeyError):
        who = "a server that has not yet written who it is"
    return (
        f"run folder '{folder}' is being written by a running server ({who}); one server writes a run folder at a "
        "time. Stop that run first (`flwr stop <its Flower run id>`, or let it finish), then continue it with "
        f"resume-from='{folder}'; or choose another run-name"
    )


def set_aside_unresumable(folder: str) -> list[str]:
    """Move aside the records of a run stopped before its first checkpoint (stopped_before_checkpoint), so that
    the run started again under its name writes its own from round 0: kept under `<name>.aside-<time>-<random>`,
    never truncated, and out of the way of the digests the next checkpoint counts. Returns the new names."""
    held = held_records(folder)
    if not stopped_before_checkpoint(held):
        return []
    why = "holds the records of a run stopped before its first checkpoint; the run starts again"
    return [move_aside(os.path.join(folder, name), why) for name in held]
