"""Learning-rate probe for the zero-order methods: one client, S steps on SST-2, dev accuracy every N steps.

    .venv/bin/python bench/zo_probe.py --method fedspzo --lr 1e-4 3e-4 --steps 200

Prints one JSON line per evaluation and one per lr. The shipped zero-order defaults and why: README, "Why
they learn"; their effect at the benchmark's settings: docs/results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from common.config import parse_run_config
from common.evaluation import evaluate
from common.fedkseed import kseed
from common.fedspzo import spzo
from common.tasks import get_task
from common.training import batch_indices, client_data, dev_encoded


def _value(text: str) -> int | float | str:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=["fedspzo", "fedkseed"], default="fedspzo")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--task", default="sst2")
    ap.add_argument("--set", nargs="*", default=[], help="extra run-config key=value pairs")
    ap.add_argument("--glue", default=os.environ.get("GLUE_DIR", "../shared/data/glue"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("PROBE_THREADS", "2")))
    extra = {k: _value(v) for k, v in (kv.split("=", 1) for kv in args.set)}
    for lr in args.lr:
        cfg = parse_run_config(
            {"method": args.method, "task": args.task, "data-dir": os.path.abspath(args.glue), "zo.lr": lr,
             "eval.max-examples": 400, **extra}
        )  # fmt: skip
        task = get_task(cfg.task)
        encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 1})
        dev = dev_encoded(cfg)
        batches = batch_indices(len(encoded["labels"]), cfg.train.batch_size, args.steps, 0)
        m = spzo.build(cfg) if args.method == "fedspzo" else kseed.build(cfg)
        net = m.zo.loaded.model
        curve, start = [], time.perf_counter()
        for s0 in range(0, args.steps, args.every):
            chunk = batches[s0 : s0 + args.every]
            if args.method == "fedspzo":
                r = spzo.local_update(m, cfg, spzo.round_seed(0, s0 + 1), lr, encoded, chunk)
            else:
                r = kseed.local_update(m, cfg, lr, encoded, chunk, pick_seed=s0)
            acc = evaluate(net, dev, task, 64)["accuracy"]
            curve.append((s0 + len(chunk), round(acc, 4), round(sum(r.losses) / len(r.losses), 4)))
            print(json.dumps({"lr": lr, "step": curve[-1][0], "acc": curve[-1][1], "loss": curve[-1][2]}), flush=True)
        print(json.dumps({"lr": lr, "curve": curve, "seconds": round(time.perf_counter() - start, 1)}), flush=True)


if __name__ == "__main__":
    main()
