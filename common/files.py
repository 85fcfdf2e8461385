"""Files replaced whole or not at all, never through a planted link, and paths of the wrong kind moved aside.

Every writer that replaces a file (the server checkpoint, a node's stored state, the run records, the
benchmark's results) goes through `replace_file`: the bytes go to `<file>.tmp`, created exclusively
(O_CREAT | O_EXCL | O_NOFOLLOW), fsynced and renamed over the file, then the folder is fsynced. A crash at
any point leaves the previous file whole. (A node's stored state leaves out the fsyncs: `durable=False`.) Whatever already sits at `<file>.tmp` (a crash's leftover, or a
link planted to make the writer overwrite another file) is removed first, never written through: a link
is unlinked, not followed, and if one is planted again between the removal and the creation, the exclusive
creation fails instead of following it.

Files that are appended to or read in place (a run's records, its checkpoint and update log) are opened with
`open_file`, the way a database opens its files: O_NOFOLLOW, so a link planted at the name (to make the
server append its rows to another file, or read another file as its records) is refused with an error that
names it instead of being followed, and only a regular file is accepted (a pipe would block the writer).

A path that should hold a file but holds a folder (or a folder that is a file, a pipe, ...) is renamed to
`<path>.aside-<time>-<random>` (`move_aside`): kept for whoever wants to look, and out of the way, so the
writer does not fail on it at every round.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
import time
import uuid
from collections.abc import Iterable

log = logging.getLogger(__name__)

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_EXCLUSIVE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW


class NotAFile(OSError):
    """A path opened as a plain file that is a link or not a regular file: nothing was read or written."""


def open_file(path: str, flags: int, mode: int = 0o644) -> int:
    """os.open of the regular file at `path`, never through a link; NotAFile naming what is there otherwise."""
    try:
        fd = os.open(path, flags | _NOFOLLOW | os.O_NONBLOCK, mode)  # O_NONBLOCK: a planted pipe does not hang it
    except OSError as exc:
        if kind(path) in ("absent", "file"):
            raise
        raise NotAFile(_not_a_file(path)) from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotAFile(_not_a_file(path))
    return fd


def _not_a_file(path: str) -> str:
    if kind(path) == "link":
        return (
            f"'{path}' is a symbolic link (to '{os.readlink(path)}'), not a file: it is never read or written "
            "through (a link there may have been planted to redirect it); remove the link and put the file back"
        )
    return f"'{path}' is not a regular file ({kind(path)}): remove what is there and put the file back"


def fsync_dir(directory: str) -> None:
    """Make a rename inside `directory` durable (POSIX: the entry lives in the directory, not the file)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def move_aside(path: str, why: str) -> str:
    """Rename whatever is at `path` (never following a link) to a fresh name beside it; returns that name."""
    aside = f"{path}.aside-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
    os.rename(path, aside)
    log.warning("%s %s: moved aside to %s", path, why, aside)
    return aside


def kind(path: str) -> str:
    """What is at `path` without following a link: "absent", "file", "link", "folder" or "other"."""
    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return "absent"
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISLNK(mode):
        return "link"
    return "folder" if stat.S_ISDIR(mode) else "other"


def make_folder(path: str) -> None:
    """`path` as a folder: created if absent; a file (or anything but a folder) at that name is moved aside."""
    if kind(path) not in ("absent", "folder") and not os.path.isdir(path):  # a link to a folder is a folder
        move_aside(path, "is not a folder")
    os.makedirs(path, exist_ok=True)


def replace_file(path: str, data: bytes | Iterable[bytes | memoryview], durable: bool = True) -> None:
    """Replace the file at `path` by `data` (bytes, or the file's parts in order: written one by one, never
    joined, so a large state is not copied whole first), atomically and durably (see the module docstring).

    `durable=False` leaves out the two fsyncs, for a file that is a cache of what can be had again and is
    checked whole when read (a node's stored state, common/nodestore.py): a crash of the process still leaves
    the previous file or the new one, whole, since the rename is atomic; only a power cut or a kernel crash
    before the kernel writes the pages back can leave an old, empty or torn file, which the reader's checksum
    refuses. Forcing 405 MB to the disk each round was most of a FedKRSO node's catch-up on SmolLM2.

    A full disk (or quota) raises DiskFull after removing the partial temporary file: the previous file is whole.
    """
    tmp = path + ".tmp"
    if kind(tmp) in ("folder", "other"):
        move_aside(tmp, "is in the way of a temporary file")
    elif kind(tmp) != "absent":
        os.unlink(tmp)  # a stale file or a planted link: the link itself goes, its target is untouched
    if kind(path) in ("folder", "other"):  # a rename over it would fail at every write
        move_aside(path, "is not a file")
    parts = [data] if isinstance(data, (bytes, bytearray, memoryview)) else list(data)
    fd = os.open(tmp, _EXCLUSIVE, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            if durable:
                os.fsync(f.fileno())
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if disk_full(exc):
            raise DiskFull(path, needed=sum(memoryview(p).nbytes for p in parts)) from exc
        raise
    os.replace(tmp, path)
    if durable:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def disk_full(exc: OSError) -> bool:
    """Whether a write failed for want of room: the device is full, or the user's quota is."""
    return exc.errno in (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """No room to write a file: nothing was replaced (the previous file is whole) and the partial copy is gone."""

    def __init__(self, path: str, then: str = "start again", needed: int | None = None) -> None:
        self.path, self.needed = path, needed
        folder = os.path.dirname(os.path.abspath(path))
        try:
            free = shutil.disk_usage(folder).free
        except OSError:
            free = -1
        room = f"{_mb(free)} free there now" if free >= 0 else "its free space unknown"
        if needed is not None:
            room = f"{_mb(needed)} needed, {room}"
        super().__init__(
            errno.ENOSPC,
            f"no space left on the device to write '{path}' ({room}): the previous file is kept whole and the "
            f"partial copy removed; free space (or point the folder elsewhere), then {then}",
        )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n} bytes"
