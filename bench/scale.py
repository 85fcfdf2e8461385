"""Benchmark: how the server's costs grow with the run and with the number of clients.

Four measurements, each at the strategy level with the methods' real wire formats, server strategies and client
code (named by common/methods.py), on the tiny test model (tests/conftest.py: a 2-layer BERT, hidden size 32,
the real tokenizer; 1.0 M numbers, 3.9 MB a FedAvg download, nearly all of it the token embeddings) and the
synthetic task data of tests/fixtures/glue:

1. State writes. `--rounds` rounds of the ServerApp's own `run` (server_app/app.py: Strategy.start, the
   checkpoint after every round) with one node training each round; per round, the bytes the server state
   took to write (server_app/checkpoint.py: the checkpoint plus the round's update-log segment, counted at
   common.files.replace_file) and the seconds `checkpoint.write` and `checkpoint.write_segment` took
   (serialisation, SHA-256, fsync).
2. Catch-up. After those rounds, nodes that report (with the sync-only reply of common.nodestore) that they
   hold round t-1-k are sent round t's instruction: its bytes (common.wire.content_bytes) are what a node k
   rounds behind receives, whatever the strategy puts in it (the whole log since its round today; a snapshot
   once there is one). Replay seconds: a fresh node that joins at round k+1 replays k rounds; its client
   time less its training time, less the same for the up-to-date node of that round. The reference line is
   one FedAvg download of the same model.
3. Server memory and aggregation time against the number of replies, under the weighted mean
   (`aggregation.rule = "mean"` for every method, norm-cap as shipped). A fresh strategy sends n nodes round 1's
   instructions, one node's real reply is copied into n reply Messages, and `aggregate_train` gets the list of
   them, as Flower's Grid hands it over (Strategy.start: `send_and_receive` returns a list, which Flower holds
   through the round whatever the strategy does; its bytes are recorded beside, `messages_mb`); then the same
   for round 2 with the same n nodes. Round 2 is the figure (`mb`): a round of a running fleet, whose nodes the
   server knows; round 1 (`first_round_mb`) adds what a first round allocates once, mainly each new node's
   entry in the log methods' map of the rounds nodes hold. Peak memory: after gc.collect() (no garbage, the
   interpreter's free lists emptied: the same start for every point),
   tracemalloc, started after the instructions and the Messages are made and reset per point, in this process:
   it counts every numpy array and Python object the aggregation allocates and nothing from before, which an
   RSS high-water mark cannot separate (it includes ~0.5 GB of imports and never goes down); torch's own
   allocations are invisible to it (only the FedKRSO update applied to the model, whose size does not depend
   on n). Seconds: a second fresh strategy, untraced. The same for FedAvg under trimmed-mean, the robust rule
   of its shipped default, which holds every reply by nature (up to `--robust-max-replies`), and for
   common.robust's mean alone on FedAvg's replies: streaming (lazy replies) and in memory (a list of them).
   Reads: a third fresh strategy, neither timed nor traced, counts per round how often `aggregate_train`
   reads each reply (harness/readcount.py): its metrics validated (common.wire.checked_metrics, wherever it is
   bound), its update decoded (the strategy's `read_update`), and the aggregation's passes over the replies
   (server_app.round.Replies); the aim is each reply's metrics validated once and its update decoded once when
   checked and once per pass. Points whose reply Messages (x 1.5; x 2.5 under a robust rule, which holds the
   decoded replies) would exceed `--memory-limit-mb` are left out, and the page says so.
4. One simulation through `flwr run` (scripts/simulate.py) with `--nodes` simulated SuperNodes, fraction-train
   so that ~10 train a round: the records' seconds per round, the slowest client's training time, and the
   peak of the summed RSS of every process of the run (SuperLink, ServerApp, Ray workers), sampled.

    python -m bench.scale [--rounds 500] [--max-replies 1000] [--robust-max-replies 100] [--nodes 200]
                          [--memory-limit-mb 8000] [--methods ...] [--quick]
    python -m bench.scale --report          # docs/scale.md and docs/scale-*.png from the records, runs nothing

Records: bench/records/scale.json (keys in `measure`). The measurements: bench/scale_state.py (1, 2),
bench/scale_server.py (3), bench/scale_sim.py (4), what they share bench/scale_setup.py; the page
bench/scale_page.py.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from bench.scale_page import write_page
from bench.scale_server import mean_alone, server_scaling
from bench.scale_setup import DOCS, RECORDS, log_points, tiny_model
from bench.scale_sim import simulation
from bench.scale_state import state_and_catchup
from common.methods import known

METHODS = known("fedkrso", "fedspzo", "fedkseed", "fedtt-plus", "fedavg")


def measure(args, save) -> dict:
    """Every measurement; `save(records)` after each phase, so that a stopped run keeps what it measured."""
    logging.getLogger("flwr").setLevel(logging.WARNING)
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a runtime
    work = tempfile.mkdtemp(prefix="bench-scale-")
    model = tiny_model(work)
    behind = log_points(args.rounds)
    counts = [n for n in log_points(args.max_replies, start=10 if args.max_replies >= 10 else 1)]
    records: dict = {
        "state_write_bytes": {}, "state_write_seconds": {}, "catchup_bytes": {}, "catchup_seconds": {},
        "server_peak_mb": {}, "aggregate_seconds": {}, "server_peak_mb_robust": {}, "fedavg_download_bytes": None,
        "simulation": None,
        "setting": {
            "command": "python -m bench.scale " + " ".join(sys.argv[1:]),
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "model": "tests/conftest.py tiny BERT (2 layers, hidden 32), tests/fixtures/glue SST-2",
            "rounds": args.rounds, "max_replies": args.max_replies, "robust_max_replies": args.robust_max_replies,
            "memory_limit_mb": args.memory_limit_mb,
            "minutes": None,  # set when every measurement is done
        },
    }  # fmt: skip
    start = time.perf_counter()
    for method in args.methods:
        r = state_and_catchup(method, args.rounds, behind, model, work)
        for key in ("state_write_bytes", "state_write_seconds", "catchup_bytes", "catchup_seconds"):
            records[key][method] = r[key]
        if method == "fedavg":
            records["fedavg_download_bytes"] = r["download_bytes"]
        save(records)
    if records["fedavg_download_bytes"] is None:
        records["fedavg_download_bytes"] = state_and_catchup("fedavg", 1, [1], model, work)["download_bytes"]
    mean = mean_alone(counts, model, work, args.memory_limit_mb)
    records["mean_peak_mb"] = mean
    save(records)
    for method in args.methods:
        reply_mb = mean["reply_mb"] if method == "fedavg" else 0.0
        r = server_scaling(method, counts, model, work, args.memory_limit_mb, reply_mb)
        kept = ("rule", "replies", "mb", "first_round_mb", "messages_mb", "reads", "first_round_reads", "left_out")
        records["server_peak_mb"][method] = {k: r[k] for k in kept}
        records["aggregate_seconds"][method] = {k: r[k] for k in ("replies", "seconds", "first_round_seconds")}
        save(records)
    if "fedavg" in args.methods:  # its shipped rule, which holds every reply by nature
        robust_counts = [n for n in counts if n <= args.robust_max_replies]
        r = server_scaling("fedavg", robust_counts, model, work, args.memory_limit_mb, mean["reply_mb"], "trimmed-mean")
        records["server_peak_mb_robust"]["fedavg"] = r
        save(records)
    if args.nodes:
        try:
            records["simulation"] = simulation(args.nodes, args.sim_rounds, model, work)
        except Exception as exc:  # noqa: BLE001 - the other figures are kept; the page says what failed
            records["simulation"] = {"nodes": args.nodes, "status": f"error: {exc!r}"[:500]}
    records["setting"]["minutes"] = (time.perf_counter() - start) / 60
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=500)
    p.add_argument("--max-replies", type=int, default=1000)
    p.add_argument("--robust-max-replies", type=int, default=100, help="FedAvg at trimmed-mean, up to this many")
    p.add_argument("--nodes", type=int, default=200, help="simulated SuperNodes of the flwr run (0: none)")
    p.add_argument("--sim-rounds", type=int, default=3)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--memory-limit-mb", type=float, default=8000, help="leave out points whose replies need more")
    p.add_argument("--quick", action="store_true", help="a few rounds and replies, no simulation (tests)")
    p.add_argument("--report", action="store_true", help="only write the page and plots from the records")
    p.add_argument("--out", default=RECORDS)
    p.add_argument("--page", default=os.path.join(DOCS, "scale.md"))
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.max_replies, args.nodes = min(args.rounds, 6), min(args.max_replies, 20), 0
        args.robust_max_replies = min(args.robust_max_replies, 10)
    args.methods = known(*args.methods.split(","))
    if not args.report:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)

        def save(records: dict) -> None:
            with open(args.out, "w") as f:
                json.dump(records, f, indent=1)

        save(measure(args, save))
        print(f"records in {args.out}")
        if args.quick:
            return 0
    with open(args.out) as f:
        records = json.load(f)
    write_page(records, args.page)
    print(f"page in {args.page}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
