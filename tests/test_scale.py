"""bench/scale.py --quick end to end (the tiny model, a few rounds and replies, no simulation), and its page drawn
from the records it wrote, in a subprocess as `make bench-scale` runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from harness.readcount import read_once

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.integration


def test_quick_scale_run_writes_the_records_the_issue_names_and_a_page(tmp_path):
    out, page = tmp_path / "scale.json", tmp_path / "scale.md"
    subprocess.run(
        [sys.executable, "-m", "bench.scale", "--quick", "--methods", "fedkrso,fedavg", "--out", str(out), "--page", str(page)],
        check=True, cwd=ROOT, capture_output=True, timeout=300,
    )  # fmt: skip
    rec = json.loads(out.read_text())
    rounds = rec["setting"]["rounds"]
    for method in ("fedkrso", "fedavg"):
        assert len(rec["state_write_bytes"][method]) == rounds
        assert all(b > 0 for b in rec["state_write_bytes"][method])
        catchup = rec["catchup_bytes"][method]
        assert catchup["rounds_behind"] == [1, 2, 5, 6] and len(catchup["bytes"]) == 4
        assert set(rec["server_peak_mb"][method]) >= {"replies", "mb", "reads", "first_round_reads"}
        reads = rec["server_peak_mb"][method]["reads"] + rec["server_peak_mb"][method]["first_round_reads"]
        assert len(reads) == 2 * len(rec["server_peak_mb"][method]["replies"]) and all(map(read_once, reads))
    krso = rec["catchup_bytes"]["fedkrso"]["bytes"]
    assert krso == sorted(krso) and krso[-1] > krso[0]  # the whole log since the node's round, today
    assert len(set(rec["catchup_bytes"]["fedavg"]["bytes"])) == 1  # the global model, however far behind
    assert rec["fedavg_download_bytes"] == rec["catchup_bytes"]["fedavg"]["bytes"][0]
    # a FedAvg checkpoint holds the whole model: more than one download's bytes each round
    assert rec["state_write_bytes"]["fedavg"][0] > rec["fedavg_download_bytes"] * 0.9
    subprocess.run(
        [sys.executable, "-m", "bench.scale", "--report", "--out", str(out), "--page", str(page)],
        check=True, cwd=ROOT, capture_output=True, timeout=120,
    )  # fmt: skip
    text = page.read_text()
    assert "| criterion | measured | aim | verdict |" in text and "scale-state.png" in text
    assert "| each reply's metrics validated once, its arrays decoded once per aggregation pass" in text
