"""`FleetDriver`: what both fleets share once they are up, all of it through the flwr CLI from a private
FLWR_HOME: submit a run (`flwr run . fleet`, its run config checked here first), its status (`flwr ls`; flwr run
exits 0 on failed runs), watch it to the end (wire counters and a checkpoint per round), stop it (`flwr stop`),
wait for the SuperLink and the SuperNodes.

A fleet says where it is: `superlink_address()` and `ca_certificate()` (the CLI's config.toml), `checkout` (the
folder `flwr run .` sends the app from), `counters()` and `node_pods()` (the wire bytes, wire.py),
`superlink_log()`, and `check_superlink()` where a SuperLink that exited is gone for good. `local_path` maps a
path of the run config to the one this process reads (the fleet's records on a Docker volume).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.fleet import BIN, ROOT, FleetError
from scripts.fleet.checks import check_run_config
from scripts.fleet.flwr_cli import flwr_env, run_config_arg, superlink_answers, supernode_statuses, write_cli_config
from scripts.fleet.wire import WireLog

TERMINAL = ("finished:",)


class FleetDriver:
    """A fleet of docker-compose.yml as the flwr CLI sees it; subclasses bring it up and down."""

    checkout = ROOT  # the folder `flwr run .` sends the app from
    superlink_poll_seconds = 0.5

    def __init__(self, workdir: str) -> None:
        self.workdir = os.path.abspath(workdir)
        self.home = os.path.join(self.workdir, "cli-home")  # the CLI's FLWR_HOME
        self.insecure = False
        self.node_ids: dict[str, int] = {}  # SuperNode service name -> the node id the SuperLink gave its key
        self.resumed: dict[int, int] = {}  # run id -> the round its resume-from checkpoint had completed

    # -- what each fleet says about itself ---------------------------------------------------------------
    def superlink_address(self) -> str:
        raise NotImplementedError

    def ca_certificate(self) -> str | None:
        """The CA the CLI trusts for the SuperLink's certificate (None: an insecure fleet)."""
        raise NotImplementedError

    def counters(self) -> dict[str, dict[str, int]]:
        raise NotImplementedError

    def node_pods(self) -> list[str]:
        raise NotImplementedError

    def superlink_log(self) -> str:
        raise NotImplementedError

    def check_superlink(self) -> None:
        """Raise FleetError when the SuperLink is gone for good (where nothing restarts it)."""

    def local_path(self, path: str) -> str:
        """A path of the run config as this process reads it (the namespace fleet runs on the host's paths)."""
        return path

    # -- the flwr CLI ------------------------------------------------------------------------------------
    def cli_env(self) -> dict[str, str]:
        return flwr_env(self.home)

    def write_cli_config(self) -> None:
        write_cli_config(self.home, self.superlink_address(), self.ca_certificate())

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "flwr"), *args], env=self.cli_env(), cwd=self.checkout,
                              capture_output=True, text=True, timeout=timeout)  # fmt: skip

    def wait_superlink(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if superlink_answers(self.flwr("ls", "fleet", "--format", "json")):
                return
            self.check_superlink()
            time.sleep(self.superlink_poll_seconds)
        raise FleetError(f"the SuperLink did not answer within {timeout:.0f} s: {self.superlink_log()}")

    def node_statuses(self) -> dict[str, str]:
        """The SuperLink's status (online, offline, registered...) of every registered SuperNode, by name."""
        nodes = supernode_statuses(self.flwr("supernode", "list", "fleet", "--format", "json"))
        return {name: nodes.get(i, "absent") for name, i in self.node_ids.items()}

    def node_status(self, name: str) -> str:
        return self.node_statuses()[name]

    def wait_online(self, names: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            statuses = self.node_statuses()
            if all(statuses[n] == "online" for n in names):
                return
            time.sleep(2)
        raise FleetError(f"SuperNodes not online within {timeout:.0f} s: {self.node_statuses()}")

    # -- runs --------------------------------------------------------------------------------------------
    def submit(self, run_config: Mapping[str, Any]) -> int:
        """`flwr run . fleet` with the given run config, checked here first (check_run_config); returns the run id."""
        check_run_config(run_config)
        res = self.flwr("run", ".", "fleet", "--run-config", run_config_arg(run_config), "--format", "json")
        try:
            run_id = int(json.loads(res.stdout)["run-id"])
        except (json.JSONDecodeError, KeyError, ValueError) as exc:
            raise FleetError(
                f"flwr run failed (rc {res.returncode}): {res.stdout[-1500:]} {res.stderr[-1500:]}"
            ) from exc
        if run_config.get("resume-from"):
            from server_app import checkpoint

            self.resumed[run_id] = checkpoint.read(self.local_path(str(run_config["resume-from"]))).round
        return run_id

    def status(self, run_id: int) -> str:
        res = self.flwr("ls", "fleet", "--run-id", str(run_id), "--format", "json")
        try:
            return json.loads(res.stdout)["runs"][0]["status"]
        except (json.JSONDecodeError, KeyError, IndexError):
            return f"unknown ({res.stdout.strip()[-300:]} {res.stderr.strip()[-300:]})"

    def watch(self, run_id: int, records: str, timeout: float, on_round=None) -> str:
        """Poll until the run is terminal: sample wire counters at each round, snapshot each round's checkpoint.

        `on_round(round_row)` is called once per new row of rounds.jsonl (fault injection). Returns the final
        status from `flwr ls`.
        """
        deadline = time.monotonic() + timeout
        wire = WireLog(self, records, self.resumed.get(run_id, -1))
        status, last_ls = "unknown", 0.0
        while time.monotonic() < deadline:
            for row in wire.poll():
                if on_round is not None:
                    on_round(row)
            wire.snapshot_checkpoint()
            if time.monotonic() - last_ls > 2:
                status, last_ls = self.status(run_id), time.monotonic()
                if status.startswith(TERMINAL):
                    for row in wire.poll():
                        if on_round is not None:
                            on_round(row)
                    return status
            time.sleep(0.2)
        return f"timeout after {timeout:.0f} s (last status {status})"

    def stop_run(self, run_id: int) -> bool:
        """`flwr stop`: the SuperLink records the run as stopped before the fleet goes down under it."""
        try:
            return self.flwr("stop", str(run_id), "fleet", timeout=30).returncode == 0
        except subprocess.TimeoutExpired:
            return False
