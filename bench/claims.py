"""The benchmark's claims, as every page of it states them: a run's figures read from its records, the
claim / measured / aim / verdict table, the verdict that weighs a margin against the seed spread, and the
number formats. bench/summary.py and bench/report.py (the main page), bench/decoder_page.py (its decoder
section) and bench/robust.py (docs/results-robust.md) use it; it imports nothing of bench/ but the plan's JSON
reader."""

from __future__ import annotations

import json
import os
import statistics

from bench.plan import read_json

ZO_TARGET = 0.632  # 10 points above the starting model of the zero-order methods before the label-word head
ZO_GAIN_TARGET = 0.03  # compute to reach an accuracy: round 0 (the label-word start both share) + 3 points
ZO_COMPUTE_AIM = 1 / 1.6  # FedSPZO's claim: at least 1.6x less computation than zero-order baselines
NOT_RUN = "not run yet"  # a figure or verdict whose runs have no records (yet)


def read_run(records: str, run) -> dict | None:
    """A finished run's records (its rounds, bench.json and `stats`), None while any of its files is missing.
    `run`: anything with a `name` (its folder under <records>/runs)."""
    folder = os.path.join(records, "runs", run.name)
    if not all(os.path.exists(os.path.join(folder, f)) for f in ("rounds.jsonl", "summary.json", "bench.json")):
        return None
    with open(os.path.join(folder, "rounds.jsonl")) as f:
        rounds = [json.loads(line) for line in f if line.strip()]
    return {"run": run, "rounds": rounds, "bench": read_json(os.path.join(folder, "bench.json")), **stats(rounds)}


def stats(rounds: list[dict]) -> dict:
    """Per-run figures from its rounds: bytes per client per round (mean over the trained rounds, from the
    message sizes summed over replies), accuracy, client memory and step time, and the cumulative curves."""
    trained = [r for r in rounds if r["round"] > 0]
    replies = sum(r["clients"] for r in trained)
    evaluated = [r for r in rounds if r.get("accuracy") is not None]
    curve, total, compute, calls = [], 0.0, 0.0, 0.0
    for r in rounds:
        if r["clients"]:
            total += (r["bytes_down"] + r["bytes_up"]) / r["clients"]
            compute += r.get("client_train_seconds") or 0.0
            calls += r.get("client_forward_passes") or 0.0
        if r.get("accuracy") is not None:
            point = {"round": r["round"], "accuracy": r["accuracy"], "bytes": total, "compute": compute}
            curve.append({**point, "calls": calls})
    steps = [r["seconds_per_local_step"] for r in trained if r.get("seconds_per_local_step") is not None]
    peaks = [r["client_peak_rss_mb"] for r in trained if r.get("client_peak_rss_mb") is not None]
    return {
        "down": sum(r["bytes_down"] for r in trained) / replies if replies else None,
        "up": sum(r["bytes_up"] for r in trained) / replies if replies else None,
        "start": next((r["accuracy"] for r in rounds if r["round"] == 0), None),
        "final": evaluated[-1]["accuracy"] if evaluated else None,
        "best": max((r["accuracy"] for r in evaluated), default=None),
        "peak_mb": max(peaks, default=None),
        "s_per_step": statistics.mean(steps) if steps else None,
        "failures": sum(r["failures"] + r["rejected"] for r in trained),
        "curve": curve,
    }


def first_reaching(run: dict, target: float) -> dict | None:
    """The first evaluated point at or above `target` accuracy (its cumulative compute), None if none is."""
    return next((p for p in run["curve"] if p["accuracy"] >= target - 1e-12), None)


def accuracy_at_compute(run: dict, seconds: float) -> dict:
    """The last evaluated point whose cumulative client compute is within `seconds`."""
    inside = [p for p in run["curve"] if p["compute"] <= seconds + 1e-9]
    return inside[-1]


def size(n: float | None) -> str:
    if n is None:
        return "-"
    if n >= 2**20:
        return f"{n / 2**20:.2f} MB"
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n:.0f} B"


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def verdict(
    value: float | None, aim: float, at_least: bool, unit: str, digits: int = 2, spread: float | None = None
) -> str:
    """'met' or 'not met', with by how much (in the aim's unit); 'within noise' when the measured value is
    nearer the aim than `spread` (the seed spread of the measured value, in the same unit): other seeds would
    as likely land on the other side of the aim, so the seeds run cannot say."""
    if value is None:
        return NOT_RUN
    margin = value - aim if at_least else aim - value
    amount = f"{abs(margin):.{digits}f}{unit}"
    if spread is not None and abs(margin) < spread:
        side = "to spare" if margin >= 0 else "short"
        return f"within noise, {amount} {side} against a seed spread of {spread:.{digits}f}{unit}"
    return f"met, {amount} to spare" if margin >= 0 else f"not met, short by {amount}"


def paired_differences(ours: dict[int, float], theirs: dict[int, float]) -> dict[int, float]:
    """ours - theirs per seed that both have (a seed fixes the partition, initialisation and batches of both
    runs, so the seeds pair up), in seed order."""
    return {k: ours[k] - theirs[k] for k in sorted(set(ours) & set(theirs))}


def sample_sd(values) -> float | None:
    """The sample standard deviation; None for fewer than two values (one seed has no spread)."""
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else None


def seed_spread(ours: dict[int, float], theirs: dict[int, float]) -> float | None:
    """The seed spread of a difference of two methods' means, in points: the sample standard deviation over
    seeds of the per-seed difference. None with fewer than two seeds that both have."""
    return sample_sd(100 * d for d in paired_differences(ours, theirs).values())


class Claims:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, claim: str, measured: str, aim: str, result: str) -> None:
        self.rows.append((claim, measured, aim, result))

    def table(self) -> list[str]:
        out = ["| claim | measured | aim | verdict |", "| --- | --- | --- | --- |"]
        return out + [f"| {' | '.join(row)} |" for row in self.rows]


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def per_seed(runs: dict, names: dict[int, str], figure: str = "final") -> dict[int, float]:
    """seed -> one figure of that seed's run, over the seeds whose run has records (and the figure)."""
    return {seed: runs[n][figure] for seed, n in names.items() if n in runs and runs[n][figure] is not None}


def seed_mean(values: dict[int, float]) -> float | None:
    return statistics.mean(values.values()) if values else None


def seeds_text(seeds: list[int], planned: tuple[int, ...]) -> str:
    """'3 seeds (0, 1, 2)', '1 seed (0) of 3 planned': how many seeds a figure stands on."""
    text = f"{len(seeds)} seed{'' if len(seeds) == 1 else 's'} ({', '.join(map(str, sorted(seeds)))})"
    return text if len(seeds) >= len(planned) else f"{text} of {len(planned)} planned"


def fewer_bytes(c: Claims, claim: str, ours: float | None, theirs: float | None, aim: float) -> None:
    r = ratio(theirs, ours)
    measured = f"{size(ours)} vs {size(theirs)}: {r:.1f}x fewer" if r else NOT_RUN
    c.add(claim, measured, f">= {aim:g}x fewer", verdict(r, aim, True, "x", 1))


def compare_accuracy(
    c: Claims, claim: str, ours: dict[int, float], theirs: dict[int, float], planned: tuple[int, ...], least: float,
    aim: str,
) -> None:  # fmt: skip
    """Final accuracy of two methods over the seeds both have (a seed fixes both runs' partition, initialisation and
    batches): the difference of the means, ours - theirs in points, against `least`. Over two seeds or more the
    verdict is 'within noise' where the margin is smaller than the seed spread of the per-seed difference; one
    seed of several planned has no spread, and the verdict says so."""
    both = sorted(set(ours) & set(theirs))
    if not both:
        c.add(claim, NOT_RUN, aim, verdict(None, least, True, " points"))
        return
    a, b = [ours[k] for k in both], [theirs[k] for k in both]
    diff = 100 * (statistics.mean(a) - statistics.mean(b))
    spread = seed_spread(ours, theirs)
    if spread is None:
        measured = f"{pct(a[0])} vs {pct(b[0])} ({diff:+.2f} points), {seeds_text(both, planned)}"
    else:
        measured = (
            f"{mean_sd(a)} vs {mean_sd(b)} ({diff:+.2f} points in the mean, per-seed difference SD {spread:.2f}), "
            f"{seeds_text(both, planned)}"
        )
    said = verdict(diff, least, True, " points", spread=spread)
    if spread is None and len(both) < len(planned):  # one seed of several: no spread yet to weigh the margin by
        said += " on one seed (no seed spread yet)"
    c.add(claim, measured, aim, said)


def memory_ratio(c: Claims, claim: str, ours: float | None, theirs: float | None, aim: float) -> None:
    r = ratio(ours, theirs)
    measured = f"{ours:.0f} vs {theirs:.0f} MB: {r:.2f}x" if r else NOT_RUN
    c.add(claim, measured, f"<= {aim:g}x", verdict(r, aim, False, "x"))


def probe_memory(c: Claims, claim: str, ours: dict | None, theirs: dict | None, inference: dict | None) -> None:
    """FedKRSO's fresh-process peak against FedAvg's, with what both share: plain inference of the same model over
    the same batches (the model, the node's data, torch), and what each adds above it."""
    k, a = (p and p["peak_rss_mb"] for p in (ours, theirs))
    r = ratio(k, a)
    measured = f"{k:.0f} vs {a:.0f} MB: {r:.2f}x" if r else NOT_RUN
    if r and inference:
        i = inference["peak_rss_mb"]
        measured += (
            f"; plain inference of the same model and batches takes {i:.0f} MB ({i / k:.0%} of FedKRSO's peak), "
            f"above it {k - i:.0f} vs {a - i:.0f} MB"
        )
    c.add(claim, measured, "<= 0.6x", verdict(r, 0.6, False, "x"))


def compute_pair(a: dict, b: dict, r: float) -> str:
    """Two curve points (first_reaching's) side by side: cumulative client seconds, model calls, round; ratio."""
    return (
        f"{a['compute']:.0f} s, {a['calls']:.0f} model calls (round {a['round']}) vs {b['compute']:.0f} s, "
        f"{b['calls']:.0f} model calls (round {b['round']}): {r:.2f}x"
    )


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def mean_size(values: list) -> str:
    """The mean of the runs' bytes, '-' where no run has any (a run whose clients never replied has None)."""
    known = [v for v in values if v is not None]
    return size(statistics.mean(known)) if known else "-"
