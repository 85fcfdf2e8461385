"""Stop and resume through `flwr run .`: a run that ends after round 1 is continued by a new run with
`resume-from` to round 2, for a log method (FedKRSO), and the records run on unbroken. FedTT's resume, with the
SuperLink and the ServerApp killed, is in tests/test_fleet.py."""

from __future__ import annotations

import pytest

from scripts.simulate import read_rounds, simulate
from server_app import checkpoint

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("method", ["fedkrso"])
def test_stopped_run_is_resumed_by_a_new_flwr_run(method, tiny_bert, glue_dir, tmp_path):
    base = {
        "method": method, "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "results-dir": str(tmp_path),
        "train.local-steps": 2, "krso.intervals": 2, "train.batch-size": 8, "train.max-length": 64,
        "eval.max-examples": 32, "tt.bottleneck": 8,
    }  # fmt: skip
    first = simulate({**base, "num-server-rounds": 1, "run-name": "first"}, clients=3, quiet=True, timeout=600)
    assert first["status"] == "finished:completed", first
    assert checkpoint.read(first["records"]).round == 1

    second = simulate(
        {**base, "num-server-rounds": 2, "run-name": "second", "resume-from": first["records"]},
        clients=3,
        quiet=True,
        timeout=600,
    )
    assert second["status"] == "finished:completed", second
    before, rows = read_rounds(first["records"]), read_rounds(second["records"])
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[:2] == before  # the records so far, carried over
    # Every node of the new run starts with no copy of the model (its state is per Flower run) and catches up
    # from the log (FedKRSO) or gets the cores (FedTT): all three train in round 2, none refused.
    assert rows[2]["clients"] == 3 and rows[2]["rejected"] == 0 and rows[2]["failures"] == 0
    assert 0.0 <= rows[2]["accuracy"] <= 1.0
    assert second["summary"]["rounds"] == 2 and second["summary"]["totals"]["client_replies"] == 6
    assert checkpoint.read(second["records"]).round == 2


def test_bad_resume_from_stops_before_anything_starts(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        simulate({"resume-from": str(tmp_path / "missing"), "results-dir": str(tmp_path)}, clients=3, quiet=True)
    assert list(tmp_path.iterdir()) == []
