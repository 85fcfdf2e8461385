"""The benchmark's decoder section: the seven methods instruction-tune SmolLM2-135M-Instruct, the same harness.

    python -m bench.decoder --list                  # the plan's runs in order, nothing run
    python -m bench.decoder [--only 'sst2i-a0.5-*'] # the runs (make bench-decoder), records in bench/records/decoder
    python -m bench.decoder --probe                 # memory and step cost against bare transformers (make
                                                    # bench-decoder-probe), records in bench/records/decoder/probes
    python -m bench.report                          # docs/results.md, its decoder section included

The task runs offline: the first `rows` SST-2 training reviews as a prompt with a one-word answer
(scripts/glue_instructions.py), the held-out 0.1 of that file (seed 0, the same rows for every run) scored by
the response loss and by the exact match of greedily generated answers. 10 simulated clients, Dirichlet over
the answers (common.partition.response_classes). The data file is rebuilt from the GLUE folder when missing (it
is never committed); the records hold its SHA-256, and runs on another file are not matched.

Records as bench/run.py's: runs/<name>/ (rounds.jsonl, summary.json, bench.json) complete when bench.json is
written, probes/<name>.json, plan.json. Finished runs are read, not run again; a run stopped part-way continues
from its checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time

from bench.decoder_plan import CLIENT_CPUS, DEFAULT, RECORDS, RUN_CHANGES, DecoderRun, DecoderSettings, plan_runs
from bench.plan import GLUE, ROOT, VOLATILE, read_json, select, write_json
from bench.run import effective, listed, machine, run_state, set_aside, smollm_path
from common.methods import METHODS, known

DATA_DIR = os.path.join(ROOT, "results", "decoder-data")
# the data file's path differs from clone to clone: runs match on its SHA-256 (in bench.json) instead
IGNORED = (*VOLATILE, "task")


def data_file(s: DecoderSettings) -> str:
    """The instruction file of the section, built from the GLUE folder where it is not yet."""
    path = os.path.join(DATA_DIR, f"sst2-instructions-{s.rows}.jsonl")
    if not os.path.exists(path):
        from scripts.glue_instructions import rows

        made = rows("sst2", "train", GLUE, s.rows)
        write_jsonl(path, made)
    return path


def edge_file(s: DecoderSettings) -> str:
    """Prompts long enough for the edge probe's max-length: consecutive SST-2 reviews packed into one prompt
    of at most `edge_length` - 64 tokens (room for the chat template and the answer), the first review's word as
    the answer. (A batch is cut to its longest row, so short prompts would measure max-length 128 again.)"""
    path = os.path.join(DATA_DIR, f"sst2-packed-{s.edge_length}.jsonl")
    if os.path.exists(path):
        return path
    from common.data import load_split
    from common.modeling import load_tokenizer
    from common.tasks import TASKS

    tok, task = load_tokenizer("smollm2"), TASKS["sst2"]
    ds = load_split(task, "train", GLUE)
    budget, rows, text, first, used = s.edge_length - 64, [], [], None, 0
    for review, label in zip(ds["text"], ds["label"], strict=True):
        n = len(tok(review, add_special_tokens=False)["input_ids"]) + 1
        if used + n > budget and text:
            rows.append({"prompt": "Reviews:\n" + "\n".join(text) + "\nIs the first one positive or negative?",
                         "response": task.lm_words[first].strip()})  # fmt: skip
            text, used = [], 0
            if len(rows) == 200:
                break
        if not text:
            first = label
        text.append(review)
        used += n
    write_jsonl(path, rows)
    return path


def write_jsonl(path: str, rows: list[dict]) -> None:
    from common.files import replace_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    replace_file(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run_overrides(s: DecoderSettings, run: DecoderRun, records: str, data: str) -> dict:
    return {
        "method": run.method, "task": data, "model": "smollm2", "seed": run.seed, "partitioning": "dirichlet",
        "dirichlet-alpha": run.alpha, "num-server-rounds": s.rounds, "train.local-steps": s.local_steps,
        "train.batch-size": s.batch_size, "train.max-length": s.max_length, "eval.max-examples": s.eval_max,
        "eval.generate": s.generate, "eval.max-new-tokens": s.max_new_tokens, "min-clients": s.clients,
        "fraction-train": 1.0, "results-dir": os.path.join(records, "runs"), "run-name": run.name,
        **RUN_CHANGES.get(run.method, {}),
    }  # fmt: skip


def matched(records: str, run: DecoderRun, want: dict, digest: str, move: bool = True) -> str:
    """run_state, and a finished run on another data file (its bench.json's data_sha256) set aside (`move`;
    move=False, for --list: nothing moved, run_state's "new (why)")."""
    bench = os.path.join(records, "runs", run.name, "bench.json")
    if os.path.exists(bench) and read_json(bench).get("data_sha256") != digest:
        if not move:
            return "new (finished on another data file)"
        set_aside(records, os.path.dirname(bench), "finished on another data file")
    return run_state(records, run, want, IGNORED, move=move)


def federated(s: DecoderSettings, records: str, runs: list[DecoderRun]) -> None:
    from scripts.simulate import simulate

    data = data_file(s)
    digest = sha256(data)
    for i, run in enumerate(runs, 1):
        overrides = run_overrides(s, run, records, data)
        want = {k: v for k, v in effective(overrides).items() if k not in IGNORED}
        state = matched(records, run, want, digest)
        if state == "done":
            print(f"== [{i}/{len(runs)}] {run.name}: finished (records read)", flush=True)
            continue
        folder = os.path.join(records, "runs", run.name)
        if state == "resume":
            overrides["resume-from"] = folder
        print(f"== [{i}/{len(runs)}] {run.label}{' (continued)' if state == 'resume' else ''}", flush=True)
        load, start = os.getloadavg()[0], time.time()
        cpus = CLIENT_CPUS.get(run.method, 1)
        result = simulate(overrides, s.clients, True, 6 * 3600, on_line=progress_line, client_cpus=cpus)
        seconds = time.time() - start
        if result["status"] != "finished:completed" or result["summary"] is None:
            raise SystemExit(f"{run.label} failed: {result['status']} (run {result['run_id']}); records in {folder}")
        if not result["summary"]["totals"]["client_replies"]:
            raise SystemExit(f"{run.label}: no client replied in any round (run {result['run_id']}'s log says why)")
        if failed := result["summary"]["totals"]["failures"]:  # e.g. clients killed for memory: not a fair run
            set_aside(records, folder, f"{failed} client failures")
            raise SystemExit(f"{run.label}: {failed} client failures (run {result['run_id']}'s log says why)")
        write_json(
            os.path.join(folder, "bench.json"),
            {
                "wall_seconds": seconds, "resumed": state == "resume", "load_before": load, "machine": machine(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "data_sha256": digest,
                "data_rows": s.rows, "client_cpus": cpus,
            },
        )  # fmt: skip
        print(f"   {run.name} done in {seconds:.0f} s: git add {os.path.relpath(folder, ROOT)}", flush=True)


def progress_line(line: str) -> None:
    if "round" in line and "accuracy" in line:
        print("   " + line.strip()[-160:], flush=True)


# ---------------------------------------------------------------- probes: memory and step cost


def probe_plan(s: DecoderSettings, data: str, edge_data: str = "") -> dict[str, dict]:
    """name -> {"kind", "config"}: each method's client round in float32 and with the frozen base in bfloat16
    (first-order methods also with gradient checkpointing), plain inference and a bare transformers training step
    of the same model, batches and precision, and the edge probe (max-length 512, one core)."""
    base = {
        "task": data, "model": "smollm2", "seed": 0, "partitioning": "dirichlet", "dirichlet-alpha": s.alpha,
        "train.local-steps": s.probe_steps, "train.batch-size": s.probe_batch, "train.max-length": s.probe_length,
        "min-clients": s.clients, "krso.intervals": s.probe_steps,
    }  # fmt: skip
    probes: dict[str, dict] = {}
    for precision in ("float32", "bfloat16"):
        p = {**base, "train.precision": precision}
        tag = "" if precision == "float32" else "-bf16"
        for method in METHODS:
            probes[f"{method}{tag}"] = {"kind": "client", "config": {**p, "method": method}}
        probes[f"inference{tag}"] = {"kind": "inference", "config": {**p, "method": "fedspzo"}}
        probes[f"bare-step{tag}"] = {"kind": "bare", "config": {**p, "method": "fedavg"}}
    for method in known("fedkrso", "fedavg-lora", "fedtt"):
        probes[f"{method}-bf16-ckpt"] = {
            "kind": "client",
            "config": {**base, "method": method, "train.precision": "bfloat16", "train.gradient-checkpointing": True},
        }
    edge = {**base, "task": edge_data or data, "train.precision": "bfloat16", "train.max-length": s.edge_length}
    edge.update({"train.local-steps": 1, "krso.intervals": 1, "partitioning": "iid", "train.batch-size": s.edge_batch})
    edge["train.gradient-checkpointing"] = True  # no effect on the zero-order methods (no backward pass)
    for method in known("fedavg-lora", "fedtt", "fedspzo"):
        probes[f"edge-{method}"] = {"kind": "client", "config": {**edge, "method": method}}
    return probes


def child_bare(spec: dict) -> dict:
    """A bare transformers training step: the model loaded as any user would (AutoModelForCausalLM from the
    ready folder), the same batches, AdamW over every parameter, forward + backward + step; nothing of ours
    but the data and the memory sampler."""
    import torch
    from transformers import AutoModelForCausalLM

    from common.config import parse_run_config
    from common.memory import PeakRSS
    from common.modeling import resolve
    from common.training import batch, client_data, step_batches

    torch.set_num_threads(1)
    cfg = parse_run_config(spec["config"])
    dtype = torch.bfloat16 if spec["config"].get("train.precision") == "bfloat16" else torch.float32
    node = {"partition-id": 0, "num-partitions": spec["clients"]}
    with PeakRSS() as mem:
        path, gguf = resolve(cfg.model)  # the ready folder of the embedded GGUF (converted once)
        net = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **({"gguf_file": gguf} if gguf else {}))
        net.train()
        opt = torch.optim.AdamW(net.parameters(), lr=1e-5)
        encoded, key = client_data(cfg, node)
        batches = step_batches(cfg, len(encoded["labels"]), 1, key)
        times = []
        for idx in batches:
            start = time.perf_counter()
            loss = net(**batch(encoded, idx)).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - start)
    # the first step allocates AdamW's state: the steady step is the mean of the later ones where there are some
    steady = times[1:] or times
    return {"peak_rss_mb": mem.peak_mb, "seconds_per_step": sum(steady) / len(steady), "local_steps": len(times)}


def in_child(kind: str, spec: dict, **env: str) -> dict:
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "bench.decoder", "--child", kind, json.dumps(spec)],
        capture_output=True, text=True, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": ROOT, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", **env},
    )  # fmt: skip
    if out.returncode != 0:
        raise SystemExit(f"decoder probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_probes(s: DecoderSettings, records: str, only: str | None = None) -> dict[str, dict]:
    import fnmatch

    data = data_file(s)
    plan = probe_plan(s, data, edge_file(s))
    digests = {path: sha256(path) for path in {p["config"]["task"] for p in plan.values()}}
    results, todo = {}, {}
    for name, probe in plan.items():
        if only and not any(fnmatch.fnmatchcase(name, p.strip()) for p in only.split(",")):
            continue
        path = os.path.join(records, "probes", f"{name}.json")
        if os.path.exists(path):
            saved = read_json(path)
            if (
                saved.get("config") == portable(probe["config"])
                and saved.get("data_sha256") == digests[probe["config"]["task"]]
            ):
                results[name] = saved
                continue
            set_aside(records, path, "probe records of another configuration")
        todo[name] = probe
    print(f"== decoder probes: {len(todo)} to run, {len(results)} read", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedsubspace-decoder-probe-") as tmp:
        clients = {n: p["config"] for n, p in todo.items() if p["kind"] == "client"}
        messages = in_child("messages", {"configs": clients, "folder": tmp}) if clients else {}
        for name, probe in todo.items():
            spec = {"kind": probe["kind"], "config": probe["config"], "clients": s.clients}
            if probe["kind"] == "client":
                spec["message"] = messages[name]
            start = time.time()
            result = in_child("bare" if probe["kind"] == "bare" else "probe", spec, FEDSUBSPACE_STATE_DIR=tmp)
            saved = {
                "name": name, "kind": probe["kind"], "config": portable(probe["config"]), "result": result,
                "data_sha256": digests[probe["config"]["task"]], "machine": machine(), "load_before": os.getloadavg()[0],
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }  # fmt: skip
            write_json(os.path.join(records, "probes", f"{name}.json"), saved)
            results[name] = saved
            print(
                f"   {name}: {result['seconds_per_step']:.2f} s/step, peak {result['peak_rss_mb']:.0f} MB "
                f"({time.time() - start:.0f} s)",
                flush=True,
            )
    return results


def portable(config: dict) -> dict:
    """A probe's configuration as recorded: the data file by its name, not this clone's path."""
    return {**config, "task": os.path.basename(config["task"])}


def note_invocation(records: str, s: DecoderSettings, command: str, data: str) -> None:
    path = os.path.join(records, "plan.json")
    plan = read_json(path) if os.path.exists(path) else {"invocations": []}
    # the history stays when the settings change (a run's own records say what it ran with: run_state matches them)
    plan.update(settings=dataclasses.asdict(s), data=os.path.basename(data), data_sha256=sha256(data))
    plan["invocations"].append(
        {"command": command, "machine": machine(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    )
    write_json(path, plan)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    ap.add_argument("--records", default=RECORDS)
    ap.add_argument("--list", action="store_true", help="the plan's runs in order (nothing runs)")
    ap.add_argument("--only", help="comma-separated shell patterns of run (or, with --probe, probe) names")
    ap.add_argument("--probe", action="store_true", help="the memory and step-cost probes instead of the runs")
    args = ap.parse_args(argv)
    if args.child:
        from bench.probes import child_messages, child_probe

        kind, spec = args.child
        children = {"messages": child_messages, "probe": child_probe, "bare": child_bare}
        print(json.dumps(children[kind](json.loads(spec))))
        return 0
    from common.interrupt import exit_on_signals

    exit_on_signals()  # SIGINT and SIGTERM stop the run under way and what it started (common/interrupt.py)
    s, records = DEFAULT, os.path.abspath(args.records)
    smollm_path()  # the embedded decoder is installed (make install), or a clear error
    if not os.path.isdir(GLUE):
        raise SystemExit(f"error: GLUE folder {GLUE} not found: set GLUE_DIR")
    runs = select(plan_runs(s), None if args.probe else args.only)
    data = data_file(s)
    if args.list:  # what a run of the benchmark would do with each: the same check, nothing moved
        digest = sha256(data)
        for run in runs:
            want = {k: v for k, v in effective(run_overrides(s, run, records, data)).items() if k not in IGNORED}
            print(listed(run.name, matched(records, run, want, digest, move=False)))
        return 0
    note_invocation(records, s, " ".join(["python -m bench.decoder", *(argv or sys.argv[1:])]), data)
    if args.probe:
        run_probes(s, records, args.only)
    else:
        federated(s, records, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
