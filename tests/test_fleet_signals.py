"""scripts/fleet.py under SIGTERM: the fleet must unwind as on Ctrl-C (Fleet.__exit__ removes its processes and
namespaces), not die leaving them behind. Runs the real handler in a child process; no fleet needed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

# a child Python process (about a second), no model and no data
pytestmark = pytest.mark.integration

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = """
import sys, time
sys.path.insert(0, {root!r})
from scripts.fleet import exit_on_sigterm
exit_on_sigterm()
try:
    print("up", flush=True)
    time.sleep(60)
finally:
    open({marker!r}, "w").write("cleaned up")
"""


def test_sigterm_unwinds_through_finally(tmp_path):
    marker = str(tmp_path / "cleaned")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(root=ROOT, marker=marker)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "up"
        start = time.monotonic()
        child.send_signal(signal.SIGTERM)
        rc = child.wait(timeout=30)
    finally:
        child.kill()
    assert rc == 143, rc  # 128 + SIGTERM, as a shell reports a process ended by TERM
    assert time.monotonic() - start < 30
    with open(marker) as f:
        assert f.read() == "cleaned up"  # the with/finally blocks ran: Fleet.__exit__ would have run too
