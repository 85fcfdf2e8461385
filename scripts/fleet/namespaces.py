"""`NamespaceFleet`: the fleet of docker-compose.yml on this machine, one network namespace per pod, Flower's own
binaries.

No Docker engine is needed. The harness reads docker-compose.yml itself (compose.py) and derives every process
from it:
- the binary from the service's `entrypoint` or its `flwr/<name>` image (`flower-<name>` in .venv/bin);
- the arguments from its `command`, with `${VAR:-default}` interpolated, service host names replaced by the
  namespace addresses (`superlink:8000` -> `10.213.N.2:8000`) and container paths under a volume replaced by
  the host folder behind it (named volumes: folders in the fleet's work directory);
- one network namespace per pod, joined to a bridge by a veth pair, with its own address; a service with
  `network_mode: service:X` runs in X's namespace, as in compose. X is a holder (`sleep infinity`, no Flower
  binary): the harness makes its namespace and starts no process for it; the SuperNode and its ClientApp
  executor, and the SuperLink and its ServerApp executor, are the members of such pods. A holder's network
  aliases (`superlink`) name its address too. A service that is neither Flower's nor a holder (the one-shot
  `volumes-init`, which hands Docker's fresh volumes to uid 49999) has nothing to do here: the harness makes
  the volume folders itself;
- where Docker runs on the host, its iptables FORWARD policy is DROP: the harness accepts forwarding on its
  own bridge for as long as the fleet lives (one rule, tagged with the fleet's token, removed by `down` or by
  the next run's clean-up when its owner crashed);
- its `environment`, plus a FLWR_HOME of its own (what the container's /app/.flwr is).

So the compose file cannot drift from what tests/test_fleet.py runs. The harness only starts, watches and
stops processes: the transport, scheduling and execution are Flower's SuperLink, SuperNodes and SuperExecs.
It then runs `flwr run . <connection>` from a private FLWR_HOME whose config.toml names the SuperLink (with
its CA as root-certificates), reads the run's final status with `flwr ls --format json` (flwr run exits 0
on failed runs), and tears everything down: process groups and every process left in a namespace killed,
namespaces, veths and bridge deleted, also when something failed. Namespaces and bridges left by a run that
crashed (their owner process is gone) are removed first.

Wire counters (wire.py): a namespace's are read at the host end of its veth (rx there = what the namespace
sent).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence

from scripts.fleet import BIN, ROOT, FleetError
from scripts.fleet.compose import COMPOSE, Service, Volume, load_compose, translate
from scripts.fleet.driver import FleetDriver
from scripts.fleet.edge import Edge
from scripts.fleet.flwr_cli import flwr_env, registered_ids, sh_env
from scripts.fleet.netns import BR_PREFIX, NS_PREFIX, clean_stale, free_subnet, kill_ns_pids, sh


class NamespaceFleet(FleetDriver):
    """The services of docker-compose.yml as processes in network namespaces (context manager)."""

    def __init__(
        self,
        workdir: str,
        *,
        compose: str = COMPOSE,
        overrides: Sequence[str] = (),
        glue_dir: str = "",
        nodes: int | None = None,
        edge: Edge | None = None,
        supernode_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.token = os.urandom(3).hex()
        self.certs = os.path.join(self.workdir, "certs")
        self.keys = os.path.join(self.workdir, "keys")
        self.logs = os.path.join(self.workdir, "logs")
        for d in (self.certs, self.keys, self.logs):
            os.makedirs(d, exist_ok=True)
        env = {**os.environ, "CERTS_DIR": self.certs, "KEYS_DIR": self.keys, "GLUE_DIR": glue_dir or "/nonexistent"}
        self.services = load_compose(compose, env, os.path.join(self.workdir, "volumes"), overrides)
        self.insecure = "--insecure" in self.by_kind("superlink")[0].command
        if nodes is not None:  # fewer SuperNodes than the file has (the file's first ones)
            keep = {s.name for s in self.by_kind("supernode")[:nodes]}
            self.services = {n: s for n, s in self.services.items() if s.kind != "supernode" or n in keep}
            self.services = {n: s for n, s in self.services.items() if s.pod in self.services}
            members = {s.pod for s in self.services.values() if not s.holder}
            self.services = {n: s for n, s in self.services.items() if not s.holder or n in members}
        self.pods = sorted({s.pod for s in self.services.values()}, key=lambda p: list(self.services).index(p))
        self.subnet = 0
        self.addr: dict[str, str] = {}
        self.ns: dict[str, str] = {}
        self.veth: dict[str, str] = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.edge = edge
        self.supernode_env = dict(supernode_env or {})
        self.bridge = f"{BR_PREFIX}{self.token}"

    # -- topology ------------------------------------------------------------------------------------------
    def by_kind(self, kind: str) -> list[Service]:
        return [s for s in self.services.values() if s.kind == kind]

    @property
    def superlink(self) -> Service:
        return self.by_kind("superlink")[0]

    def superlink_address(self) -> str:
        cmd = self.superlink.command
        port = cmd[cmd.index("--port") + 1] if "--port" in cmd else "8000"
        return f"{self.addr[self.superlink.pod]}:{port}"

    def node_pods(self) -> list[str]:
        return [s.pod for s in self.by_kind("supernode")]

    def pod_of(self, name: str) -> str:
        """The pod a service runs in (a pod's own name is returned as it is)."""
        return self.services[name].pod if name in self.services else name

    def hosts(self) -> dict[str, str]:
        """Every name a command may use for a pod's address: its services' names and the holders' aliases."""
        out = {}
        for s in self.services.values():
            if s.pod in self.addr:
                out[s.name] = self.addr[s.pod]
                out.update((a, self.addr[s.pod]) for a in s.aliases)
        return out

    def pod_volumes(self, pod: str) -> list[Volume]:
        return [v for s in self.services.values() if s.pod == pod for v in s.volumes]

    def __enter__(self) -> NamespaceFleet:
        clean_stale()
        try:
            self.up_network()
        except BaseException:
            self.down()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.down()

    def up_network(self) -> None:
        self.subnet = free_subnet()
        sh("ip", "link", "add", self.bridge, "type", "bridge")
        sh("ip", "addr", "add", f"10.213.{self.subnet}.1/24", "dev", self.bridge)
        sh("ip", "link", "set", self.bridge, "up")
        for i, pod in enumerate(self.pods):
            ns = f"{NS_PREFIX}{os.getpid()}-{self.token}-{pod}"
            host, peer = f"fs{self.token}{i}", f"fs{self.token}{i}p"
            ip = f"10.213.{self.subnet}.{i + 2}"
            sh("ip", "netns", "add", ns)
            self.ns[pod], self.veth[pod], self.addr[pod] = ns, host, ip
            sh("ip", "link", "add", host, "type", "veth", "peer", "name", peer)
            sh("ip", "link", "set", peer, "netns", ns)
            sh("ip", "link", "set", host, "master", self.bridge, "up")
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", peer)
            sh("ip", "-n", ns, "link", "set", peer, "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "default", "via", f"10.213.{self.subnet}.1")
        if shutil.which("iptables"):
            sh("iptables", *self.forward_rule("-I"))
        for s in self.services.values():
            for v in s.volumes:
                if v.named:
                    os.makedirs(v.source, exist_ok=True)

    # -- credentials -----------------------------------------------------------------------------------
    def make_credentials(self) -> None:
        """The CA and SuperLink certificate (SAN: superlink, localhost, its namespace address) and the keys."""
        env = {**os.environ, "SUPERLINK_IP": self.addr[self.superlink.pod]}
        sh_env(["bash", os.path.join(ROOT, "deploy", "make-certs.sh"), self.certs], env)
        sh_env(
            ["bash", os.path.join(ROOT, "deploy", "make-keys.sh"), str(len(self.by_kind("supernode"))), self.keys], env
        )
        self.write_cli_config()

    def ca_certificate(self) -> str | None:
        return None if self.insecure else os.path.join(self.certs, "ca.crt")

    def register(self, public_keys: Sequence[str] | None = None) -> None:
        """`flwr supernode register` every SuperNode's public key (deploy/register-keys.sh); remembers the node
        id the SuperLink gave each key (`node_ids`, by key name = service name)."""
        keys = public_keys or [os.path.join(self.keys, f"{s.name}.pub") for s in self.by_kind("supernode")]
        out = sh_env(
            ["bash", os.path.join(ROOT, "deploy", "register-keys.sh"), "fleet", *keys], self.cli_env(), cwd=ROOT
        )
        ids = registered_ids(out, len(keys))
        self.node_ids.update({os.path.basename(k).removesuffix(".pub"): i for k, i in zip(keys, ids, strict=True)})

    def wait_offline(self, pod: str, timeout: float = 120) -> float:
        """Wait until the SuperLink counts a killed SuperNode pod's node offline; returns the wait (s).

        A killed node stays online until it misses its heartbeats (patience 2 x the 30 s interval, so 36-60 s
        after its last heartbeat). Only then does the SuperLink answer for the messages the node was sent (an
        error reply, NODE_UNAVAILABLE, made when the ServerApp pulls replies) and let the node in again (while it
        still counts the node online, Flower exits the SuperNode with 305). Compose's `restart: unless-stopped`
        gets there by retrying.
        """
        pod = self.pod_of(pod)
        node = next(s.name for s in self.by_kind("supernode") if s.pod == pod)
        t0 = time.monotonic()
        while self.node_status(node) == "online":
            if time.monotonic() - t0 > timeout:
                raise FleetError(f"{pod} still online {timeout:.0f} s after it was killed")
            time.sleep(1)
        return time.monotonic() - t0

    def pod_affinity(self, pod: str) -> list[str]:
        """The CPU sets (Cpus_allowed_list) of the processes running in the pod's namespace now."""
        out = set()
        for pid in sh("ip", "netns", "pids", self.ns[self.pod_of(pod)], check=False).stdout.split():
            with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
                out.update(line.split(":", 1)[1].strip() for line in f if line.startswith("Cpus_allowed_list:"))
        return sorted(out)

    def clientapp_running(self, pod: str) -> bool:
        """Whether a ClientApp process (flwr-clientapp) runs in the pod's namespace now."""
        for pid in sh("ip", "netns", "pids", self.ns[self.pod_of(pod)], check=False).stdout.split():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"flwr-clientapp" in f.read():
                        return True
            except OSError:
                continue
        return False

    # -- processes -------------------------------------------------------------------------------------
    def command(self, name: str) -> list[str]:
        s = self.services[name]
        vols = self.pod_volumes(s.pod)
        args = [translate(a, self.hosts(), vols) for a in s.command]
        return [os.path.join(BIN, s.binary), *args]

    def start(self, name: str) -> subprocess.Popen:
        s = self.services[name]
        home = os.path.join(self.workdir, "homes", name)
        os.makedirs(home, exist_ok=True)
        env = flwr_env(home, s.environment)
        if s.kind == "supernode":
            env.update(self.supernode_env)
        cmd = ["ip", "netns", "exec", self.ns[s.pod], *self.command(name)]
        if self.edge is not None and s.pod == self.pod_of(self.edge.pod):
            cmd = self.edge.wrap(cmd, f"{NS_PREFIX}{os.getpid()}-{self.token}-edge")
        log = open(os.path.join(self.logs, f"{name}.log"), "ab")  # noqa: SIM115 (kept open by the child)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        log.close()
        self.procs[name] = proc
        return proc

    def edge_peak_mb(self) -> float | None:
        return None if self.edge is None else self.edge.peak_mb()

    def stop(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def kill_pod(self, pod: str) -> None:
        """Kill every process of a pod (its services' process groups and anything left in its namespace)."""
        pod = self.pod_of(pod)
        for s in list(self.services.values()):
            if s.pod == pod:
                self.stop(s.name)
        kill_ns_pids(self.ns[pod])

    def up_superlink(self, timeout: float = 60) -> None:
        self.up_pod(self.superlink.pod)
        self.wait_superlink(timeout)

    def check_superlink(self) -> None:
        proc = self.procs.get(self.superlink.name)
        if proc is not None and proc.poll() is not None:
            raise FleetError(f"the SuperLink exited with {proc.returncode}: {self.superlink_log()}")

    def superlink_log(self) -> str:
        return self.tail(self.superlink.name)

    def up_pod(self, pod: str) -> None:
        pod = self.pod_of(pod)
        for s in self.services.values():
            if s.pod == pod and not s.holder:
                self.start(s.name)

    def up(self, timeout: float = 60) -> None:
        """Credentials, SuperLink (+ ServerApp executor), key registration, then every SuperNode pod."""
        self.make_credentials()
        self.up_superlink(timeout)
        if not self.insecure:
            self.register()
        for pod in self.node_pods():
            self.up_pod(pod)

    def tail(self, name: str, n: int = 2000) -> str:
        p = os.path.join(self.logs, f"{name}.log")
        if not os.path.exists(p):
            return ""
        with open(p, "rb") as f:
            return f.read()[-n:].decode(errors="replace")

    def forward_rule(self, op: str) -> list[str]:
        """The rule that lets the bridge forward between its namespaces where FORWARD's policy is DROP (Docker)."""
        where = ["FORWARD", "1"] if op == "-I" else ["FORWARD"]
        return [op, *where, "-i", self.bridge, "-o", self.bridge, "-m", "comment", "--comment", f"{NS_PREFIX}{self.token}",
                "-j", "ACCEPT"]  # fmt: skip

    def down(self) -> None:
        for name in list(self.procs):
            self.stop(name)
        if self.subnet and shutil.which("iptables"):
            sh("iptables", *self.forward_rule("-D"), check=False)
        for ns in self.ns.values():
            kill_ns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        for veth in self.veth.values():
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if self.edge is not None:
            self.edge.remove()
        self.ns, self.veth = {}, {}

    # -- wire counters ---------------------------------------------------------------------------------
    def counters(self) -> dict[str, dict[str, int]]:
        """Bytes each namespace sent and received (read at the host end of its veth, where rx = sent)."""
        out = {}
        for pod, veth in self.veth.items():
            stats = f"/sys/class/net/{veth}/statistics"
            with open(f"{stats}/rx_bytes") as f:
                sent = int(f.read())
            with open(f"{stats}/tx_bytes") as f:
                received = int(f.read())
            out[pod] = {"sent": sent, "received": received}
        return out
