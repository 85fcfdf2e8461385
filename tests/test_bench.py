"""The benchmark harness (bench/run.py, bench/report.py): its --quick mode end to end through `flwr run`, the
reuse of finished runs, and a summary table that follows the records."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import pytest

from bench import claims, report, summary
from bench.plan import DEFAULT, QUICK, learning_rates, plan_runs, read_json
from bench.run import effective, main, run_overrides
from common.methods import METHOD_DEFAULTS, get_method

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.unit
def test_verdict_says_met_or_not_and_by_how_much():
    assert claims.verdict(39.9, 20, True, "x", 1) == "met, 19.9x to spare"
    assert claims.verdict(0.66, 0.6, False, "x") == "not met, short by 0.06x"
    assert claims.verdict(-0.92, 1.5, False, " points") == "met, 2.42 points to spare"
    assert claims.verdict(None, 2.0, True, "x") == "not run yet"


@pytest.mark.unit
def test_a_margin_within_its_seed_spread_is_within_noise():
    # FedTT+ 1.19 points below FedTT in the mean, the per-seed differences spread over 5.2 points: undecided.
    assert claims.verdict(-1.19, 0.0, True, " points", spread=5.2) == (
        "within noise, 1.19 points short against a seed spread of 5.20 points"
    )
    assert claims.verdict(0.4, 0.0, True, " points", spread=0.5).startswith("within noise, 0.40 points to spare")
    # Farther from the aim than the spread: decided either way; no spread (one seed): as before.
    assert claims.verdict(1.0, 0.0, True, " points", spread=0.5) == "met, 1.00 points to spare"
    assert claims.verdict(1.72, 1.5, False, " points", spread=0.1) == "not met, short by 0.22 points"
    assert claims.verdict(1.72, 1.5, False, " points", spread=None) == "not met, short by 0.22 points"


@pytest.mark.unit
def test_seed_spread_is_that_of_the_per_seed_differences():
    ours, theirs = {0: 0.70, 2: 0.74, 3: 0.78}, {0: 0.70, 2: 0.72, 3: 0.74, 5: 0.1}
    assert claims.seed_spread(ours, theirs) == pytest.approx(2.0)  # differences 0, 2, 4 points (seed 5: alone)
    assert claims.seed_spread({0: 0.7}, {0: 0.6}) is None  # one seed: no spread
    # Methods far apart in level but moving together over seeds: the paired spread is small.
    assert claims.seed_spread({0: 0.50, 1: 0.90}, {0: 0.49, 1: 0.89}) == pytest.approx(0.0, abs=1e-9)


def _zo_run(method: str, accs: list[float], seconds: float, calls: float) -> dict:
    from bench.plan import Run

    rounds = [{"round": 0, "accuracy": accs[0], "clients": 0, "bytes_down": 0, "bytes_up": 0, "failures": 0,
               "rejected": 0}]  # fmt: skip
    rounds += [
        {"round": i, "accuracy": a, "clients": 2, "bytes_down": 100, "bytes_up": 10, "failures": 0, "rejected": 0,
         "client_train_seconds": seconds, "client_forward_passes": calls}
        for i, a in enumerate(accs[1:], 1)
    ]  # fmt: skip
    return {"run": Run("sst2", 0.5, 0, method, compute=True), **claims.stats(rounds)}


@pytest.mark.unit
def test_compute_to_reach_an_accuracy_from_the_records():
    sp = _zo_run("fedspzo", [0.72, 0.73, 0.755, 0.76], seconds=10.0, calls=50)  # reaches 0.75 in round 2
    ks = _zo_run("fedkseed", [0.72, 0.72, 0.73, 0.74, 0.752], seconds=10.0, calls=40)  # in round 4
    assert claims.first_reaching(sp, 0.75)["round"] == 2 and claims.first_reaching(sp, 0.8) is None
    assert sp["curve"][2]["compute"] == 20.0 and sp["curve"][2]["calls"] == 100.0
    c = claims.Claims()
    summary.compute_claims(c, "sst2", sp, ks)
    rows = {claim: (measured, result) for claim, measured, _, result in c.rows}
    measured, result = rows[
        "FedSPZO vs FedKSeed, SST-2, same perturbed parameters: client seconds to reach round 0 + 3 points"
    ]
    assert "20 s, 100 model calls (round 2) vs 40 s, 160 model calls (round 4): 0.50x" in measured
    assert result == "met, 0.125x to spare"
    assert rows["FedKSeed, SST-2, compute runs: best gain over its own round 0"][1] == "met, 0.20 points to spare"
    c = claims.Claims()
    summary.compute_claims(c, "sst2", sp, _zo_run("fedkseed", [0.72, 0.73], 10.0, 40))
    assert [row for row in c.rows if "seconds to reach" in row[0]][0][1] == "FedKSeed did not reach it"
    # neither gains the target within the budget: the ratio is read at the highest accuracy both reach (73.0)
    both = rows_of(c)[
        "FedSPZO vs FedKSeed, SST-2, same perturbed parameters: client seconds to reach the highest accuracy both reach"
    ]
    assert both == (
        "73.00: 10 s, 50 model calls (round 1) vs 10 s, 40 model calls (round 1): 1.00x",
        "not met, short by 0.375x",
    )
    c = claims.Claims()
    summary.compute_claims(c, "sst2", sp, None)
    assert rows_of(c)[
        "FedSPZO vs FedKSeed, SST-2, same perturbed parameters: client seconds to reach the highest accuracy both reach"
    ] == (claims.NOT_RUN, claims.NOT_RUN)


def rows_of(c) -> dict:
    return {claim: (measured, result) for claim, measured, _, result in c.rows}


@pytest.mark.unit
def test_the_plan_has_the_compute_runs_on_sst2_only_when_sst2_is_planned():
    from bench.plan import DEFAULT
    from bench.run import run_overrides

    compute = [r for r in plan_runs(DEFAULT) if r.compute]
    assert [(r.task, r.method) for r in compute] == [("sst2", "fedspzo"), ("sst2", "fedkseed")]
    spzo, ks = (run_overrides(DEFAULT, r, "/records") for r in compute)
    assert spzo["num-server-rounds"] == ks["num-server-rounds"] == DEFAULT.zo_rounds
    # Same clients, partitions and batches: every key but the method is the same.
    assert {k: v for k, v in spzo.items() if k not in ("method", "run-name")} == {
        k: v for k, v in ks.items() if k not in ("method", "run-name")
    }
    assert not [r for r in plan_runs(dataclasses.replace(DEFAULT, tasks=("rte",))) if r.compute]


@pytest.mark.unit
def test_the_plan_puts_the_most_informative_runs_first_and_runs_a_part_by_name():
    from bench.plan import Run, select

    names = [r.name for r in plan_runs(DEFAULT)]
    # the main table: the claims' methods in their order, then any method registered after them (bench.run)
    main = DEFAULT.main_methods
    assert main[:4] == ("fedkrso", "fedavg", "fedavg-lora", "fedtt")
    n = 3 * len(main)
    assert names[:n] == [f"sst2-a0.5-s{seed}-{m}" for seed in (0, 1, 2) for m in main]  # seed by seed
    assert names[n : n + 2] == ["compute-sst2-a0.5-s0-fedspzo", "compute-sst2-a0.5-s0-fedkseed"]
    skew = [f"sst2-a0.1-s{seed}-{m}" for seed in (0, 2, 3, 4, 5) for m in ("fedtt", "fedtt-plus")]
    assert names[n + 2 : n + 12] == skew
    assert names[n + 12 :] == [f"rte-a0.5-s{seed}-{m}" for seed in (0, 1, 2) for m in main]
    assert DEFAULT.rounds >= 10 and DEFAULT.local_steps >= 20 and len(DEFAULT.skew_seeds) >= 5
    assert 1 not in DEFAULT.skew_seeds  # cannot be drawn at alpha 0.1 (common.partition refuses it)
    chosen = select(plan_runs(DEFAULT), "sst2-a0.5-s0-*, compute-*")
    assert [r.name for r in chosen] == names[: len(main)] + names[n : n + 2]
    assert select([Run("rte", 0.5, 0, "fedtt")], None) == [Run("rte", 0.5, 0, "fedtt")]
    with pytest.raises(SystemExit, match="matches none"):
        select(plan_runs(DEFAULT), "nope-*")


@pytest.mark.unit
def test_a_plan_of_one_seed_reads_as_the_seeds_of_the_main_table():
    old = {**dataclasses.asdict(DEFAULT), "seed": 4, "gone": 1}
    del old["seeds"]
    assert report.settings_of(json.loads(json.dumps(old))).seeds == (4,)


def _write_run(records, run, accs: list[float], peak: float = 1000.0, up: int = 1000) -> None:
    folder = os.path.join(records, "runs", run.name)
    os.makedirs(folder)
    rounds = [{"round": 0, "accuracy": accs[0], "clients": 0, "bytes_down": 0, "bytes_up": 0, "failures": 0,
               "rejected": 0}]  # fmt: skip
    rounds += [
        {"round": i, "accuracy": a, "clients": 10, "bytes_down": 10 * up, "bytes_up": 10 * up, "failures": 0,
         "rejected": 0, "client_peak_rss_mb": peak, "seconds_per_local_step": 0.4, "client_train_seconds": 10.0}
        for i, a in enumerate(accs[1:], 1)
    ]  # fmt: skip
    with open(os.path.join(folder, "rounds.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rounds)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"config": {"method": run.method}}, f)
    machine = {"cpu": "test", "arch": "x86_64", "cores": 2, "memory_gb": 1.0, "python": "3"}
    bench = {"wall_seconds": 60.0, "resumed": False, "load_before": 0.5, "machine": machine,
             "finished": "2026-12-01T00:00:00Z"}  # fmt: skip
    with open(os.path.join(folder, "bench.json"), "w") as f:
        json.dump(bench, f)


@pytest.mark.unit
def test_the_page_renders_from_partial_records_with_means_over_the_seeds_present(tmp_path):
    from bench.plan import Run

    records, page = str(tmp_path / "records"), str(tmp_path / "page" / "results.md")
    os.makedirs(records)
    with open(os.path.join(records, "plan.json"), "w") as f:
        json.dump({"settings": dataclasses.asdict(DEFAULT), "invocations": [], "learning_rates": learning_rates()}, f)
    finals = {("fedkrso", 0): 0.80, ("fedkrso", 1): 0.77, ("fedavg", 0): 0.80, ("fedavg", 1): 0.78}
    finals[("fedavg-lora", 0)] = 0.70
    for (method, seed), final in finals.items():
        peak = 600.0 if method == "fedkrso" else 1000.0
        _write_run(
            records, Run("sst2", 0.5, seed, method), [0.5, 0.6, final], peak, 100 if method == "fedkrso" else 4000
        )
    _write_run(records, Run("sst2", 0.1, 2, "fedtt-plus"), [0.5, 0.6, 0.7])  # FedTT's seed 2 not run yet
    report.main(["--records", records, "--page", page])
    with open(page) as f:
        text = f.read()
    row = summary_row(page, "FedKRSO vs FedAvg, SST-2: final accuracy")
    # per-seed differences 0 and -1 points: mean -0.50, 0.50 above the aim, inside their spread (0.71)
    assert "78.50 ± 2.12 vs 79.00 ± 1.41 (-0.50 points in the mean, per-seed difference SD 0.71)" in row
    assert (
        "2 seeds (0, 1) of 3 planned" in row
        and "within noise, 0.50 points to spare against a seed spread of 0.71" in row
    )
    row = summary_row(page, "FedKRSO vs FedAvg-LoRA, SST-2: final accuracy")
    assert "80.00 vs 70.00 (+10.00 points), 1 seed (0) of 3 planned | above FedAvg-LoRA (mean) | met, 10.00" in row
    assert row.endswith("to spare on one seed (no seed spread yet) |\n")
    assert summary_row(page, "FedKRSO vs FedTT, SST-2: final accuracy").endswith(
        "| not run yet | above FedTT (mean) | not run yet |\n"
    )
    assert summary_row(page, "FedTT+ vs FedTT, SST-2 at alpha 0.1: final accuracy").endswith("| not run yet |\n")
    assert "0.60x | <= 0.6x | met" in summary_row(
        page, "FedKRSO vs FedAvg, SST-2: client peak memory in the simulation worker (mean over seeds)"
    )
    assert "| FedKRSO | 0.0005 | 2 | 78.50 ± 2.12 | 80.00 | 77.00 | not run yet |" in text
    assert "| FedTT | not run yet | 0 |" in text and "5 of 36 planned runs have records" not in text
    assert "6 of 36 planned runs have records; not run yet: sst2-a0.5-s0-fedtt," in text
    assert "- FedKRSO, seed 1: 50.0, 60.0, 77.0" in text


@pytest.mark.unit
def test_the_page_names_each_command_once():
    only = "python -m bench.run --only "
    # a resumed run repeats its command; runs driven one by one read as one template with their count
    assert report.produced_by([only + "a", only + "a", only + "b"]) == (
        f"`{only}<name>`, once per run (3 invocations for 2 runs, listed in plan.json beside the records)"
    )
    assert report.produced_by(["python -m bench.run", "python -m bench.run"]) == "`python -m bench.run`"
    assert report.produced_by(["python -m bench.run --quick", only + "a"]) == (
        f"`python -m bench.run --quick`, then `{only}a`"
    )
    assert report.produced_by([]) == "`python -m bench.run` (not run yet)"
    # records written when the harness ran as a file name read as the module command they are today
    assert report.produced_by(["python bench/run.py --only a", only + "b"]) == report.produced_by(
        [only + "a", only + "b"]
    )


@pytest.mark.unit
def test_mean_and_spread_over_seeds():
    assert claims.mean_sd([0.70, 0.72, 0.74]) == "72.00 ± 2.00"
    assert claims.mean_sd([0.7]) == "70.00 (1 seed)" and claims.mean_sd([]) == "-"


@pytest.mark.unit
def test_bad_settings_stop_before_anything_runs(tmp_path):
    with pytest.raises(SystemExit, match="task 'nope' is unknown"):
        main(["--quick", "--tasks", "nope", "--records", str(tmp_path)])
    with pytest.raises(SystemExit, match="keep it in --tasks"):
        main(["--quick", "--tasks", "rte", "--records", str(tmp_path)])
    assert not os.listdir(tmp_path)


@pytest.mark.unit
def test_every_run_trains_at_its_methods_own_rate():
    # the benchmark passes no train.lr: "auto" resolves to common.config's table, as a user's run does
    for run in plan_runs(DEFAULT):
        overrides = run_overrides(DEFAULT, run, "/nonexistent")
        assert "train.lr" not in overrides
        assert effective(overrides)["train.lr"] == METHOD_DEFAULTS[run.method]["train.lr"]
    rates = learning_rates()
    assert rates["fedkrso"] == 5e-4 and rates["fedtt"] == 1e-2 and all(get_method(m).reads_train_lr for m in rates)


def summary_row(page: str, claim: str) -> str:
    with open(page) as f:
        return next(line for line in f if line.startswith(f"| {claim} |"))


def up_per_client(records: str, name: str) -> float:
    with open(os.path.join(records, "runs", name, "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    trained = [r for r in rounds if r["round"] > 0]
    return sum(r["bytes_up"] for r in trained) / sum(r["clients"] for r in trained)


ROUND_KEYS = {
    "round", "method", "task", "accuracy", "loss", "bytes_down", "bytes_up", "clients",
    "client_peak_rss_mb", "client_train_seconds", "seconds",
}  # fmt: skip


def check_run(records: str, run) -> list[dict]:
    """What every run's records must hold (the end-to-end checks of `flwr run`, formerly tests/test_e2e.py)."""
    folder = os.path.join(records, "runs", run.name)
    with open(os.path.join(folder, "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f]
    assert [r["round"] for r in rounds] == [0, 1, 2], run.name
    for r in rounds:
        assert set(r) >= ROUND_KEYS and r["method"] == run.method and r["task"] == run.task
        assert 0.0 <= r["accuracy"] <= 1.0
    for r in rounds[1:]:
        assert r["clients"] == QUICK.clients and r["rejected"] == 0 and r["failures"] == 0, (run.name, r)
        assert r["bytes_down"] > 0 and r["bytes_up"] > 0
        assert r["client_peak_rss_mb"] > 50 and r["client_train_seconds"] > 0
    summary = read_json(os.path.join(folder, "summary.json"))
    assert summary["rounds"] == 2 and summary["config"]["method"] == run.method
    assert summary["totals"]["bytes_up"] == sum(r["bytes_up"] for r in rounds)
    return rounds


@pytest.mark.system
@pytest.mark.e2e
def test_quick_benchmark_end_to_end(tiny_bert, glue_dir, tmp_path):
    """The harness's --quick plan on RTE (every method; the alpha 0.1 runs left out) through `flwr run`, the tiny
    model and 2 rounds so that it is also the suite's end-to-end run of every method in simulation (formerly
    tests/test_e2e.py and tests/test_e2e_tt.py); three runs at once (--jobs 3) to keep the suite short."""
    records, page = str(tmp_path / "records"), str(tmp_path / "page" / "results.md")
    cmd = [sys.executable, "-m", "bench.run", "--quick", "--model", tiny_bert, "--rounds", "2", "--jobs", "3"]
    cmd += ["--skew-seeds", ""]  # no alpha 0.1 runs: they are FedTT and FedTT+ again, left out to save 2 runs
    # RTE (2,490 train examples), not SST-2 (67,349): every client process tokenises its whole partition, about
    # 4 s of CPU per process for SST-2 at 2 clients; SST-2 runs in the benchmark itself
    cmd += ["--tasks", "rte"]
    cmd += ["--records", records, "--page", page]
    env = {**os.environ, "GLUE_DIR": glue_dir}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    runs = plan_runs(dataclasses.replace(QUICK, skew_seeds=(), tasks=("rte",)))
    assert f"[{len(runs)}/{len(runs)}]" in out.stdout and "round 2/2: accuracy" in out.stdout
    assert "all left about" in out.stdout
    for run in runs:
        for name in ("rounds.jsonl", "summary.json", "bench.json"):
            assert os.path.exists(os.path.join(records, "runs", run.name, name)), (run.name, name)
    rows = {run.method: check_run(records, run) for run in runs if run.alpha == QUICK.alpha}
    for rnd in (1, 2):  # FedKRSO sends accumulators (K * r * sum d_out numbers), never the weights
        assert rows["fedkrso"][rnd]["bytes_up"] * 5 < rows["fedavg"][rnd]["bytes_up"]
    assert rows["fedkrso"][2]["bytes_down"] * 5 < rows["fedavg"][2]["bytes_down"]
    assert rows["fedkrso"][1]["bytes_down"] < rows["fedkrso"][2]["bytes_down"]  # round 1 carries no log yet
    for method in ("fedspzo", "fedkseed"):  # scalars up, the model rebuilt from seeds by replay
        assert all(r["bytes_up"] / r["clients"] < 2048 for r in rows[method][1:]), method
    assert all(0 < r["bytes_up"] < r["bytes_down"] for r in rows["fedtt-plus"][1:])  # the round's cores (+ head) up
    with open(os.path.join(records, "runs", f"rte-a{QUICK.alpha:g}-s0-fedtt-plus", "fedtt-selection.jsonl")) as f:
        selection = [json.loads(line) for line in f]
    assert [s["round"] for s in selection] == [1, 2]
    assert all(s["matrix"] == "up" for s in selection[0]["cores"])  # round 1: the zero-initialised W_up cores
    assert any(s["matrix"] == "down" for s in selection[1]["cores"])  # then the gradient scores decide
    assert os.path.getsize(os.path.join(tmp_path, "page", "results-rte.png")) > 10_000
    with open(page) as f:
        text = f.read()
    assert "## Summary" in text and "python -m bench.run --quick" in text
    assert "No runs planned (`--skew-seeds ''`)." in text  # and no empty alpha 0.1 plot beside it
    assert not os.path.exists(os.path.join(tmp_path, "page", "results-skew.png"))
    assert f"{len(runs)} of {len(runs)} planned runs have records" in text
    summary = text.split("## Summary")[1].split("\n## ")[0]
    rows_ = [line for line in summary.splitlines() if line.startswith("| ")][2:]
    assert all(line.rsplit("|", 2)[1].strip() == "not run yet" for line in rows_ if "alpha 0.1" in line)
    verdicts = [line.rsplit("|", 2)[1].strip() for line in rows_ if "alpha 0.1" not in line]
    assert len(verdicts) >= 13 and all(
        re.fullmatch(r"met, [\d.]+(x| B| points) to spare|not met, short by [\d.]+(x| B| points)|within noise, .*", v)
        for v in verdicts
    ), verdicts

    # The summary follows the records: FedAvg's uplink x 10 in its rounds.jsonl gives a 10x larger ratio.
    claim = "FedKRSO vs FedAvg, RTE: bytes per client per round, up"
    krso, avg = (f"rte-a0.5-s0-{m}" for m in ("fedkrso", "fedavg"))
    before = up_per_client(records, avg) / up_per_client(records, krso)
    assert f"{before:.1f}x fewer" in summary_row(page, claim)
    path = os.path.join(records, "runs", avg, "rounds.jsonl")
    with open(path) as f:
        rounds = [json.loads(line) for line in f]
    with open(path, "w") as f:
        f.writelines(json.dumps({**r, "bytes_up": 10 * r["bytes_up"]}) + "\n" for r in rounds)
    report.main(["--records", records, "--page", page])
    after = up_per_client(records, avg) / up_per_client(records, krso)
    assert after == pytest.approx(10 * before) and f"{after:.1f}x fewer" in summary_row(page, claim)

    # Restarted, the harness reads every finished probe and run instead of running it again.
    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"{len(runs)} of {len(runs)} runs already finished" in again.stdout
    assert "probes: all" in again.stdout and "round 2/2" not in again.stdout
    assert len(read_json(os.path.join(records, "plan.json"))["invocations"]) == 2


@pytest.mark.unit
def test_the_robust_page_reads_every_seed_and_judges_the_mean_against_the_seed_spread(tmp_path):
    import argparse

    from bench import robust

    args = argparse.Namespace(rounds=3, local_steps=8, max_length=64, records=str(tmp_path))
    losses = {  # seed -> (honest, hostile) final dev loss of FedTT at 3 clients, 1 of 3 hostile
        0: (0.54, 0.61), 1: (0.50, 0.50), 2: (0.52, 0.56),
    }  # fmt: skip
    rule = robust.shipped_rule("fedtt", 3)
    for seed, (honest, hostile) in losses.items():
        for scenario, loss in (("honest, 3", honest), ("bound + 1e12, 1 of 3", hostile)):
            record = {"settings": robust.settings_of(args), "loss": loss, "accuracy": 0.7, "finite": True, "seed": seed}
            name = robust.run_name("fedtt", rule, scenario, seed)
            with open(tmp_path / f"{name}.json", "w") as f:
                json.dump(record, f)
    # a record of other settings, and a name that only starts like one, are not read
    with open(tmp_path / (robust.run_name("fedtt", rule, "honest, 3", 3) + ".json"), "w") as f:
        json.dump({"settings": {"rounds": 9}, "loss": 9.0}, f)
    open(tmp_path / (robust.run_name("fedtt", rule, "honest, 3") + "-sx.json"), "w").close()
    results = robust.read_results(args)
    assert sorted(results[("fedtt", rule)]["honest, 3"]) == [0, 1, 2]
    row = next(r for r in robust.verdicts(results) if r.startswith("| FedTT | bound + 1e12, 1 of 3 "))
    # gaps +0.07, 0.00, +0.04: mean +0.037, SD 0.035 against a margin of 0.013 to the aim
    assert "| 3 | 0.520 | 0.557 | +0.037 (+0.070, +0.000, +0.040) |" in row
    assert "within noise, 0.013 to spare against a seed spread of 0.035" in row
    assert robust.loss_gaps({0: {"loss": 1.0}, 1: {"loss": 2.0}}, {1: {"loss": 1.5}}) == {1: 0.5}
