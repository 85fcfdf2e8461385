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
4. One simulation through `flwr run` (scripts/simulate.py) with `--nodes` simulated SuperNodes, fraction-train
   so that ~10 train a round: the records' seconds per round, the slowest client's training time, and the
   peak of the summed RSS of every process of the run (SuperLink, ServerApp, Ray workers), sampled.

    python -m bench.scale [--rounds 500] [--max-replies 1000] [--robust-max-replies 100] [--nodes 200]
                          [--methods ...] [--quick]
    python -m bench.scale --report          # docs/scale.md and docs/scale-*.png from the records, runs nothing

Records: bench/records/scale.json (keys in `write_records`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
from bench.scale_page import write_page  # noqa: E402
from common.methods import get_method, known  # noqa: E402

METHODS = known("fedkrso", "fedspzo", "fedkseed", "fedtt-plus", "fedavg")
RECORDS = os.path.join(ROOT, "bench", "records", "scale.json")
DOCS = os.path.join(ROOT, "docs")
FIXTURE_GLUE = os.path.join(ROOT, "tests", "fixtures", "glue")
FRESH_NODE, SYNC_NODE = 10_000, 1_000_000  # node ids of the catch-up probes (+ k); node 1 trains every round


def log_points(top: int, start: int = 1) -> list[int]:
    """start, then 1-2-5 steps up to top, and top itself."""
    points, base = [], 1
    while base <= top:
        points += [p * base for p in (1, 2, 5) if start <= p * base <= top]
        base *= 10
    return sorted(set(points + [top]))


def tiny_model(folder: str) -> str:
    from harness.tiny import save_tiny  # the tests' tiny BERT, saved as a pretrained checkpoint would be

    path = os.path.join(folder, "tiny-bert")
    if not os.path.isfile(os.path.join(path, "config.json")):
        save_tiny(path, "bert")
    return path


def fresh_nodes(work: str) -> None:
    """Every run in this process is Flower run 1: each gets a folder of node states of its own, so that no
    node finds the state another run left (common.nodestore)."""
    from common.nodestore import STATE_DIR_ENV

    os.environ[STATE_DIR_ENV] = tempfile.mkdtemp(prefix="nodes-", dir=work)


def run_config(method: str, model: str, work: str, name: str, rounds: int, **extra) -> dict:
    """Run-config keys for a short, cheap round: training time does not change what the server writes."""
    return {
        "method": method, "task": "sst2", "model": model, "data-dir": FIXTURE_GLUE, "results-dir": work,
        "run-name": name, "num-server-rounds": rounds, "min-clients": 1, "fraction-train": 1.0,
        "train.local-steps": 1, "krso.intervals": 1, "train.batch-size": 4, "train.max-length": 16,
        "eval.max-examples": 8, "eval.every": rounds + 1, **extra,
    }  # fmt: skip


def server_round_of(msg) -> int:
    return int(msg.content["config"]["server-round"])


class ProbeGrid:
    """The Grid of a `run` of `rounds` rounds plus two probe rounds, served in this process.

    Rounds 1..rounds: node 1 trains (the real client); at round k+1 a fresh node joins too (replay probe of
    k). Round rounds+1: node 1, and sync probes that answer "I hold round rounds+1-k". Round rounds+2: only the
    sync probes, whose instructions are the catch-up of k rounds."""

    def __init__(self, cfg, rounds: int, behind: list[int]) -> None:
        from harness.fakes import client_reply

        self.cfg, self.rounds, self.behind = cfg, rounds, behind
        self.client = get_method(cfg.method).load_client()
        self.reply = client_reply
        self.next_round = 1
        self.replay: dict[int, float] = {}  # k -> seconds
        self.catchup: dict[int, int] = {}  # k -> bytes
        self.download = 0  # bytes of node 1's instruction in round 1

    def get_node_ids(self) -> list[int]:
        t = self.next_round
        sync = [SYNC_NODE + k for k in self.behind]
        if t == self.rounds + 2:
            return sync
        fresh = [FRESH_NODE + k for k in self.behind if k + 1 == t]
        return [1, *fresh] + (sync if t == self.rounds + 1 else [])

    def _real(self, msg):
        start = time.perf_counter()
        reply = self.reply(self.client.train, self.cfg, msg, {msg.metadata.dst_node_id: 0})
        wall = time.perf_counter() - start
        train = float(reply.content["metrics"].get("train-seconds", 0.0)) if reply.has_content() else 0.0
        return reply, wall - train

    def send_and_receive(self, messages, *, timeout=None):
        from flwr.app import Message

        from common.nodestore import sync_reply
        from common.wire import content_bytes

        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        if not messages:
            return []
        t = server_round_of(messages[0])
        self.next_round = t + 1
        replies, overhead = [], {}
        for msg in messages:
            node = msg.metadata.dst_node_id
            if node >= SYNC_NODE:
                k = node - SYNC_NODE
                if t == self.rounds + 2:
                    self.catchup[k] = content_bytes(msg.content)
                replies.append(Message(sync_reply(self.rounds + 1 - k), reply_to=msg))
                continue
            reply, overhead[node] = self._real(msg)
            replies.append(reply)
            if node == 1 and t == 1:
                self.download = content_bytes(msg.content)
        for node, seconds in overhead.items():
            if node != 1:
                self.replay[node - FRESH_NODE] = max(0.0, seconds - overhead[1])
        return replies


def state_and_catchup(method: str, rounds: int, behind: list[int], model: str, work: str) -> dict:
    """Measurements 1 and 2 for one method: one ServerApp `run` of rounds + 2 rounds."""
    from common.config import parse_run_config
    from server_app import checkpoint
    from server_app.app import run

    fresh_nodes(work)
    cfg = parse_run_config(run_config(method, model, work, f"{method}-state", rounds + 2))
    written, seconds = [], []
    pending = {"bytes": 0, "seconds": 0.0}
    real = {"replace": checkpoint.replace_file, "write": checkpoint.write, "segment": checkpoint.write_segment}

    def replace_file(target, data):
        pending["bytes"] += len(data)
        real["replace"](target, data)

    def timed(name):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return real[name](*args, **kwargs)
            finally:
                pending["seconds"] += time.perf_counter() - start
                if name == "write":  # the checkpoint closes the round's writes
                    written.append(pending["bytes"])
                    seconds.append(pending["seconds"])
                    pending.update(bytes=0, seconds=0.0)

        return call

    grid = ProbeGrid(cfg, rounds, behind)
    checkpoint.replace_file, checkpoint.write, checkpoint.write_segment = (
        replace_file, timed("write"), timed("segment"),
    )  # fmt: skip
    start = time.perf_counter()
    try:
        run(grid, cfg, 1)
    finally:
        checkpoint.replace_file, checkpoint.write, checkpoint.write_segment = (
            real["replace"], real["write"], real["segment"],
        )  # fmt: skip
    print(f"{method}: {rounds} + 2 rounds in {time.perf_counter() - start:.1f} s", flush=True)
    ks = [k for k in behind if k in grid.catchup]
    return {
        "state_write_bytes": written[:rounds],
        "state_write_seconds": seconds[:rounds],
        "catchup_bytes": {"rounds_behind": ks, "bytes": [grid.catchup[k] for k in ks]},
        "catchup_seconds": {"rounds_behind": ks, "seconds": [grid.replay.get(k) for k in ks]},
        "download_bytes": grid.download,
    }


class NodeList:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


def one_aggregation(method: str, n: int, model: str, work: str, traced: bool, rule: str) -> dict:
    """A fresh strategy's rounds 1 and 2 under `rule` with n replies each (copies of node 1's real reply to that
    round, made before the round's aggregate_train, in a list as Flower hands them over). Round 1's replies
    come from nodes the server has not seen (the log methods add each to their map of the rounds nodes hold);
    round 2's from the same nodes again, the round of a fleet running. Returns per round the seconds and
    tracemalloc's peak MB of what aggregate_train allocated (0 untraced), and the MB of the reply Messages."""
    from flwr.app import ConfigRecord, Message

    from common.config import parse_run_config
    from common.records import RunRecorder
    from common.wire import content_bytes
    from harness.fakes import client_reply
    from server_app.app import build_setup

    fresh_nodes(work)
    name = f"{method}-{rule}-agg-{n}-{'traced' if traced else 'timed'}"
    cfg = parse_run_config(run_config(method, model, work, name, 2, **{"aggregation.rule": rule}))
    setup = build_setup(cfg, RunRecorder(work, name, cfg.to_flat()))
    train = get_method(method).load_client().train
    out = {"seconds": [], "mb": []}
    for server_round in (1, 2):
        messages = list(setup.strategy.configure_train(server_round, None, ConfigRecord(), NodeList(n)))
        template = client_reply(train, cfg, messages[0], {1: 0}).content
        replies = [Message(copy.deepcopy(template), reply_to=msg) for msg in messages]  # Flower's list
        out["messages_mb"] = n * content_bytes(template) / 2**20
        gc.collect()  # the same start for every point: no garbage, the interpreter's free lists emptied
        if traced:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            _, metrics = setup.strategy.aggregate_train(server_round, replies)
            out["seconds"].append(time.perf_counter() - start)
            out["mb"].append(tracemalloc.get_traced_memory()[1] / 2**20 if traced else 0.0)
        finally:
            if traced:
                tracemalloc.stop()
        if metrics is None or metrics["clients"] != n:
            raise RuntimeError(f"{method}: round {server_round} of {n} replies did not aggregate them all")
        del replies, messages
    return out


def reply_arrays(model: str, work: str) -> tuple[dict, dict]:
    """FedAvg's reply as the strategy decodes it (name -> float32 array) and the global arrays it replaces."""
    from flwr.app import ConfigRecord

    from common.config import parse_run_config
    from common.records import RunRecorder
    from harness.fakes import client_reply
    from server_app.app import build_setup

    fresh_nodes(work)
    cfg = parse_run_config(run_config("fedavg", model, work, "fedavg-mean", 1))
    setup = build_setup(cfg, RunRecorder(work, "fedavg-mean", cfg.to_flat()))
    msg = list(setup.strategy.configure_train(1, None, ConfigRecord(), NodeList(1)))[0]
    reply = client_reply(get_method("fedavg").load_client().train, cfg, msg, {1: 0}).content
    return {k: a.numpy() for k, a in reply["arrays"].items()}, {k: a.numpy() for k, a in msg.content["arrays"].items()}


def mean_alone(counts: list[int], model: str, work: str, limit_mb: float) -> dict:
    """common.robust's mean of n FedAvg replies (norm-cap 2 as shipped): streaming, each reply made when it is
    read (a lazy sequence, read twice), against the in-memory path given a list of them."""
    import numpy as np

    from common import robust

    template, reference = reply_arrays(model, work)
    size_mb = sum(a.nbytes for a in template.values()) / 2**20

    class Lazy:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            for i in range(self.n):
                yield {k: (v + np.float32(1e-3 * (i % 7))) for k, v in template.items()}

    out = {"streaming": {"replies": [], "mb": [], "seconds": []}, "in_memory": {"replies": [], "mb": []}}
    for n in counts:
        weights = [1.0 + i % 5 for i in range(n)]
        for kind in ("streaming", "in_memory"):
            if kind == "in_memory" and n * size_mb > limit_mb / 4:
                continue
            replies = Lazy(n) if kind == "streaming" else list(Lazy(n))
            tracemalloc.start()
            start = time.perf_counter()
            if kind == "streaming":
                robust.aggregate_round(replies, weights, norm_cap=2.0, reference=reference)
            else:
                robust._aggregate_all(replies, weights, "mean", 0, 2.0, 0.0, reference)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            del replies
            out[kind]["replies"].append(n)
            out[kind]["mb"].append(peak + (n * size_mb if kind == "in_memory" else 0.0))
            if kind == "streaming":
                out[kind]["seconds"].append(seconds)
        print(f"mean of {n} FedAvg replies: streaming {out['streaming']['mb'][-1]:.1f} MB", flush=True)
    out["reply_mb"] = size_mb
    return out


def server_scaling(
    method: str, counts: list[int], model: str, work: str, limit_mb: float, reply_mb: float, rule: str = "mean"
) -> dict:
    """Measurement 3 for one method under `rule`; points whose Messages (and, under a robust rule, decoded
    replies) would exceed limit_mb are left out (and said)."""
    out = {"rule": rule, "replies": [], "mb": [], "first_round_mb": [], "messages_mb": [], "seconds": [],
           "first_round_seconds": [], "left_out": []}  # fmt: skip
    for n in counts:
        if (1.5 if rule == "mean" else 2.5) * n * reply_mb > limit_mb:  # the Messages (+ the replies held)
            out["left_out"].append(n)
            continue
        timed = one_aggregation(method, n, model, work, traced=False, rule=rule)
        traced = one_aggregation(method, n, model, work, traced=True, rule=rule)
        out["replies"].append(n)
        out["mb"].append(traced["mb"][1])  # round 2: the nodes known
        out["first_round_mb"].append(traced["mb"][0])
        out["messages_mb"].append(traced["messages_mb"])
        out["seconds"].append(timed["seconds"][1])
        out["first_round_seconds"].append(timed["seconds"][0])
        print(
            f"{method} ({rule}): {n} replies, peak {traced['mb'][1]:.3f} MB (round 1: {traced['mb'][0]:.3f}), "
            f"{timed['seconds'][1]:.2f} s",
            flush=True,
        )
    return out


def simulation(nodes: int, rounds: int, model: str, work: str, per_round: int = 10) -> dict:
    """Measurement 4: one `flwr run` simulation (scripts/simulate.py) of FedKRSO on the tiny model."""
    import psutil

    from scripts import simulate

    fraction = per_round / nodes
    overrides = run_config("fedkrso", model, work, f"simulation-{nodes}", rounds, **{"fraction-train": fraction})
    overrides["min-clients"] = min(per_round, nodes)
    home: dict[str, str] = {}
    real_env = simulate.flwr_env

    def flwr_env(flwr_home, state_dir):  # the Flower home names this run's processes
        home["path"] = flwr_home
        return real_env(flwr_home, state_dir)

    peak = {"mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            if "path" not in home:
                continue
            total = 0
            for proc in psutil.process_iter(["pid"]):
                try:
                    if proc.environ().get("FLWR_HOME") == home["path"]:
                        total += proc.memory_info().rss
                except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
            peak["mb"] = max(peak["mb"], total / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    simulate.flwr_env = flwr_env
    sampler.start()
    start = time.perf_counter()
    try:
        result = simulate.simulate(overrides, nodes, quiet=True, timeout=900)
    finally:
        simulate.flwr_env = real_env
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    rows = simulate.read_rounds(result["records"]) if os.path.exists(result["records"]) else []
    trained = [r for r in rows if r["round"] > 0]
    print(f"simulation of {nodes} nodes: {result['status']} in {wall:.0f} s", flush=True)
    return {
        "nodes": nodes,
        "rounds": rounds,
        "method": "fedkrso",
        "fraction_train": fraction,
        "status": result["status"],
        "wall_seconds": wall,
        "clients_per_round": [r["clients"] for r in trained],
        "round_seconds": [r["seconds"] for r in trained],
        "slowest_client_train_seconds": [r.get("client_train_seconds_max") for r in trained],
        "runner_peak_rss_mb": peak["mb"],
    }


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
        kept = ("rule", "replies", "mb", "first_round_mb", "messages_mb", "left_out")
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
    p.add_argument("--memory-limit-mb", type=float, default=5000, help="leave out points whose replies need more")
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
