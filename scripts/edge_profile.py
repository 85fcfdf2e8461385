"""Edge profile: each method on a SuperNode shaped like a 4 GB Raspberry Pi, through the fleet of docker-compose.yml.

The fleet (scripts/fleet/namespaces.py: SuperLink, ServerApp executor, SuperNode + ClientApp executor in network
namespaces, TLS and node authentication on) runs with its first SuperNode only; that pod (the SuperNode, its
SuperExec and every ClientApp process they start) is pinned to one core with `taskset` and runs in a memory
cgroup limited to --memory-mb (cgroup v1 memory.limit_in_bytes + memsw, or v2 memory.max). Per method it
reports the cgroup's peak (v1 memory.max_usage_in_bytes / v2 memory.peak: every process of the pod together,
page cache included), the round time and the client's training time, and whether the run completed under the
limit, and the bytes on the wire per round against the messages (the fleet's wire.jsonl, scripts/fleet/wire.py). Embedded all-MiniLM-L6-v2 on SST-2 with the shipped training defaults unless -c says otherwise.

    flock ~/.cpu.lock .venv/bin/python -m scripts.edge_profile --glue-dir /path/to/glue [--methods fedkrso,fedavg]

Slow (minutes per method on one core): not part of the test suite. Writes a Markdown table to stdout and
JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import methods  # noqa: E402, F401 - registers every method (methods/__init__.py)
from common.methods import METHODS  # noqa: E402
from scripts.fleet.edge import Edge  # noqa: E402
from scripts.fleet.namespaces import NamespaceFleet  # noqa: E402
from scripts.fleet.wire import measure_idle, report_table, wire_summary  # noqa: E402


def profile(method: str, glue: str, memory_mb: int, rounds: int, extra: dict, workdir: str) -> dict:
    results = os.path.join(workdir, "results")
    cfg = {
        "method": method, "task": "sst2", "data-dir": glue, "results-dir": results, "run-name": method,
        "num-server-rounds": rounds, "min-clients": 1, "eval.max-examples": 64, **extra,
    }  # fmt: skip
    edge = Edge(pod="supernode-1", cpus="0", memory_mb=memory_mb)
    t0 = time.monotonic()
    with NamespaceFleet(os.path.join(workdir, f"fleet-{method}"), glue_dir=glue, nodes=1, edge=edge) as fleet:
        fleet.up()
        time.sleep(3)
        cpus = fleet.pod_affinity(edge.pod)
        idle = measure_idle(fleet, 5)
        t_submit = time.monotonic()
        run_id = fleet.submit(cfg)
        first: dict[int, float] = {}
        status = fleet.watch(run_id, os.path.join(results, method), timeout=3600,
                             on_round=lambda row: first.setdefault(row["round"], time.monotonic() - t_submit))  # fmt: skip
        peak = fleet.edge_peak_mb()
        oom = _oom_kills(edge.cgroup)
    rows = []
    path = os.path.join(results, method, "rounds.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.strip()]
    trained = [r for r in rows if r["round"] > 0 and r["clients"]]
    wire = []
    if os.path.exists(os.path.join(results, method, "wire.jsonl")):
        with open(os.path.join(results, method, "wire.jsonl")) as f:
            wire = [json.loads(line) for line in f if line.strip()]
    return {
        "method": method,
        "status": status,
        "fits": status == "finished:completed" and len(trained) == rounds and not oom,
        "cgroup_peak_mb": peak,
        "oom_kills": oom,
        "cpus_allowed": cpus,
        "client_peak_rss_mb": max((r["client_peak_rss_mb"] or 0 for r in trained), default=None),
        "round_seconds": sum(r["seconds"] for r in trained) / len(trained) if trained else None,
        "client_train_seconds": sum(r["client_train_seconds"] for r in trained) / len(trained) if trained else None,
        "bytes_down": trained[-1]["bytes_down"] if trained else None,
        "bytes_up": trained[-1]["bytes_up"] if trained else None,
        "wall_seconds": time.monotonic() - t0,
        "wire": wire_summary(method, wire, first.get(0, float("nan")), idle),
    }


def _oom_kills(cgroup: str) -> int:
    for knob, key in (("memory.oom_control", "oom_kill"), ("memory.events", "oom_kill")):
        p = os.path.join(cgroup, knob)
        if os.path.exists(p):
            with open(p) as f:
                for line in f:
                    k, _, v = line.partition(" ")
                    if k == key:
                        return int(v)
    return 0


def table(rows: list[dict], memory_mb: int) -> str:
    out = [
        f"| method | fits in {memory_mb} MB, 1 core | cgroup peak (MB) | ClientApp peak RSS (MB) | round (s) | "
        "client training (s) | bytes down / up per round |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:

        def f(v, fmt="{:.0f}"):
            return "-" if v is None else fmt.format(v)

        out.append(
            f"| {r['method']} | {'yes' if r['fits'] else 'NO (' + r['status'] + ')'} | {f(r['cgroup_peak_mb'])} | "
            f"{f(r['client_peak_rss_mb'])} | {f(r['round_seconds'], '{:.1f}')} | "
            f"{f(r['client_train_seconds'], '{:.1f}')} | {f(r['bytes_down'])} / {f(r['bytes_up'])} |"
        )
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", ""))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--memory-mb", type=int, default=4096, help="memory limit of the edge pod (4 GB Raspberry Pi)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("-c", "--run-config", default="", help='extra run-config, e.g. "train.local-steps=10"')
    ap.add_argument("--out", default=os.path.join(ROOT, "results", "edge-profile.json"))
    args = ap.parse_args(argv)
    if not os.path.isdir(args.glue_dir):
        print("error: --glue-dir (or GLUE_DIR) must be a GLUE-layout folder", file=sys.stderr)
        return 2
    from flwr.common.config import parse_config_args

    extra = parse_config_args([args.run_config]) if args.run_config else {}
    workdir = tempfile.mkdtemp(prefix="fedsubspace-edge-")
    rows = []
    for method in args.methods.split(","):
        rows.append(profile(method, os.path.abspath(args.glue_dir), args.memory_mb, args.rounds, extra, workdir))
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(rows, f, indent=2)
    print(table(rows, args.memory_mb))
    print("\nOn the wire (TLS and node authentication on; the edge SuperNode alone):")
    print(report_table([r["wire"] for r in rows]))
    return 0 if all(r["fits"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
