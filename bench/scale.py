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

    python bench/scale.py [--rounds 500] [--max-replies 1000] [--robust-max-replies 100] [--nodes 200]
                          [--methods ...] [--quick]
    python bench/scale.py --report          # docs/scale.md and docs/scale-*.png from the records, runs nothing

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
sys.path.insert(0, ROOT)

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
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
    from tests.conftest import _save_tiny  # the tests' tiny BERT, saved as a pretrained checkpoint would be

    path = os.path.join(folder, "tiny-bert")
    if not os.path.isfile(os.path.join(path, "config.json")):
        _save_tiny(path, "bert")
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
        from tests.fakes import client_reply

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
    from server_app.app import build_setup
    from tests.fakes import client_reply

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
    from server_app.app import build_setup
    from tests.fakes import client_reply

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
            "command": "python bench/scale.py " + " ".join(sys.argv[1:]),
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


# ---- the page ------------------------------------------------------------------------------------------------

AIMS = {"state": 2.0, "catchup": 1.2, "memory": 2.0, "nodes": 200}


def mb(x: float) -> str:
    """MB to print: two decimals below 10 MB (the log methods' rounds are fractions of a MB)."""
    return f"{x:.2f}" if x < 10 else f"{x:.1f}"


def per_reply_kb(p: dict) -> float:
    """What the peak grows by per reply between the first and the last point, in KB."""
    return (p["mb"][-1] - p["mb"][0]) * 1024 / max(1, p["replies"][-1] - p["replies"][0])


def verdicts(rec: dict) -> list[tuple[str, str, str, str]]:
    """(criterion, measured, aim, verdict) for each aim of the growth benchmark."""
    rows = []
    growth = {m: max(b) / b[0] for m, b in rec["state_write_bytes"].items() if b}
    over = [m for m, g in growth.items() if g > AIMS["state"]]
    rounds = rec["setting"]["rounds"]
    rows.append((
        f"state write per round over {rounds} rounds, within 2x of round 1 (every method)",
        ", ".join(f"{m} {g:.2f}x" for m, g in growth.items()),
        f"<= {AIMS['state']}x",
        "met" if growth and not over else f"not met ({', '.join(over)})",
    ))  # fmt: skip
    ref = rec["fedavg_download_bytes"] or float("nan")
    far = {m: (c["rounds_behind"][-1], c["bytes"][-1] / ref) for m, c in rec["catchup_bytes"].items() if c["bytes"]}
    bad = [m for m, (_, x) in far.items() if x > AIMS["catchup"]]
    rows.append((
        f"a node {max((k for k, _ in far.values()), default=0)} rounds behind receives <= 1.2 FedAvg downloads",
        ", ".join(f"{m} {x:.2f}x" for m, (_, x) in far.items()),
        f"<= {AIMS['catchup']}x of {ref / 2**20:.2f} MB",
        "met" if not bad else f"not met ({', '.join(bad)})",
    ))  # fmt: skip
    mean = rec.get("mean_peak_mb", {}).get("streaming", {})
    if mean.get("mb"):
        g = max(mean["mb"]) / mean["mb"][0]
        rows.append((
            f"server memory of the weighted mean, {mean['replies'][0]} to {mean['replies'][-1]} replies "
            "(common.robust alone)",
            f"{mean['mb'][0]:.1f} -> {max(mean['mb']):.1f} MB ({g:.2f}x)",
            f"<= {AIMS['memory']}x",
            "met" if g <= AIMS["memory"] else "not met",
        ))  # fmt: skip
    for m, p in rec["server_peak_mb"].items():
        if len(p["mb"]) > 1:
            g = max(p["mb"]) / p["mb"][0]
            rows.append((
                f"server memory of {m}'s aggregate_train under the {p.get('rule', 'shipped rule')}, "
                f"{p['replies'][0]} to {p['replies'][-1]} replies"
                + (" (round 2: nodes the server knows)" if p.get("first_round_mb") else ""),
                f"{mb(p['mb'][0])} -> {mb(max(p['mb']))} MB ({g:.1f}x; {per_reply_kb(p):+.2f} KB a reply"
                + (f", of {p['messages_mb'][0] * 1024 / p['replies'][0]:,.1f} KB on the wire)" if p.get("messages_mb") else ")"),
                f"<= {AIMS['memory']}x",
                "met" if g <= AIMS["memory"] else "not met",
            ))  # fmt: skip
    sim = rec.get("simulation")
    rows.append((
        "a simulation of at least 200 nodes completes through `flwr run`",
        f"{sim['nodes']} nodes: {sim['status']}" if sim else "not run",
        f">= {AIMS['nodes']} nodes, finished:completed",
        "met" if sim and sim["nodes"] >= AIMS["nodes"] and sim["status"] == "finished:completed" else "not met",
    ))  # fmt: skip
    return rows


def plots(rec: dict, folder: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(folder, name), dpi=110)
        plt.close(fig)
        names.append(name)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, b in rec["state_write_bytes"].items():
        ax.plot(range(1, len(b) + 1), [x / 1024 for x in b], label=m)
    ax.set(xlabel="round", ylabel="server state written (KB)", yscale="log", title="State written per round")
    ax.legend()
    save(fig, "scale-state.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, c in rec["catchup_bytes"].items():
        ax.plot(c["rounds_behind"], [x / 2**20 for x in c["bytes"]], marker="o", label=m)
    ref = (rec["fedavg_download_bytes"] or float("nan")) / 2**20
    ax.axhline(ref, color="k", ls="--", lw=1, label="one FedAvg download")
    ax.axhline(AIMS["catchup"] * ref, color="r", ls=":", lw=1, label="aim: 1.2 FedAvg downloads")
    ax.set(xlabel="rounds behind", ylabel="instruction (MB)", xscale="log", yscale="log", title="Catch-up")
    ax.legend(fontsize=8)
    save(fig, "scale-catchup.png")

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for m, p in rec["server_peak_mb"].items():
        ax.plot(p["replies"], p["mb"], marker="o", label=f"{m} aggregate_train ({p.get('rule', 'shipped rule')})")
    for m, p in rec.get("server_peak_mb_robust", {}).items():
        ax.plot(p["replies"], p["mb"], marker="^", ls=":", label=f"{m} aggregate_train ({p['rule']})")
    for kind, p in rec.get("mean_peak_mb", {}).items():
        if isinstance(p, dict) and p.get("mb"):
            ax.plot(p["replies"], p["mb"], marker="s", ls="--", label=f"mean alone, {kind.replace('_', ' ')}")
    ax.set(xlabel="replies", ylabel="peak MB (tracemalloc)", xscale="log", yscale="log", title="Server memory")
    ax.legend(fontsize=7)
    for m, s in rec["aggregate_seconds"].items():
        bx.plot(s["replies"], s["seconds"], marker="o", label=m)
    bx.set(xlabel="replies", ylabel="aggregate_train (s)", xscale="log", yscale="log", title="Aggregation time")
    bx.legend(fontsize=8)
    save(fig, "scale-server.png")
    return names


def write_page(rec: dict, out: str) -> str:
    s = rec["setting"]
    minutes = "unfinished run" if s["minutes"] is None else f"{s['minutes']:.1f} min"
    rows = verdicts(rec)
    names = plots(rec, os.path.dirname(os.path.abspath(out)))
    kb = lambda b: f"{b / 1024:,.1f} KB"  # noqa: E731
    lines = [
        "# Costs that grow with the run: state, catch-up, server memory, number of nodes",
        "",
        f"Produced by `{s['command'].strip()}` on {s['date']} ({s['machine']}, {minutes}), records in "
        "`bench/records/scale.json`; this page and its plots by `python bench/scale.py --report`, which runs "
        f"nothing. Model: {s['model']}. What is measured and how: the docstring of `bench/scale.py`.",
        "",
        "## Aims",
        "",
        "| criterion | measured | aim | verdict |",
        "| --- | --- | --- | --- |",
        *[f"| {c} | {m} | {a} | {v} |" for c, m, a, v in rows],
        "",
        "## State written per round",
        "",
        "| method | round 1 | round 10 | last round | largest / round 1 | write seconds (median) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for m, b in rec["state_write_bytes"].items():
        secs = sorted(rec["state_write_seconds"][m])
        lines.append(
            f"| {m} | {kb(b[0])} | {kb(b[min(9, len(b) - 1)])} | {kb(b[-1])} | {max(b) / b[0]:.2f}x | "
            f"{secs[len(secs) // 2]:.4f} |"
        )
    ref = rec["fedavg_download_bytes"] or float("nan")
    lines += [
        "",
        "## Catch-up of a node k rounds behind",
        "",
        f"One FedAvg download of the same model: {ref / 2**20:.2f} MB. A node k rounds behind holds round t-1-k "
        "when it is sent round t's instruction and lacks the updates of rounds t-k..t-1 (k = 1: it trained in "
        "round t-1, the usual case). Replay seconds: a fresh node that joins at round k+1 and replays k rounds, "
        "its time less its training, less the same for the up-to-date node of that round.",
        "",
        "| method | k | instruction | / FedAvg download | replay seconds |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for m, c in rec["catchup_bytes"].items():
        secs = dict(zip(*rec["catchup_seconds"][m].values(), strict=True))
        for k, b in zip(c["rounds_behind"], c["bytes"], strict=True):
            if k in (1, 10, 100) or k == c["rounds_behind"][-1]:
                r = secs.get(k)
                lines.append(f"| {m} | {k} | {kb(b)} | {b / ref:.3f} | {'-' if r is None else f'{r:.2f}'} |")
    lines += [
        "",
        "## Server memory and aggregation time against the number of replies",
        "",
        "Peak MB: what `aggregate_train` allocates (tracemalloc, after gc.collect()) in round 2, whose n replies "
        "come from the nodes of round 1; round 1: the same for nodes the server has not seen, which the log "
        "methods add to their map of the rounds nodes hold (the fleet's state, once per node). Reply Messages: "
        "the list of replies Flower hands the strategy and holds through the round, n x one reply's wire size, "
        "whatever the strategy does. Seconds: round 2, untraced.",
        "",
        "| method | rule | replies | peak MB | round 1 peak MB | reply Messages MB | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    series = [(m, p, rec["aggregate_seconds"][m]["seconds"]) for m, p in rec["server_peak_mb"].items()]
    series += [(m, p, p["seconds"]) for m, p in rec.get("server_peak_mb_robust", {}).items()]
    for m, p, secs in series:
        rule = p.get("rule", "shipped")
        held = p.get("messages_mb") or [None] * len(p["mb"])
        first = p.get("first_round_mb") or [None] * len(p["mb"])
        for n, peak, one, msgs, sec in zip(p["replies"], p["mb"], first, held, secs, strict=True):
            lines.append(
                f"| {m} | {rule} | {n} | {mb(peak)} | {'-' if one is None else mb(one)} | "
                f"{'-' if msgs is None else mb(msgs)} | {sec:.2f} |"
            )
        if p.get("left_out"):
            left = ", ".join(map(str, p["left_out"]))
            lines.append(f"| {m} | {rule} | {left} | left out: over the memory limit | | | |")
    nodes = {
        m: (p["first_round_mb"][-1] - p["mb"][-1]) * 2**20 / p["replies"][-1]
        for m, p in rec["server_peak_mb"].items()
        if p.get("first_round_mb") and p["replies"]
    }
    if nodes:
        lines += [
            "",
            "Round 1 less round 2 at the most replies, per reply (a new node's entry in the fleet's state, and what "
            "else a first round allocates): " + ", ".join(f"{m} {b:+.0f} bytes" for m, b in nodes.items()) + ".",
        ]
    mean = rec.get("mean_peak_mb", {})
    if mean:
        lines += [
            "",
            f"common.robust's mean alone on FedAvg replies ({mean['reply_mb']:.2f} MB each), norm-cap 2: "
            "streaming " + ", ".join(
                f"{n}: {mb:.1f} MB" for n, mb in zip(mean["streaming"]["replies"], mean["streaming"]["mb"], strict=True)
            ) + "; in memory (the replies held plus what the aggregation allocates) " + ", ".join(
                f"{n}: {mb:.1f} MB" for n, mb in zip(mean["in_memory"]["replies"], mean["in_memory"]["mb"], strict=True)
            ) + ".",
        ]  # fmt: skip
    sim = rec.get("simulation")
    lines += ["", "## Simulation through `flwr run`", ""]
    if sim and "wall_seconds" not in sim:
        lines.append(f"{sim['nodes']} nodes: {sim['status']}")
    elif sim:
        lines += [
            f"{sim['method']}, {sim['nodes']} simulated SuperNodes, fraction-train {sim['fraction_train']:.3f} "
            f"({sim['clients_per_round']} replies a round), {sim['rounds']} rounds: {sim['status']} in "
            f"{sim['wall_seconds']:.0f} s in all; seconds per round {[round(x, 1) for x in sim['round_seconds']]}, "
            f"of which the slowest client trained {[None if x is None else round(x, 2) for x in sim['slowest_client_train_seconds']]}; "
            f"peak summed RSS of the run's processes {sim['runner_peak_rss_mb']:.0f} MB.",
        ]  # fmt: skip
    else:
        lines.append("Not run (`--nodes 0`).")
    lines += ["", *[f"![{n}]({n})" for n in names], "", NOTES, ""]
    page = "\n".join(lines)
    with open(out, "w") as f:
        f.write(page)
    return page


NOTES = """## Reading the figures

- The tiny model is 1.0 M numbers, 0.97 M of them the token embeddings that only FedAvg sends; the per-round
  log entries of the log methods are therefore tiny against one FedAvg download here. With all-MiniLM-L6-v2
  a FedKRSO entry is 2.6 MB at the defaults against an 86 MB FedAvg download; a node far behind gets the
  snapshot of the tensors it keeps instead of the log once the log is larger (common/catchup.py,
  docs/checkpoints.md "Catch-up"): 42.5 MB for FedKRSO on MiniLM, however far behind.
- Server memory under the weighted mean: the mean streams (common.robust.WeightedMean: one reply at a time,
  8 bytes per aggregated number), and the strategies read their replies lazily (server_app/base.py
  `Replies`): a first pass checks every reply, then the aggregation decodes each reply's arrays again from its
  Message when it reads them. A round holds one decoded reply at a time, not n: FedAvg's round, whose replies
  are 3.86 MB, is flat. Each reply is checked once (its size, its metrics, its arrays decoded and bounded) and
  the round keeps what the check found (server_app/base.py `Accepted`: position, node, example count, loss,
  32 bytes a reply in plain arrays), the weights and update norms as plain lists (8-byte floats, medians by
  np.partition); only the arrays are decoded again, once per aggregation pass (tests/test_fedavg_replies.py
  counts it: metrics validated once, arrays decoded once per pass). These few numbers are what a round
  holds per reply beyond Flower's own list of reply Messages (tests/test_lazy_replies.py: under 256 bytes a
  reply, against KBs to MBs of arrays). What is left from 10 to 100
  replies is the interpreter's free lists refilling after gc.collect() (dicts, small tuples, numpy's small
  buffers: bounded, a few KB), which on the tiny model is a visible share of the zero-order methods' whole
  round (FedSPZO: 14 KB at 10 replies); from 100 replies on the peaks are flat.
- The log methods' map of which round each node holds (LogStrategy.node_round) grows by one entry per node the
  server has seen (35-37 bytes here, with the dict's growth), once, not per round: it is the fleet's state,
  which catch-up needs, and round 1's column shows it.
- Flower holds the list of reply Messages through the round whatever the strategy does (`reply Messages MB`
  above: n x one reply's wire size); that is the runtime's, not the aggregation's.
- The robust rules (trimmed-mean, median) need all n values of each coordinate: n x the update, plus one
  key's n values stacked while it is sorted (FedAvg under trimmed-mean above, which grows by more than one
  decoded reply per reply).
- State writes: the update-log segments are one round's entry each, and since checkpoint version 3 the
  checkpoint keeps each records file's row count and digest instead of its rows, so every method's write per
  round is flat (before, the copy of the records grew ~0.6 KB a round, ~1.1 KB for FedTT+).
- The 200-node simulation's first round includes starting Ray and the first ClientApp processes; the later
  rounds are the round's overhead: ~0.5 s for 10 replies of which the slowest client trained 0.03 s."""


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
