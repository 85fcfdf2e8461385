"""Run the fleet of docker-compose.yml on this machine: one network namespace per service, Flower's own binaries.

    python -m scripts.fleet --methods fedkrso,fedavg -c "task='rte' num-server-rounds=2 data-dir='/abs/glue'"
    python -m scripts.fleet --insecure ...      # + deploy/compose.insecure.yml: no TLS, no node auth

(or `fedsubspace fleet ...`). With --methods it runs one method after the other in the same fleet (idle polling
measured first) and prints per method the bytes on the wire against the messages, the round overhead and the
start-up time. The fleet itself: scripts/fleet/namespaces.py. Needs root (`ip netns`), openssl and ssh-keygen.
Exit status 0 when every run finished:completed, 2 when the run config or the data folder is refused before
anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from common.interrupt import Interrupted, exit_on_signals
from scripts.fleet import ROOT
from scripts.fleet.checks import refused
from scripts.fleet.namespaces import NamespaceFleet
from scripts.fleet.wire import measure_idle, report_table, wire_summary


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-c", "--run-config", default="", help="run-config overrides (as for flwr run -c)")
    ap.add_argument("--methods", default="", help="comma-separated: one run per method in the same fleet")
    ap.add_argument("--nodes", type=int, default=None, help="use only the first N SuperNodes of the file")
    ap.add_argument("--insecure", action="store_true", help="add deploy/compose.insecure.yml (no TLS, no node auth)")
    ap.add_argument("--idle-seconds", type=float, default=10, help="measure idle polling this long before the runs")
    ap.add_argument("--workdir", default="", help="keep certificates, logs and volumes here (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    from flwr.common.config import parse_config_args

    rc = parse_config_args([args.run_config]) if args.run_config else {}
    glue = rc.get("data-dir") or os.environ.get("GLUE_DIR", "")
    glue = os.path.abspath(glue) if glue else ""
    rc["data-dir"] = glue
    rc["results-dir"] = os.path.abspath(rc.get("results-dir", "results"))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    methods = args.methods.split(",") if args.methods else [rc.get("method", "fedkrso")]
    if refused(glue, [{**rc, "method": method} for method in methods]):  # before any process starts
        return 2
    exit_on_signals()  # SIGINT and SIGTERM unwind through the fleet's __exit__: every process, namespace and link goes
    workdir = args.workdir or tempfile.mkdtemp(prefix="fedsubspace-fleet-")
    overrides = [os.path.join(ROOT, "deploy", "compose.insecure.yml")] if args.insecure else []
    rows, ok = [], True
    idle = {"node_bytes_per_second": 0.0}
    under_way: dict[str, Any] = {}  # the run an interruption stops and reports
    try:
        with NamespaceFleet(workdir, overrides=overrides, glue_dir=glue, nodes=args.nodes) as fleet:
            fleet.up()
            time.sleep(3)  # let every SuperNode register and settle into its poll loop
            if args.idle_seconds > 0:
                idle = measure_idle(fleet, args.idle_seconds)
            for method in methods:
                cfg = {**rc, "method": method, "run-name": f"{rc.get('run-name') or 'fleet'}-{method}-{stamp}"}
                t0 = time.monotonic()
                run_id = fleet.submit(cfg)
                records = os.path.join(cfg["results-dir"], cfg["run-name"])
                first: dict[int, float] = {}

                def on_round(row, first=first, t0=t0):
                    first.setdefault(row["round"], time.monotonic() - t0)

                under_way = {"run": run_id, "records": records, "flwr stop": False}
                try:
                    status = fleet.watch(run_id, records, args.timeout, on_round)
                except Interrupted:
                    under_way["flwr stop"] = fleet.stop_run(run_id)
                    raise
                under_way = {}
                ok &= status == "finished:completed"
                print(f"{method}: run {run_id} {status}; records in {records}", flush=True)
                if os.path.exists(os.path.join(records, "wire.jsonl")):
                    with open(os.path.join(records, "wire.jsonl")) as f:
                        wire = [json.loads(line) for line in f if line.strip()]
                    rows.append(wire_summary(method, wire, first.get(0, float("nan")), idle))
    except Interrupted as exc:
        what = (
            f"run {under_way['run']}{' (flwr stop)' if under_way['flwr stop'] else ''}; its records in "
            f"{under_way['records']}"
            if under_way
            else "no run was under way"
        )
        print(f"{exc.name}: stopped the fleet (its processes, namespaces and bridge are gone) and {what}; "
              f"the services' logs in {os.path.join(workdir, 'logs')}", file=sys.stderr)  # fmt: skip
        raise
    print(f"TLS and node authentication: {'off' if args.insecure else 'on'}; idle polling of all SuperNodes: "
          f"{idle['node_bytes_per_second']:.0f} B/s")  # fmt: skip
    print(report_table(rows))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
