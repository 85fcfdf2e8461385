"""Wire bytes beside the messages: while a run goes, each time the ServerApp appends a round to rounds.jsonl,
`WireLog` samples the byte counters of every pod (what it sent and received on the fleet's network) and appends
to `<records>/wire.jsonl` the bytes of that round next to the message-level counts, and the round's overhead =
round time - slowest client's training time. `measure_idle` is the SuperNodes' polling while no run goes,
`wire_summary` one method's means over its rounds, `report_table` the Markdown table of them.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol


class Metered(Protocol):
    """What the wire counts need of a fleet (both fleets of driver.py)."""

    insecure: bool

    def counters(self) -> dict[str, dict[str, int]]:
        """Pod -> {"sent": bytes, "received": bytes} since the pod's interface came up."""
        ...

    def node_pods(self) -> list[str]: ...


class WireLog:
    """Per-round wire bytes of every namespace, beside the records' message-level counts: <records>/wire.jsonl."""

    def __init__(self, fleet: Metered, records: str, resumed_round: int = -1) -> None:
        self.fleet, self.records = fleet, records
        self.resumed_round = resumed_round  # rows up to it come from the checkpoint a resumed run started from
        self.seen = 0
        self.start = fleet.counters()
        self.last = self.start
        self.t_last = time.monotonic()
        self.rows: list[dict] = []
        self.snapped: set[int] = set()

    def poll(self) -> list[dict]:
        path = os.path.join(self.records, "rounds.jsonl")
        if not os.path.exists(path):
            return []
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
        new = rows[self.seen :]
        if not new:
            return []
        now, t = self.fleet.counters(), time.monotonic()
        self.seen = len(rows)
        new = [row for row in new if row["round"] > self.resumed_round]  # not run here: no wire row
        for row in new:
            self.write(row, now, t)
        self.last, self.t_last = now, t
        return new

    def write(self, row: dict, now: dict, t: float) -> None:
        nodes = {}
        for pod, c in now.items():
            prev = self.last.get(pod, {"sent": c["sent"], "received": c["received"]})
            nodes[pod] = {"sent": c["sent"] - prev["sent"], "received": c["received"] - prev["received"]}
        node_pods = self.fleet.node_pods()
        slowest = row.get("client_train_seconds_max")
        out = {
            "round": row["round"],
            "wire_bytes_down": sum(nodes[p]["received"] for p in node_pods if p in nodes),
            "wire_bytes_up": sum(nodes[p]["sent"] for p in node_pods if p in nodes),
            "message_bytes_down": row.get("bytes_down"),
            "message_bytes_up": row.get("bytes_up"),
            "round_seconds": row.get("seconds"),
            "slowest_client_train_seconds": slowest,
            "overhead_seconds": None if slowest is None else row["seconds"] - slowest,
            "sampled_seconds": t - self.t_last,
            "tls": not self.fleet.insecure,
            "namespaces": nodes,
        }
        self.rows.append(out)
        with open(os.path.join(self.records, "wire.jsonl"), "a") as f:
            f.write(json.dumps(out) + "\n")

    def snapshot_checkpoint(self) -> None:
        """Keep each round's server checkpoint as checkpoint-round-<T>.safetensors (it is replaced every round)."""
        path = os.path.join(self.records, "checkpoint.safetensors")
        if not os.path.exists(path):
            return
        from server_app import checkpoint

        try:
            saved = checkpoint.read(path)
        except Exception:  # mid-rename: next poll
            return
        if saved.round not in self.snapped:
            with contextlib.suppress(OSError):
                shutil.copyfile(path, os.path.join(self.records, f"checkpoint-round-{saved.round}.safetensors"))
                self.snapped.add(saved.round)


def wire_summary(method: str, wire: Sequence[Mapping[str, Any]], startup_seconds: float, idle: Mapping[str, float]):
    """One method's line of the wire report: per trained round, means over rounds."""
    trained = [w for w in wire if w["round"] > 0]

    def mean(key):
        values = [w[key] for w in trained if w.get(key) is not None]
        return sum(values) / len(values) if values else None

    msg = (mean("message_bytes_down") or 0) + (mean("message_bytes_up") or 0)
    on_wire = (mean("wire_bytes_down") or 0) + (mean("wire_bytes_up") or 0)
    return {
        "method": method,
        "message_bytes_per_round": msg,
        "wire_bytes_per_round": on_wire,
        "wire_over_message": on_wire / msg if msg else None,
        "polling_bytes_per_round": idle["node_bytes_per_second"] * (mean("round_seconds") or 0),
        "round_seconds": mean("round_seconds"),
        "slowest_train_seconds": mean("slowest_client_train_seconds"),
        "overhead_seconds": mean("overhead_seconds"),
        "startup_seconds": startup_seconds,
    }


def measure_idle(fleet: Metered, seconds: float) -> dict[str, float]:
    """Bytes the SuperNodes exchange with the SuperLink while no run is going (polling and heartbeats)."""
    before, t0 = fleet.counters(), time.monotonic()
    time.sleep(seconds)
    after, dt = fleet.counters(), time.monotonic() - t0
    total = sum(after[p]["sent"] + after[p]["received"] - before[p]["sent"] - before[p]["received"]
                for p in fleet.node_pods())  # fmt: skip
    return {"node_bytes_per_second": total / dt, "per_node_bytes_per_second": total / dt / len(fleet.node_pods())}


def report_table(rows: Sequence[Mapping[str, Any]]) -> str:
    def f(v, fmt="{:.0f}"):
        return "-" if v is None else fmt.format(v)

    out = [
        "| method | messages (B/round) | on the wire (B/round) | wire / messages | of which idle polling (B) | "
        "round (s) | slowest client training (s) | overhead (s) | flwr run -> round 0 recorded (s) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        out.append(
            f"| {r['method']} | {f(r['message_bytes_per_round'])} | {f(r['wire_bytes_per_round'])} | "
            f"{f(r['wire_over_message'], '{:.2f}')} | {f(r['polling_bytes_per_round'])} | "
            f"{f(r['round_seconds'], '{:.1f}')} | {f(r['slowest_train_seconds'], '{:.1f}')} | "
            f"{f(r['overhead_seconds'], '{:.1f}')} | {f(r['startup_seconds'], '{:.1f}')} |"
        )
    return "\n".join(out)
