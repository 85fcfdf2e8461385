"""`flwr run .` refuses a bad configuration before anything starts. Every method's end-to-end run in simulation
is the benchmark harness's --quick plan (tests/test_bench.py); on a fleet, tests/test_fleet.py."""

from __future__ import annotations

import pytest

from scripts.simulate import simulate

pytestmark = [pytest.mark.system, pytest.mark.e2e]


def run(method, tiny_bert, glue_dir, tmp_path, **extra):
    overrides = {
        "method": method, "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "num-server-rounds": 2,
        "results-dir": str(tmp_path), "run-name": f"e2e-{method}", "train.local-steps": 4, "krso.intervals": 2,
        "train.batch-size": 8, "train.max-length": 64, "eval.max-examples": 64, **extra,
    }  # fmt: skip
    return simulate(overrides, clients=3, quiet=True, timeout=900)


def test_bad_config_stops_before_anything_starts(tiny_bert, glue_dir, tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="krso.rank must be >= 1"):
        run("fedkrso", tiny_bert, glue_dir, tmp_path, **{"krso.rank": 0})
    with pytest.raises(ConfigError, match="data-dir"):
        run("fedkrso", tiny_bert, str(tmp_path / "no-such-glue"), tmp_path)
    # a split every client would fail on in every round: refused with the partitioner's reason, nothing started
    with pytest.raises(ConfigError, match="3 clients' data cannot be split: Dirichlet partitioning"):
        run("fedkrso", tiny_bert, glue_dir, tmp_path, partitioning="dirichlet", **{"dirichlet-alpha": 0.001})
    assert not (tmp_path / "e2e-fedkrso").exists()


def test_a_users_jsonl_instruction_tunes_a_decoder_through_flwr_run(tiny_llama, tmp_path, monkeypatch):
    """The README's first screen on a tiny decoder: a JSONL of one's own, by a path relative to where the command
    runs, through `flwr run` and Ray, every round's held-out response loss and generated answers recorded."""
    import json

    (tmp_path / "mine.jsonl").write_text(
        "".join(json.dumps({"prompt": f"What comes after {i}?", "response": f"{i + 1}"}) + "\n" for i in range(30))
    )
    monkeypatch.chdir(tmp_path)
    overrides = {
        "method": "fedtt", "task": "mine.jsonl", "model": tiny_llama, "num-server-rounds": 1,
        "results-dir": str(tmp_path / "results"), "run-name": "own-jsonl", "train.local-steps": 2,
        "train.batch-size": 4, "train.max-length": 32, "eval.generate": 2, "eval.max-new-tokens": 3,
    }  # fmt: skip
    result = simulate(overrides, clients=2, quiet=True, timeout=900)
    assert result["status"] == "finished:completed"
    with open(tmp_path / "results" / "own-jsonl" / "rounds.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2
    assert all(r["perplexity"] > 1 and r["generated"] == 2 for r in rows)
    assert rows[1]["client_load_seconds"] is not None and rows[1]["client_train_seconds"] is not None
    # a round splits into the wait for the replies (the clients' load and train) and the rest (evaluation)
    assert 0 < rows[1]["wait_seconds"] < rows[1]["seconds"] and rows[1]["eval-seconds"] > 0
