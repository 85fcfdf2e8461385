"""The benchmark's plan: its settings (the full plan and --quick), the runs it holds in the order they run, the
methods each table compares, and the records' JSON. Read by bench/run.py (which runs the plan), bench/report.py
(which writes the page from its records) and bench/robust.py; it imports nothing of bench/ itself, so the
harness's modules import in one direction (tests/test_layers.py)."""

from __future__ import annotations

import fnmatch
import json
import os
from dataclasses import dataclass, field

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.files import replace_file
from common.methods import LABELS, METHOD_DEFAULTS, METHODS, get_method, known, names

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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
    # in all of flwr-datasets' attempts (common.partition says so), every client fails; 0, 2, 3, 4, 5 can.
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
        raise SystemExit(f"error: --only {only!r} matches none of the planned runs (python -m bench.run --list)")
    return chosen


def learning_rates() -> dict[str, float]:
    """The rate of each method that reads train.lr, as its runs resolve train.lr = "auto" (the zero-order ones
    step with zo.lr)."""
    return {m: METHOD_DEFAULTS[m]["train.lr"] for m in METHODS if get_method(m).reads_train_lr}


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def write_json(path: str, value) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, json.dumps(value, indent=1).encode())


def key(s: Settings, task: str, method: str, alpha: float | None = None, seed: int | None = None) -> str:
    return Run(task, s.alpha if alpha is None else alpha, s.seeds[0] if seed is None else seed, method).name


def seed_names(s: Settings, task: str, method: str, alpha: float | None = None, seeds=None) -> dict[int, str]:
    """seed -> run name of a method's runs in a table (the main table's seeds unless told)."""
    return {seed: key(s, task, method, alpha, seed) for seed in (s.seeds if seeds is None else seeds)}
