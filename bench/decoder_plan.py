"""The decoder section's plan (bench/decoder.py runs it, bench/decoder_page.py writes its page): its settings,
its runs in the order they run, and what a method's runs change on this machine. Imports nothing of bench/ but
the main plan's names, so the page reads the plan without the code that runs it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from bench.plan import NAMES, ROOT
from common.methods import known

RECORDS = os.path.join(ROOT, "bench", "records", "decoder")
# What a method's runs change on this 24 GB machine, and why. FedAvg on SmolLM2 (538 MB each way a client):
# with all 10 clients a round, two at once, 9 of 10 clients were killed for memory in round 2 (Ray's threshold,
# 95% of 24 GB); one at a time with both cores, 1 or 2 in round 2 and all in round 3: the ServerApp's process
# held 15 GB (every instruction and reply of a round is a full copy of the model). Five clients a round, one
# at a time: FedAvg then trains on half the clients a round (the page says so beside its figures).
CLIENT_CPUS = {"fedavg": 2}  # cores a simulated client holds, where not 1
# (min-clients too: a round samples at least min-clients nodes, so 0.5 of 10 with min-clients 10 was still 10)
RUN_CHANGES = {"fedavg": {"fraction-train": 0.5, "min-clients": 5}}


@dataclass(frozen=True)
class DecoderSettings:
    rows: int = 2000  # SST-2 training reviews: 1,800 to train on, 200 held out
    clients: int = 10
    alpha: float = 0.5
    rounds: int = 5
    local_steps: int = 4
    batch_size: int = 4
    max_length: int = 128
    seeds: tuple[int, ...] = (0,)
    methods: tuple[str, ...] = known("fedkrso", "fedavg", "fedavg-lora", "fedtt", "fedtt-plus", "fedspzo", "fedkseed")
    # the pairs whose verdict a seed could turn (issue 31: three seeds for them): FedKRSO against FedAvg here, FedTT+
    # against FedTT at the stronger skew; the others' margins (FedTT -26 against LoRA, the zero-order +15) are not
    pair_seeds: tuple[int, ...] = (0, 1, 2)
    pair_methods: tuple[str, ...] = known("fedkrso", "fedavg")
    skew_alpha: float = 0.1
    # at alpha 0.1 over two answers most seeds cannot give each of 10 clients 10 examples (flwr_datasets'
    # DirichletPartitioner gives up): of seeds 0..59 only 0, 25 and 44 partition, so those are the three
    skew_seeds: tuple[int, ...] = (0, 25, 44)
    skew_methods: tuple[str, ...] = known("fedtt", "fedtt-plus")
    eval_max: int = 200  # response loss over the whole held-out split
    generate: int = 100  # exact match of the first 100 held-out prompts' greedy answers
    max_new_tokens: int = 4
    # the probes (make bench-decoder-probe): issue 31's batch 8 x 128, two local steps, in a fresh process
    probe_batch: int = 8
    probe_length: int = 128
    probe_steps: int = 2
    edge_length: int = 512  # no 360M-class decoder offline: the edge probe is 135M at max-length 512
    edge_batch: int = 2  # batch 8 x 512 in bfloat16 took FedTT to 7.4 GB (activations and the 49k-word logits)


DEFAULT = DecoderSettings()


@dataclass(frozen=True)
class DecoderRun:
    alpha: float
    seed: int
    method: str

    @property
    def name(self) -> str:
        return f"sst2i-a{self.alpha:g}-s{self.seed}-{self.method}"

    @property
    def label(self) -> str:
        return f"{NAMES[self.method]} on SmolLM2-135M, SST-2 instructions, alpha {self.alpha:g}, seed {self.seed}"


def run_seeds(s: DecoderSettings, method: str, alpha: float) -> tuple[int, ...]:
    """The seeds `method` runs on at `alpha`: the pairs' three, else the main table's."""
    if alpha == s.skew_alpha:
        return s.skew_seeds
    return s.pair_seeds if method in s.pair_methods else s.seeds


def plan_runs(s: DecoderSettings) -> list[DecoderRun]:
    """Every method at `alpha` on the first seed, FedTT and FedTT+ at the stronger skew, then the pairs' other
    seeds (in the order they are best run: a pair's two methods on one seed after the other)."""
    first = [DecoderRun(s.alpha, run_seeds(s, m, s.alpha)[0], m) for m in s.methods]
    first += [DecoderRun(s.skew_alpha, s.skew_seeds[0], m) for m in s.skew_methods]
    more = {seed for m in s.methods for seed in run_seeds(s, m, s.alpha)[1:]} | set(s.skew_seeds[1:])
    for seed in sorted(more):
        first += [DecoderRun(s.alpha, seed, m) for m in s.methods if seed in run_seeds(s, m, s.alpha)[1:]]
        first += [DecoderRun(s.skew_alpha, seed, m) for m in s.skew_methods if seed in s.skew_seeds[1:]]
    return first
