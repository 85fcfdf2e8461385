"""Stopping everything a command started when it is interrupted (Ctrl-C, `kill`, a CI or `timeout` limit).

Python's default SIGTERM ends the process without running a single `finally:`, and Flower starts its local
SuperLink detached (a session of its own) with the simulation and Ray's processes under it: a command that
simply dies leaves a run training in the background. So the commands that start runs (simulate, fleet,
bench) turn both signals into `Interrupted`, which unwinds through their clean-up like any exception, and
stop what they started with `stop_processes`: the whole tree under what they launched, collected before
anything is terminated (a child whose parent dies first is handed to init and no longer looks like ours),
plus every process that carries the run's own environment marker (a FLWR_HOME of its own), which finds the
detached SuperLink even after the `flwr run` that spawned it is gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterable

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(SystemExit):
    """A SIGINT or SIGTERM turned into an exception; its exit code is 128 + the signal's number (130, 143), the
    status a shell shows for a process that signal ended. A SystemExit, so `except Exception` lets it pass."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_on_signals() -> None:
    """Make SIGINT and SIGTERM raise `Interrupted` in the main thread, so `finally:` blocks and `__exit__`s run.

    After the first signal both are ignored: a second Ctrl-C must not cut the clean-up short and leave half of
    the run behind (the clean-up is bounded: `stop_processes` kills what does not end within its timeout)."""

    def stop(signum, frame):
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Interrupted(signum)

    for sig in SIGNALS:
        signal.signal(sig, stop)


def _tree(pids: Iterable[int]) -> dict[int, psutil.Process]:
    out = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.ZombieProcess):
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                out[p.pid] = p
    return out


def _with_env(key: str, value: str) -> dict[int, psutil.Process]:
    out = {}
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(key) == value:
                out[proc.pid] = proc
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def started(pids: Iterable[int] = (), env: tuple[str, str] | None = None) -> dict[int, psutil.Process]:
    """The live processes under `pids` (themselves included) and those whose environment holds `env` (key, value),
    with their own descendants (Ray's daemons and workers under the simulation); never this process."""
    procs = _tree(pids)
    if env is not None:
        marked = _with_env(*env)
        procs.update(marked)
        procs.update(_tree(marked))
    procs.pop(os.getpid(), None)
    return {pid: p for pid, p in procs.items() if _alive(p)}


def stop_processes(pids: Iterable[int] = (), env: tuple[str, str] | None = None, timeout: float = 10) -> int:
    """Terminate everything `started(pids, env)` finds, kill what is left after `timeout` seconds, and look again
    (a SuperLink or raylet may launch a process while it is being stopped); returns how many were stopped.
    Later looks go by `env` alone: a root's number, once it has ended, may already belong to someone else."""
    pids, stopped = list(pids), set()
    for _ in range(3):
        procs = started(pids, env)
        if not procs:
            break
        stopped.update(procs)
        for proc in procs.values():
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=timeout)
        pids = []
    return len(stopped)
