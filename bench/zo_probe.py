"""Zero-order probe: one client, S steps on SST-2, dev accuracy at step 0 and every N steps, per parameter
set (`zo.params`) and learning rate.

    .venv/bin/python -m bench.zo_probe --method fedspzo --params all:3e-6,1e-5 bitfit:5e-4,2e-3 --steps 150 --every 75

Prints one JSON line per evaluation, one per (params, lr) with its gain over step 0 and seconds, and a last
line with every result (what `--out` writes as JSON, for the records). The shipped zero-order defaults and
why: docs/methods.md, "Why they learn" and "FedSPZO"; their effect at the benchmark's settings: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import parse_run_config
from common.evaluation import evaluate
from common.tasks import get_task
from common.training import batch_indices, client_data, dev_encoded
from methods.fedkseed import kseed
from methods.fedspzo import spzo


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def probe(method: str, cfg, steps: int, every: int) -> dict:
    """Dev accuracy at step 0 and after every `every` steps of one client on partition 0 of 1."""
    task = get_task(cfg.task)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 1})
    dev = dev_encoded(cfg)
    batches = batch_indices(len(encoded["labels"]), cfg.train.batch_size, steps, 0)
    m = spzo.build(cfg) if method == "fedspzo" else kseed.build(cfg)
    net, lr = m.zo.loaded.model, cfg.zo.lr
    acc0 = evaluate(net, dev, task, cfg.eval.batch_size)["accuracy"]
    curve, calls, start = [(0, round(acc0, 4), None)], 0, time.perf_counter()
    for s0 in range(0, steps, every):
        chunk = batches[s0 : s0 + every]
        if method == "fedspzo":
            r = spzo.local_update(m, cfg, spzo.round_seed(0, s0 + 1), lr, encoded, chunk)
        else:
            r = kseed.local_update(m, cfg, lr, encoded, chunk, pick_seed=s0)
        calls += r.forward_passes
        acc = evaluate(net, dev, task, cfg.eval.batch_size)["accuracy"]
        finite = [x for x in r.losses if x == x]
        curve.append((s0 + len(chunk), round(acc, 4), round(sum(finite) / len(finite), 4) if finite else None))
        print(json.dumps({"params": cfg.zo.params, "lr": lr, "step": curve[-1][0], "acc": curve[-1][1],
                          "loss": curve[-1][2]}), flush=True)  # fmt: skip
    seconds = time.perf_counter() - start  # training and evaluations after step 0
    return {
        "params": cfg.zo.params, "lr": lr, "perturbed": sum(p.numel() for p in m.params.values()),
        "start": curve[0][1], "final": curve[-1][1], "best": max(a for _, a, _ in curve),
        "gain_points": round(100 * (curve[-1][1] - curve[0][1]), 2), "curve": curve, "model_calls": calls,
        "seconds": round(seconds, 1),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["fedspzo", "fedkseed"], default="fedspzo")
    ap.add_argument(
        "--params",
        nargs="+",
        default=[None],
        help="zo.params values to compare (default: shipped), each optionally with its own learning rates: "
        "all:3e-6,1e-5 (a perturbed set of another size needs another zo.lr)",
    )
    ap.add_argument("--lr", type=float, nargs="+", default=[None], help="zo.lr values (default: shipped)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--dev", type=int, default=400, help="dev examples evaluated (0: the whole dev split)")
    ap.add_argument("--set", nargs="*", default=[], help="extra run-config key=value pairs")
    ap.add_argument("--glue", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    ap.add_argument(
        "--out",
        help="write every result here as JSON (e.g. bench/records/zo-probe/NAME.json; not probes/, where the "
        "report reads the harness's own probes)",
    )
    args = ap.parse_args()
    threads = int(os.environ.get("PROBE_THREADS", "2"))
    torch.set_num_threads(threads)
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    results = []
    for spec in args.params:
        params, _, own = (spec or "").partition(":")
        for lr in [float(x) for x in own.split(",")] if own else args.lr:
            params = params or None
            chosen = {k: v for k, v in (("zo.params", params), ("zo.lr", lr)) if v is not None}
            cfg = parse_run_config(
                {"method": args.method, "task": args.task, "data-dir": os.path.abspath(args.glue),
                 "eval.max-examples": args.dev, **extra, **chosen}
            )  # fmt: skip
            results.append(probe(args.method, cfg, args.steps, args.every))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    command = "python -m bench.zo_probe " + " ".join(sys.argv[1:])
    out = {"command": command, "method": args.method, "threads": threads, "results": results}
    print(json.dumps(out), flush=True)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
