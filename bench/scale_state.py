"""bench/scale.py's measurements 1 and 2 (its docstring says what and how): the server state written per round
over a ServerApp `run`, and the instruction a node k rounds behind receives, with its replay time."""

from __future__ import annotations

import time

from bench.scale_setup import fresh_nodes, run_config
from common.methods import get_method

FRESH_NODE, SYNC_NODE = 10_000, 1_000_000  # node ids of the catch-up probes (+ k); node 1 trains every round


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
