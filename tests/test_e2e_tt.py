"""FedTT+ end to end through `flwr run .` with the tiny model: the real runtime, records and bytes."""

from __future__ import annotations

import json
import os

import pytest

from scripts.simulate import simulate

pytestmark = pytest.mark.e2e


def test_fedtt_plus_end_to_end(tiny_bert, glue_dir, tmp_path):
    overrides = {
        "method": "fedtt-plus", "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "num-server-rounds": 2,
        "results-dir": str(tmp_path), "run-name": "e2e-fedtt-plus", "train.local-steps": 3, "train.batch-size": 8,
        "train.max-length": 64, "train.lr": 1e-2, "eval.max-examples": 64, "tt.bottleneck": 8,
    }  # fmt: skip
    result = simulate(overrides, clients=3, quiet=True, timeout=900)
    assert result["status"] == "finished:completed", result
    with open(os.path.join(result["records"], "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(r["method"] == "fedtt-plus" and 0 <= r["accuracy"] <= 1 for r in rounds)
    for r in rounds[1:]:
        assert r["clients"] == 3 and r["rejected"] == 0 and r["failures"] == 0
        assert 0 < r["bytes_up"] < r["bytes_down"]  # all cores down, only the round's cores (+ head) up
    with open(os.path.join(result["records"], "fedtt-selection.jsonl")) as f:
        selection = [json.loads(line) for line in f]
    assert [s["round"] for s in selection] == [1, 2]
    assert all(s["matrix"] == "up" for s in selection[0]["cores"])  # round 1: the zero-initialised W_up cores
    assert any(s["matrix"] == "down" for s in selection[1]["cores"])  # then the gradient scores decide
