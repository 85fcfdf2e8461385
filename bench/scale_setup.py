"""What every measurement of bench/scale.py shares: where things are, the tiny model, fresh node states per run,
and the run config of a short, cheap round."""

from __future__ import annotations

import os
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "bench", "records", "scale.json")
DOCS = os.path.join(ROOT, "docs")
FIXTURE_GLUE = os.path.join(ROOT, "tests", "fixtures", "glue")


def log_points(top: int, start: int = 1) -> list[int]:
    """start, then 1-2-5 steps up to top, and top itself."""
    points, base = [], 1
    while base <= top:
        points += [p * base for p in (1, 2, 5) if start <= p * base <= top]
        base *= 10
    return sorted(set(points + [top]))


def tiny_model(folder: str) -> str:
    from harness.tiny import save_tiny  # the tests' tiny BERT, saved as a pretrained checkpoint would be

    path = os.path.join(folder, "tiny-bert")
    if not os.path.isfile(os.path.join(path, "config.json")):
        save_tiny(path, "bert")
    return path


def fresh_nodes(work: str) -> None:
    """Every run in this process is Flower run 1: each gets a folder of node states of its own, so that no
    node finds the state another run left (common.nodestore)."""
    from common.nodestore import STATE_DIR_ENV

    os.environ[STATE_DIR_ENV] = tempfile.mkdtemp(prefix="nodes-", dir=work)


def run_config(method: str, model: str, work: str, name: str, rounds: int, **extra) -> dict:
    """Run-config keys for a short, cheap round: training time does not change what the server writes."""
    return {
        "method": method, "task": "sst2", "model": model, "data-dir": FIXTURE_GLUE, "results-dir": work,
        "run-name": name, "num-server-rounds": rounds, "min-clients": 1, "fraction-train": 1.0,
        "train.local-steps": 1, "krso.intervals": 1, "train.batch-size": 4, "train.max-length": 16,
        "eval.max-examples": 8, "eval.every": rounds + 1, **extra,
    }  # fmt: skip
