"""What the server checkpoint costs per method with the real model (all-MiniLM-L6-v2 by default).

Runs each method for a few rounds in this process (the ServerApp's own `run`, every client message served
by the method's real client code, as tests/test_checkpoint.py does), then reports the checkpoint's size after
those rounds, the bytes the server state took to write in round 1 and in the last round (the checkpoint plus,
for the log methods, that round's update-log segment), the size of the update log, the time to write the
checkpoint (fsync included) and the time a resumed run takes to read, check and rebuild the global model:

    python -m scripts.checkpoint_cost --rounds 3 [--methods fedkrso,fedavg] [--model PATH]

Local training is kept short (2 steps, 64 dev examples): the checkpoint does not depend on how long clients
train, only on what the method keeps.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
from common.methods import METHODS  # noqa: E402


def measure(method: str, rounds: int, model: str, data_dir: str, work: str) -> dict:
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import parse_run_config
    from common.records import RunRecorder
    from harness.fakes import InProcessGrid
    from server_app import checkpoint
    from server_app.app import build_setup, resume, run

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a runtime
    cfg = parse_run_config(
        {
            "method": method, "task": "rte", "model": model, "data-dir": data_dir, "results-dir": work,
            "run-name": method, "num-server-rounds": rounds, "train.local-steps": 2, "krso.intervals": 2,
            "train.batch-size": 8, "train.max-length": 64, "eval.max-examples": 64,
        }
    )  # fmt: skip
    path = os.path.join(work, method, checkpoint.FILENAME)
    per_round, current = [], 0
    real = checkpoint.replace_file

    def counted(target: str, data: bytes) -> None:  # every write of the server state, grouped by round
        nonlocal current
        current += len(data)
        if os.path.basename(target) == checkpoint.FILENAME:
            per_round.append(current)
            current = 0
        real(target, data)

    checkpoint.replace_file = counted
    try:
        run(InProcessGrid(cfg, 1, {1: 0, 2: 1}), cfg, 1)
    finally:
        checkpoint.replace_file = real
    state = checkpoint.read(path)
    log = checkpoint.log_dir(path)
    log_bytes = sum(os.path.getsize(os.path.join(log, n)) for n in os.listdir(log)) if os.path.isdir(log) else 0
    start = time.perf_counter()
    checkpoint.write(os.path.join(work, f"{method}-copy.safetensors"), state)
    write_s = time.perf_counter() - start
    setup = build_setup(cfg, RunRecorder(work, f"{method}-resume", cfg.to_flat()))
    start = time.perf_counter()
    resume(setup, checkpoint.read(path), run_id=2)
    resume_s = time.perf_counter() - start
    return {
        "bytes": os.path.getsize(path),
        "per_round": per_round,
        "log_bytes": log_bytes,
        "write_s": write_s,
        "resume_s": resume_s,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--model", default="", help='"" = the embedded all-MiniLM-L6-v2')
    ap.add_argument(
        "--data-dir", default=os.environ.get("GLUE_DIR", os.path.join(ROOT, "..", "shared", "data", "glue"))
    )
    args = ap.parse_args(argv)
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # the rounds' own log lines
    os.environ.setdefault("FEDSUBSPACE_STATE_DIR", tempfile.mkdtemp(prefix="fedsubspace-nodes-"))
    rows = []
    with tempfile.TemporaryDirectory(prefix="checkpoint-cost-") as work:
        for method in args.methods.split(","):
            rows.append((method, measure(method, args.rounds, args.model, os.path.abspath(args.data_dir), work)))
    n = args.rounds
    print(
        f"| method | checkpoint after {n} rounds | written in round 1 | written in round {n} | update log | "
        "write (fsync) | read + rebuild |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for method, m in rows:
        print(
            f"| {method} | {m['bytes'] / 1024:,.1f} KB | {m['per_round'][0] / 1024:,.1f} KB | "
            f"{m['per_round'][-1] / 1024:,.1f} KB | {m['log_bytes'] / 1024:,.1f} KB | {m['write_s']:.3f} s | "
            f"{m['resume_s']:.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
