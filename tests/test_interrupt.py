"""An interrupted command stops what it started: `fedsubspace simulate` under Ctrl-C (SIGINT to its process group,
as a terminal sends it) and SIGTERM (`timeout`, `kill`, a CI limit) mid-run exits 130 / 143 and leaves no process
of the run: not the local SuperLink Flower starts detached, nor flwr-simulation, nor Ray's daemons and actors.
The pieces underneath (common/interrupt.py) are checked in child processes of their own, with no model or data."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HANDLER = """
import sys, time
from common.interrupt import exit_on_signals
exit_on_signals()
try:
    print("up", flush=True)
    time.sleep(60)
finally:
    open({marker!r}, "w").write("cleaned up")
"""


@pytest.mark.integration
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_unwinds_through_finally(sig, tmp_path):
    """Python's default SIGTERM runs no `finally:`; with the handler both signals do (NamespaceFleet.__exit__, simulate's
    clean-up) and the exit status is the one a shell shows for that signal."""
    marker = str(tmp_path / "cleaned")
    child = subprocess.Popen(
        [sys.executable, "-c", HANDLER.format(marker=marker)], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "up"
        child.send_signal(sig)
        rc = child.wait(timeout=30)
    finally:
        child.kill()
    assert rc == 128 + sig, rc  # 130, 143
    with open(marker) as f:
        assert f.read() == "cleaned up"


@pytest.mark.integration
def test_stop_processes_finds_the_detached_and_the_marked(tmp_path):
    """A tree under a launched process, a grandchild in a session of its own that has lost its parent (as Flower's
    local SuperLink does when `flwr run` ends) found by its environment marker, and a process that carries neither
    left alone."""
    from common.interrupt import stop_processes

    marker = ("FEDSUBSPACE_TEST_RUN", str(tmp_path))
    detached = (
        "import subprocess; subprocess.Popen(['sleep', '60'], start_new_session=True, "
        "stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print('up')"
    )
    orphan = subprocess.run(
        [sys.executable, "-c", detached], env={**os.environ, marker[0]: marker[1]}, capture_output=True, text=True
    )
    assert orphan.stdout.strip() == "up"
    tree = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        time.sleep(0.5)
        under = psutil.Process(tree.pid).children(recursive=True)
        marked = _marked_by(*marker)
        assert len(under) == 2 and len(marked) == 1
        assert stop_processes([tree.pid], env=marker, timeout=5) == 4
        tree.wait(timeout=5)
        assert not _alive([*under, *marked])
        assert bystander.poll() is None
    finally:
        for proc in (tree, bystander):
            proc.kill()
        for proc in _marked_by(*marker):
            proc.kill()


def _marked_by(key: str, value: str) -> list[psutil.Process]:
    out = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(key) == value and proc.status() != psutil.STATUS_ZOMBIE:
                out.append(proc)
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def _marked(home: str) -> list[psutil.Process]:
    """Processes whose environment carries the run's own FLWR_HOME (checked apart from common.interrupt)."""
    return _marked_by("FLWR_HOME", home)


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{proc.pid} {' '.join(proc.cmdline())[:120]}")
        except psutil.NoSuchProcess:
            continue
    return left


def _lines(stream, out: queue.Queue) -> None:
    for line in stream:
        out.put(line)
    out.put(None)


def _wait_for(lines: queue.Queue, text: str, seen: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"the command ended before '{text}':\n{''.join(seen[-40:])}")
        seen.append(line)
        if text in line:
            return
    raise AssertionError(f"no '{text}' within {timeout:.0f} s:\n{''.join(seen[-40:])}")


def _run_processes(pid: int, timeout: float) -> tuple[str, list[psutil.Process]]:
    """The run's FLWR_HOME and every process it has, once Ray's client actors are up (they start with round 1)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = _descendants(pid)
        homes = set()
        for proc in procs:
            try:
                homes.add(proc.environ().get("FLWR_HOME"))
            except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                continue
        homes.discard(None)
        if len(homes) == 1:
            home = homes.pop()
            procs = {p.pid: p for p in [*procs, *_marked(home)]}
            for p in list(procs.values()):
                procs.update((c.pid, c) for c in _descendants(p.pid))
            names = []
            for p in procs.values():
                try:
                    names.append(" ".join(p.cmdline()))
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
            if any("ClientAppActor" in n for n in names):
                return home, list(procs.values())
        time.sleep(1)
    raise AssertionError(f"no Ray ClientAppActor of the run within {timeout:.0f} s")


@pytest.mark.system
@pytest.mark.e2e
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_simulation_leaves_no_process(sig, tiny_bert, glue_dir, tmp_path):
    run_config = " ".join([
        "method='fedkrso'", "task='rte'", f"model='{tiny_bert}'", f"data-dir='{glue_dir}'", "num-server-rounds=200",
        f"results-dir='{tmp_path}'", "run-name='interrupted'", "train.local-steps=4", "krso.intervals=2",
        "train.batch-size=8", "train.max-length=64", "eval.max-examples=64",
    ])  # fmt: skip
    # A session of its own, as a shell gives a foreground job: Ctrl-C is a SIGINT to the whole group.
    child = subprocess.Popen(
        [sys.executable, "-m", "common.cli", "simulate", "--clients", "2", "-c", run_config],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_lines, args=(child.stdout, lines), daemon=True).start()
    seen: list[str] = []
    home, procs = None, []
    try:
        _wait_for(lines, "[ROUND 1/200]", seen, timeout=120)
        home, procs = _run_processes(child.pid, timeout=60)
        if sig == signal.SIGINT:
            os.killpg(child.pid, sig)
        else:
            child.send_signal(sig)
        rc = child.wait(timeout=60)
        while (line := lines.get(timeout=10)) is not None:
            seen.append(line)
        output = "".join(seen)
        assert rc == 128 + sig, f"exit status {rc}:\n{output[-3000:]}"
        assert f"{sig.name}: stopped run" in output, output[-3000:]
        assert os.path.exists(tmp_path / "interrupted" / "rounds.jsonl")  # the rounds it had stay
        assert not _alive(procs), _alive(procs)  # nothing that ran under the command
        assert not _alive(_marked(home)), _alive(_marked(home))  # nothing started since with its FLWR_HOME
    finally:
        for proc in [*procs, *(_marked(home) if home else [])]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                continue
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
