"""The decoder section of the benchmark (bench/decoder.py, bench/decoder_page.py): its plan covers every
registered method, every planned run is a valid configuration, the page's verdicts are computed from records,
and records of another data file are not taken for this one's."""

from __future__ import annotations

import json
import os

import pytest

from bench import decoder, decoder_page, decoder_plan
from bench.run import effective
from common.config import with_later_keys
from common.methods import METHODS

pytestmark = pytest.mark.unit


def test_the_plan_is_every_method_then_fedtt_and_fedtt_plus_at_the_stronger_skew():
    runs = decoder_plan.plan_runs(decoder_plan.DEFAULT)
    main = [r.method for r in runs if r.alpha == decoder_plan.DEFAULT.alpha and r.seed == 0]
    assert sorted(main) == sorted(METHODS)
    assert [r.method for r in runs if r.alpha == 0.1 and r.seed == 0] == ["fedtt", "fedtt-plus"]
    seeds = {(r.alpha, r.method): [] for r in runs}
    for r in runs:
        seeds[r.alpha, r.method].append(r.seed)
    for (alpha, method), got in seeds.items():  # the pairs a seed could turn have three seeds, the rest one
        want = [0, 25, 44] if alpha == 0.1 else [0, 1, 2] if method in ("fedkrso", "fedavg") else [0]
        assert got == want, (alpha, method)
    assert runs.index(decoder_plan.DecoderRun(0.5, 1, "fedavg")) < runs.index(
        decoder_plan.DecoderRun(0.5, 2, "fedkrso")
    )
    assert len({r.name for r in runs}) == len(runs)
    for run in runs:  # every run's configuration passes the run-config checks before anything starts
        flat = effective(decoder.run_overrides(decoder_plan.DEFAULT, run, "/nonexistent", "/data/x.jsonl"))
        assert flat["model"] == "smollm2" and flat["partitioning"] == "dirichlet"
    for probe in decoder.probe_plan(decoder_plan.DEFAULT, "/data/x.jsonl", "/data/long.jsonl").values():
        effective(probe["config"])


def rounds(accuracies, load=1.0, train=20.0, up=1000, catchup=None):
    out = []
    for i, acc in enumerate(accuracies):
        trained = i > 0
        out.append(
            {
                "round": i, "accuracy": acc, "loss": 2.0 - 0.1 * i, "bytes_down": 100 * trained,
                "bytes_up": up * trained * 10, "clients": 10 * trained, "failures": 0, "rejected": 0,
                "client_peak_rss_mb": 2000.0 if trained else None, "client_train_seconds": train if trained else None,
                "client_load_seconds": load if trained else None, "seconds_per_local_step": 5.0 if trained else None,
                "client_forward_passes": 8.0 if trained else None, "eval-seconds": 40.0, "seconds": 150.0,
                **({"client_catchup_seconds": catchup if trained else None} if catchup is not None else {}),
            }
        )  # fmt: skip
    return out


def write_run(records, name, rows, digest="abc"):
    folder = os.path.join(records, "runs", name)
    os.makedirs(folder)
    with open(os.path.join(folder, "rounds.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"config": {}}, f)
    machine = {"cpu": "test CPU", "cores": 2, "memory_gb": 24.0}
    with open(os.path.join(folder, "bench.json"), "w") as f:
        json.dump({"wall_seconds": 600.0, "machine": machine, "data_sha256": digest}, f)


def write_probe(records, name, peak, seconds, **extra):
    os.makedirs(os.path.join(records, "probes"), exist_ok=True)
    config = {"train.precision": "bfloat16" if "bf16" in name else "float32", "train.max-length": 128}
    with open(os.path.join(records, "probes", f"{name}.json"), "w") as f:
        json.dump({"config": config, "result": {"peak_rss_mb": peak, "seconds_per_step": seconds, **extra}}, f)


def test_the_section_gives_every_claim_a_verdict_computed_from_the_records(tmp_path):
    records = str(tmp_path)
    write_run(
        records, decoder_plan.DecoderRun(0.5, 0, "fedkrso").name, rounds([0.2, 0.5, 0.6], up=20_000, load=4, catchup=3)
    )
    write_run(records, decoder_plan.DecoderRun(0.5, 0, "fedavg").name, rounds([0.2, 0.6, 0.63], up=600_000))
    write_run(records, decoder_plan.DecoderRun(0.5, 0, "fedspzo").name, rounds([0.2, 0.21, 0.24], load=5.0, train=20.0))
    write_probe(records, "inference-bf16", 1000.0, 0.5)
    write_probe(records, "fedtt-bf16", 1400.0, 2.0)
    write_probe(records, "fedtt-bf16-ckpt", 1200.0, 2.6)
    write_probe(records, "fedspzo-bf16", 1200.0, 8.0, forward_passes_per_step=16)
    write_probe(records, "bare-step-bf16", 3000.0, 2.5)
    text = "\n".join(decoder_page.section(records))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "not met, short by 2.00 points" in rows["FedKRSO within 1 point of FedAvg (exact match, final round)"]
    assert "30.0x fewer" in rows["FedKRSO bytes per client per round against FedAvg"]
    assert "met" in rows["FedKRSO bytes per client per round against FedAvg"].split(" | ")[3]
    spzo = rows["FedSPZO over the untuned model (exact match, final round against round 0)"]
    assert "+4.00 points" in spzo and "met, 1.00 points to spare" in spzo
    # memory: the lower of bfloat16 and bfloat16 + checkpointing, against plain inference in bfloat16
    assert "1200 vs 1000 MB (with gradient checkpointing): 1.20x" in text
    assert "0.500 s per forward pass vs 0.500 s bare: 1.00x" in text  # zero-order: per forward pass
    assert "2.00 vs 2.50 s: 0.80x" in text
    # loading: 10 clients of 5 s each, two at a time, in a 150 s round: 16.7% of it (and 20% of a client's round)
    # (FedSPZO's records predate timing the catch-up apart: it stays inside its load)
    assert "at most 16.7% (sst2i-a0.5-s0-fedspzo) over the 3 runs timed" in text
    assert "FedSPZO 16.7%, FedKRSO 3.3%" in text or "FedKRSO 3.3%, FedAvg 3.3%, FedSPZO 16.7%" in text
    assert "not met, short by 6.7%" in text
    # catching up: FedKRSO's 3 of its 4 load seconds, 10 clients two at a time in a 150 s round
    catching = next(line for line in text.splitlines() if line.startswith("| Catching up"))
    assert "at most 10.0% (sst2i-a0.5-s0-fedkrso) over the 1 runs timed apart" in catching
    assert "| 1.0 / 3.0 / 20.0 /" in text and "| 5.0 / in load / 20.0 /" in text
    assert text.count("not run yet") >= 5  # FedTT+ at alpha 0.1, the edge probes, ...: said, not invented


def test_the_pairs_verdicts_weigh_the_seed_spread(tmp_path):
    """FedKRSO against FedAvg over three seeds: the mean difference against the per-seed difference's SD."""
    records = str(tmp_path)
    for seed, (ours, theirs) in enumerate([(0.60, 0.62), (0.70, 0.66), (0.50, 0.55)]):
        write_run(records, decoder_plan.DecoderRun(0.5, seed, "fedkrso").name, rounds([0.2, ours], up=20_000))
        write_run(records, decoder_plan.DecoderRun(0.5, seed, "fedavg").name, rounds([0.2, theirs], up=600_000))
    text = "\n".join(decoder_page.section(records))
    row = next(line for line in text.splitlines() if line.startswith("| FedKRSO within 1 point of FedAvg"))
    assert "60.00 ± 10.00 vs 61.00 ± 5.57 (-1.00 points in the mean, per-seed difference SD 4.58)" in row
    assert "within noise" in row


def test_a_finished_run_on_another_data_file_is_set_aside(tmp_path, capsys):
    records = str(tmp_path)
    run = decoder_plan.DecoderRun(0.5, 0, "fedtt")
    write_run(records, run.name, rounds([0.2, 0.3]), digest="old")
    assert decoder.matched(records, run, {}, "new") == "new"
    assert not os.path.exists(os.path.join(records, "runs", run.name))
    assert os.listdir(os.path.join(records, "stale"))
    assert "finished on another data file" in capsys.readouterr().out


def test_zero_order_compute_is_not_compared_where_neither_method_gained(tmp_path):
    records = str(tmp_path)
    for method in ("fedspzo", "fedkseed"):
        write_run(records, decoder_plan.DecoderRun(0.5, 0, method).name, rounds([0.23, 0.22, 0.23]))
    text = "\n".join(decoder_page.section(records))
    assert "neither passed round 0's 23.00 in 5 rounds | <= 1/1.6 | not measurable: no gain" in text


def test_list_says_which_finished_runs_a_changed_default_makes_stale_and_moves_nothing(tmp_path):
    """--list's check is the benchmark's own (bench.run.run_state with move=False): a run finished under another
    configuration (a shipped default changed since, say) is "to run", with the keys that differ, and its
    records stay where they are until the benchmark itself sets them aside."""
    records = str(tmp_path)
    run = decoder_plan.DecoderRun(0.5, 0, "fedspzo")
    write_run(records, run.name, rounds([0.2, 0.3]), digest="same")
    folder = os.path.join(records, "runs", run.name)
    with open(os.path.join(folder, "summary.json"), "w") as f:
        json.dump({"config": {"aggregation.rule": "mean"}}, f)
    recorded = {k: v for k, v in with_later_keys({"aggregation.rule": "mean"}).items() if k not in decoder.IGNORED}
    want = {**recorded, "aggregation.rule": "capped-mean"}
    assert (
        decoder.matched(records, run, want, "same", move=False)
        == "new (finished with another configuration (aggregation.rule))"
    )
    assert decoder.matched(records, run, want, "other", move=False) == "new (finished on another data file)"
    assert os.path.isdir(folder) and not os.path.exists(os.path.join(records, "stale"))
    assert decoder.matched(records, run, recorded, "same", move=False) == "done"
    assert decoder.matched(records, run, want, "same") == "new" and not os.path.exists(folder)  # the real check moves
