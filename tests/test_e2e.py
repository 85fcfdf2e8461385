"""End to end through `flwr run .` with a tiny model and a few simulated clients: the real runtime."""

from __future__ import annotations

import json
import os

import pytest

from scripts.simulate import simulate

pytestmark = pytest.mark.e2e

ROUND_KEYS = {
    "round", "method", "task", "accuracy", "loss", "bytes_down", "bytes_up", "clients",
    "client_peak_rss_mb", "client_train_seconds", "seconds",
}  # fmt: skip


def run(method, tiny_bert, glue_dir, tmp_path, **extra):
    overrides = {
        "method": method, "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "num-server-rounds": 2,
        "results-dir": str(tmp_path), "run-name": f"e2e-{method}", "train.local-steps": 4, "krso.intervals": 2,
        "train.batch-size": 8, "train.max-length": 64, "eval.max-examples": 64, **extra,
    }  # fmt: skip
    return simulate(overrides, clients=3, quiet=True, timeout=900)


def check_records(result, method, clients=3):
    assert result["status"] == "finished:completed", result
    with open(os.path.join(result["records"], "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds:
        assert set(r) >= ROUND_KEYS and r["method"] == method and r["task"] == "rte"
        assert 0.0 <= r["accuracy"] <= 1.0
    for r in rounds[1:]:
        assert r["clients"] == clients and r["bytes_down"] > 0 and r["bytes_up"] > 0
        assert r["client_peak_rss_mb"] > 50 and r["client_train_seconds"] > 0
    summary = result["summary"]
    assert summary["rounds"] == 2 and summary["config"]["method"] == method
    assert summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in rounds)
    return rounds, summary


def test_fedkrso_and_fedavg_end_to_end(tiny_bert, glue_dir, tmp_path):
    krso_rounds, krso = check_records(run("fedkrso", tiny_bert, glue_dir, tmp_path), "fedkrso")
    avg_rounds, avg = check_records(run("fedavg", tiny_bert, glue_dir, tmp_path), "fedavg")
    # FedKRSO sends accumulators (K * r * sum d_out numbers), never the weights: far below FedAvg each way.
    assert krso["per_client_per_round"]["bytes_up"] * 5 < avg["per_client_per_round"]["bytes_up"]
    assert krso_rounds[2]["bytes_down"] * 5 < avg_rounds[2]["bytes_down"]
    assert krso_rounds[1]["bytes_down"] < krso_rounds[2]["bytes_down"]  # round 1 carries no log yet


def test_bad_config_stops_before_anything_starts(tiny_bert, glue_dir, tmp_path):
    from common.config import ConfigError

    with pytest.raises(ConfigError, match="krso.rank must be >= 1"):
        run("fedkrso", tiny_bert, glue_dir, tmp_path, **{"krso.rank": 0})
    with pytest.raises(ConfigError, match="data-dir"):
        run("fedkrso", tiny_bert, str(tmp_path / "no-such-glue"), tmp_path)


def test_zero_order_methods_end_to_end(tiny_bert, glue_dir, tmp_path):
    """FedSPZO and FedKSeed through flwr run: scalars up, the model rebuilt by replay on every side."""
    zo = {"spzo.split-layer": 1, "spzo.p2": 2, "kseed.k": 4096}
    spzo_rounds, spzo = check_records(run("fedspzo", tiny_bert, glue_dir, tmp_path, **zo), "fedspzo")
    kseed_rounds, kseed = check_records(run("fedkseed", tiny_bert, glue_dir, tmp_path, **zo), "fedkseed")
    # 4 steps x 2 scalars of FedSPZO (block 2 only); FedKSeed: at most 4 x 4 (index, scalar) pairs up, K = 4096 scalars down at most.
    assert spzo["per_client_per_round"]["bytes_up"] < 2048
    assert kseed["per_client_per_round"]["bytes_up"] < 2048
    assert kseed_rounds[2]["bytes_down"] / 3 + kseed["per_client_per_round"]["bytes_up"] < 18 * 1024
