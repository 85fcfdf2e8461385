"""Hand instruction messages from files to the ClientApp's train handler; write its replies to files.

    python -m scripts.client_jobs JOBS.json [--draws MODEL_DIR]

The aarch64 half of tests/test_arm64.py: the host builds the servers' instructions (x86_64), this script runs
the real ClientApp (client_app.app.train, as a SuperNode's ClientApp executor would) under aarch64 emulation,
and the host checks the replies with its strategies. JOBS.json is a list of
    {"name", "run_config": {...}, "node_config": {...}, "run_id", "node_id", "message": PATH, "reply": PATH}
Messages travel as Flower's own protobuf (flwr.common.serde.message_to_proto), never as pickles. A summary
(machine, torch, seconds per job and, with --draws, the hashes of scripts/rng_draws.py for that model folder) is
written to JOBS.json's folder as summary.json. One process does both: under emulation, starting Python and
importing torch and transformers takes most of a minute.
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


def main(jobs_path: str, draws_model: str | None = None) -> None:
    with open(jobs_path) as f:
        jobs = json.load(f)
    summary = {"machine": platform.machine(), "torch": torch.__version__, "python": platform.python_version()}
    summary["cpu-capability"] = torch.backends.cpu.get_cpu_capability()
    if draws_model is not None:
        from scripts.rng_draws import draws

        summary["draws"] = draws(draws_model)
    summary["seconds"] = {}
    for job in jobs:
        summary["seconds"][job["name"]] = round(run_job(job), 3)
        print(f"{job['name']}: {summary['seconds'][job['name']]} s", file=sys.stderr, flush=True)
    with open(os.path.join(os.path.dirname(os.path.abspath(jobs_path)), "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("jobs", help="JOBS.json")
    ap.add_argument("--draws", metavar="MODEL_DIR", help="also hash the seeded draws (scripts/rng_draws.py)")
    args = ap.parse_args()
    main(args.jobs, args.draws)
