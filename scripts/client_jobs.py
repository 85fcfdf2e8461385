"""Hand instruction messages from files to the ClientApp's train handler; write its replies to files.

    python -m scripts.client_jobs JOBS.json [--draws MODEL_DIR] [--summary PATH]
    python -m scripts.client_jobs - --summary PATH ...     (the jobs arrive on stdin)

The aarch64 half of tests/test_arm64.py: the host builds the servers' instructions (x86_64), this script runs
the real ClientApp (client_app.app.train, as a SuperNode's ClientApp executor would) under aarch64 emulation,
and the host checks the replies with its strategies. JOBS.json is a list of
    {"name", "run_config": {...}, "node_config": {...}, "run_id", "node_id", "message": PATH, "reply": PATH}
Messages travel as Flower's own protobuf (flwr.common.serde.message_to_proto), never as pickles. A summary
(machine, torch, seconds per job and, with --draws, the hashes of scripts/rng_draws.py for that model folder) is
written to PATH (default: summary.json beside JOBS.json). One process does both: under emulation, starting
Python and importing torch and transformers takes most of a minute, so the script imports the ClientApp and
hashes the draws first and only then reads the jobs: with "-", the caller builds them meanwhile.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.proto.message_pb2 import Message as ProtoMessage


def save_message(msg: Message, path: str) -> None:
    with open(path, "wb") as f:
        f.write(message_to_proto(msg).SerializeToString())


def load_message(path: str) -> Message:
    with open(path, "rb") as f:
        return message_from_proto(ProtoMessage.FromString(f.read()))


def run_job(job: dict) -> float:
    """One call of the ClientApp's train handler; returns its wall time in seconds."""
    from client_app.app import train

    msg = load_message(job["message"])
    context = Context(
        int(job["run_id"]), int(job["node_id"]), dict(job["node_config"]), RecordDict(), job["run_config"]
    )
    start = time.perf_counter()
    reply = train(msg, context)
    seconds = time.perf_counter() - start
    save_message(reply, job["reply"])
    return seconds


def main(jobs_path: str, draws_model: str | None = None, summary_path: str | None = None) -> None:
    from client_app.app import train  # noqa: F401  (imported before the jobs are read: see the docstring)

    summary = {"machine": platform.machine(), "torch": torch.__version__, "python": platform.python_version()}
    summary["cpu-capability"] = torch.backends.cpu.get_cpu_capability()
    if draws_model is not None:
        from scripts.rng_draws import draws

        summary["draws"] = draws(draws_model)
    if jobs_path == "-":
        jobs = json.load(sys.stdin)
    else:
        with open(jobs_path) as f:
            jobs = json.load(f)
    summary["seconds"] = {}
    for job in jobs:
        summary["seconds"][job["name"]] = round(run_job(job), 3)
        print(f"{job['name']}: {summary['seconds'][job['name']]} s", file=sys.stderr, flush=True)
    with open(summary_path or os.path.join(os.path.dirname(os.path.abspath(jobs_path)), "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", help="JOBS.json, or - to read the jobs from stdin")
    ap.add_argument("--draws", metavar="MODEL_DIR", help="also hash the seeded draws (scripts/rng_draws.py)")
    ap.add_argument("--summary", metavar="PATH", help="where to write the summary (required with -)")
    args = ap.parse_args()
    if args.jobs == "-" and not args.summary:
        ap.error("with jobs from stdin (-), give --summary PATH")
    main(args.jobs, args.draws, args.summary)
