"""The `fedsubspace` command (common/cli.py): report on run folders written by the real records writer, and
the commands it lists and hands on."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from common.cli import main
from common.records import ClientStats, RunRecorder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(results: str, name: str, rounds: int = 3, finish: bool = True) -> str:
    """A run's records as the ServerApp writes them: round 0's evaluation, then rounds of 2 clients."""
    rec = RunRecorder(results, name, {"method": "fedkrso", "task": "sst2", "train.lr": 5e-4})
    rec.end_round(0, {"accuracy": 0.5, "loss": 0.7})
    for t in range(1, rounds + 1):
        rec.begin_round(t)
        rec.add_down(1000 * t)
        metrics = [{"train-seconds": 1.0, "local-steps": 4.0, "peak-rss-mb": 300.0}] * 2
        rec.add_replies(500, metrics, failures=0, rejected=0)
        rec.end_round(t, {"accuracy": 0.5 + 0.1 * t, "loss": 0.7 - 0.1 * t})
    if finish:
        rec.finish()
    return rec.dir


def table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["round", "accuracy"])
    return [line.split() for line in lines[start + 1 :] if line.strip() and line.split()[0].isdigit()]


@pytest.mark.unit
def test_report_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    run = write_run(str(tmp_path), "krso-sst2")
    assert main(["report", run]) == 0
    out = capsys.readouterr().out
    assert "fedkrso on sst2, train.lr 0.0005; 3 rounds, 80.00% final, 80.00% best (round 3)" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    assert [r[1] for r in rows] == ["50.00", "60.00", "70.00", "80.00"]
    assert [r[2] for r in rows] == ["0.7000", "0.6000", "0.5000", "0.4000"]
    # round 2: 2 clients, 2000 B down and 500 B up; since the start 1500 + 2500 = 4000 B
    assert rows[2][3:10] == ["2", "2.0", "KB", "500", "B", "3.9", "KB"]
    png = os.path.join(run, "report.png")
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert png in out


@pytest.mark.unit
def test_report_on_a_fleet_run_under_way(tmp_path, capsys):
    """No summary.json yet, a torn last line, and the fleet harness's wire.jsonl beside the records."""
    run = write_run(str(tmp_path), "fleet-fedkrso", rounds=2, finish=False)
    with open(os.path.join(run, "wire.jsonl"), "w") as f:
        for t in (1, 2):
            f.write(json.dumps({"round": t, "wire_bytes_down": 4096 * t, "wire_bytes_up": 2048}) + "\n")
    with open(os.path.join(run, "rounds.jsonl"), "a") as f:
        f.write('{"round": 3, "accur')
    png = str(tmp_path / "plot.png")
    assert main(["report", run, "--png", png]) == 0
    out = capsys.readouterr().out
    assert "no summary.json" in out and "wire down" in out
    rows = table_rows(out)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    assert rows[2][-4:] == ["8.0", "KB", "2.0", "KB"]
    with open(png, "rb") as f:
        assert f.read(8) == PNG_MAGIC


@pytest.mark.unit
def test_report_refuses_a_folder_without_records(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "holds no rounds (rounds.jsonl missing or empty)" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "is not a folder" in capsys.readouterr().err


@pytest.mark.integration  # a subprocess
def test_help_lists_the_commands():
    out = subprocess.run(
        [sys.executable, "-m", "common.cli", "--help"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert out.startswith("usage: fedsubspace")
    for command in ("simulate", "fleet", "bench", "report"):
        assert f"    {command} " in out


@pytest.mark.unit
@pytest.mark.parametrize("command, option", [("simulate", "--clients"), ("fleet", "--methods"), ("bench", "--quick")])
def test_commands_hand_their_options_to_the_scripts(command, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: fedsubspace {command}") and option in out


@pytest.mark.unit
def test_client_stats_fold_the_replies_as_the_lists_did():
    """The round records summarise the replies' metrics from ClientStats, folded one reply at a time (a few
    numbers per metric, however many replies): the same figures as computing them from the list of every
    reply's metrics, bit for bit (sums in reply order), metrics some replies lack included, unknown keys ignored."""
    import random

    rng = random.Random(5)
    metrics = [
        {"train-seconds": rng.uniform(0, 9), "local-steps": 20.0, "peak-rss-mb": rng.uniform(100, 900),
         "train-loss": rng.uniform(0, 2), **({"forward-passes": float(rng.randint(1, 99))} if i % 3 else {}),
         "hostile-extra": 1e300}
        for i in range(50)
    ]  # fmt: skip
    stats = ClientStats.of(metrics)
    assert stats.count == 50

    def values(key):
        return [m[key] for m in metrics if key in m]

    assert stats.max("peak-rss-mb") == max(values("peak-rss-mb"))
    assert stats.mean("train-seconds") == sum(values("train-seconds")) / 50
    assert stats.mean("forward-passes") == sum(values("forward-passes")) / len(values("forward-passes"))
    assert stats.sum("local-steps") == 1000.0 and stats.mean("block1-passes") is None
    assert stats.max("hostile-extra") is None  # not a metric the records keep
