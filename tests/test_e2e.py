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
