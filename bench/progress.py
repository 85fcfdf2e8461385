"""The benchmark's time estimate and its progress lines: how long each run should take, from the probes, and
which run and round is under way with the time left, corrected by how long this invocation's runs took."""

from __future__ import annotations

import math
import os
import re
import threading
import time

from bench.plan import NAMES, Run, Settings

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
