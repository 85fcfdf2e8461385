"""Run the fleet of docker-compose.yml on this machine: one network namespace per service, Flower's own binaries.

No Docker engine is needed. The harness reads docker-compose.yml itself and derives every process from it:
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

Wire counters: while a run goes, each time the ServerApp appends a round to rounds.jsonl the harness samples
the byte counters of every namespace's interface (the host end of its veth: rx there = what the namespace
sent) and appends to `<records>/wire.jsonl` the bytes each namespace sent and received during that round,
next to the message-level counts, and the round's overhead = round time - slowest client's training time.

    python -m scripts.fleet --methods fedkrso,fedavg -c "task='rte' num-server-rounds=2 data-dir='/abs/glue'"
    python -m scripts.fleet --insecure ...      # + deploy/compose.insecure.yml: no TLS, no node auth

With --methods it runs one method after the other in the same fleet (idle polling measured first) and prints
per method the bytes on the wire against the messages, the round overhead and the start-up time.
Needs root (`ip netns`), openssl and ssh-keygen. Exit status 0 when every run finished:completed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import methods as _methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import ConfigError, parse_run_config
from common.interrupt import Interrupted, exit_on_signals

BIN = os.path.dirname(sys.executable)
COMPOSE = os.path.join(ROOT, "docker-compose.yml")
NS_PREFIX = "fsfleet-"  # namespaces: fsfleet-<owner pid>-<token>-<service>
BR_PREFIX = "fsb"  # bridges: fsb<token>; veths: fs<token><index>
TERMINAL = ("finished:",)


class FleetError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------------------
# docker-compose.yml -> processes


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?([-?])([^}]*))?\}")


def _substitute(m: re.Match, env: Mapping[str, str]) -> str:
    value = env.get(m.group(1))
    if not value and m.group(2) == "?":  # `${VAR:?message}`: compose refuses the file while VAR is unset or empty
        raise FleetError(f"required variable {m.group(1)} is missing a value: {m.group(3)}")
    return value or (m.group(3) or "")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's `${VAR}` / `${VAR:-default}` / `${VAR:?message}` in every string of a loaded compose document."""
    if isinstance(value, str):
        return _VAR.sub(lambda m: _substitute(m, env), value)
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


@dataclass
class Volume:
    source: str  # host folder or file
    target: str  # path in the container
    named: bool


@dataclass
class Service:
    name: str
    binary: str
    command: list[str]
    environment: dict[str, str]
    volumes: list[Volume]
    pod: str  # the service whose network namespace it runs in (itself unless network_mode: service:X)
    depends_on: list[str] = field(default_factory=list)
    aliases: list[str] = field(default_factory=list)  # other names of its address (compose network aliases)
    holder: bool = False  # holds a namespace for its members, runs nothing of its own

    @property
    def kind(self) -> str:
        return self.binary.removeprefix("flower-")


class _ComposeLoader(yaml.SafeLoader):
    """YAML with compose's merge tags: `!override X` is X; `!reset` empties the key (here: the key's value is
    replaced as a whole anyway, as override files merge by key)."""


_ComposeLoader.add_constructor("!override", lambda loader, node: (
    loader.construct_sequence(node) if isinstance(node, yaml.SequenceNode)
    else loader.construct_mapping(node) if isinstance(node, yaml.MappingNode) else loader.construct_scalar(node)))  # fmt: skip
_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def load_compose(path: str, env: Mapping[str, str], volumes_dir: str, files: Sequence[str] = ()) -> dict[str, Service]:
    """The services of a compose file (and override files, merged as compose does for `command`/`volumes`)."""
    docs = []
    for p in [path, *files]:
        with open(p) as f:
            docs.append(interpolate(yaml.load(f, Loader=_ComposeLoader), env))  # noqa: S506 (a SafeLoader)
    services: dict[str, dict] = {}
    for doc in docs:
        for name, spec in (doc.get("services") or {}).items():
            services.setdefault(name, {}).update(spec)
    base = os.path.dirname(os.path.abspath(path))
    joined = {m.removeprefix("service:") for m in (sp.get("network_mode", "") for sp in services.values())}
    out = {}
    for name, spec in services.items():
        if spec.get("entrypoint"):
            entry = spec["entrypoint"]
            binary = entry[0] if isinstance(entry, list) else entry.split()[0]
        else:
            m = re.fullmatch(r"flwr/([a-z]+)(:.*)?", spec.get("image", ""))
            if not m:
                raise FleetError(f"service {name}: neither an entrypoint nor a flwr/<component> image")
            binary = f"flower-{m.group(1)}"
        holder = not binary.startswith("flower-")
        if holder and name not in joined:
            continue  # a one-shot helper of Docker's (volumes-init): nothing to run as a host process
        networks = spec.get("networks") or {}
        aliases = [a for net in networks.values() if isinstance(net, dict) for a in net.get("aliases") or []]
        mode = spec.get("network_mode", "")
        pod = mode.removeprefix("service:") if mode.startswith("service:") else name
        vols = []
        for v in spec.get("volumes") or []:
            if isinstance(v, dict):  # the long syntax: type, source, target, ...
                src, dst, named = str(v["source"]), str(v["target"]), v.get("type", "volume") == "volume"
            else:
                src, dst = v.split(":")[:2]
                named = not src.startswith((".", "/", "~"))
            host = os.path.join(volumes_dir, src) if named else os.path.normpath(os.path.join(base, src))
            vols.append(Volume(host, dst, named))
        envs = spec.get("environment") or {}
        if isinstance(envs, list):
            envs = dict(e.split("=", 1) for e in envs)
        deps = spec.get("depends_on") or []
        out[name] = Service(
            name=name,
            binary=binary,
            command=[str(c) for c in spec.get("command") or []],
            environment={k: str(v) for k, v in envs.items()},
            volumes=vols,
            pod=pod,
            depends_on=list(deps) if isinstance(deps, list) else list(deps.keys()),
            aliases=aliases,
            holder=holder,
        )
    for s in out.values():
        if s.pod not in out:
            raise FleetError(f"service {s.name}: network_mode names an unknown service {s.pod}")
    return out


def translate(arg: str, hosts: Mapping[str, str], volumes: Sequence[Volume]) -> str:
    """A compose argument as a host process needs it: service names -> addresses, container paths -> host paths."""
    for name, ip in sorted(hosts.items(), key=lambda kv: -len(kv[0])):
        arg = re.sub(rf"(?<![\w.-]){re.escape(name)}(?=:\d)", ip, arg)
    for v in sorted(volumes, key=lambda v: -len(v.target)):
        arg = re.sub(rf"(?<![\w/]){re.escape(v.target)}(?=$|[/'\"\s])", v.source, arg)
    return arg


# ---------------------------------------------------------------------------------------------------------
# network namespaces


# ---------------------------------------------------------------------------------------------------------
# checks before anything starts


def check_run_config(run_config: Mapping[str, Any]) -> None:
    """Check a fleet run's config here, with the ServerApp's own validation, before `flwr run` sends it.

    The SuperLink refuses a key the app does not declare with only `[code: 15] Invalid run configuration.` (the
    key's name goes to its own log), and a bad value fails the run inside the ServerApp: checked here, both raise
    the ConfigError a simulation gives, naming the key and what it accepts. The app's defaults
    (`[tool.flwr.app.config]`) fill in the keys not given, as the SuperLink does. Paths are the containers' and
    are not looked at here (the ServerApp checks them when the run starts)."""
    from scripts.simulate import app_defaults

    parse_run_config({**app_defaults(), **run_config})


GLUE_LAYOUT = (
    "a folder in the GLUE layout: one folder per task as the GLUE and SuperGLUE downloads unpack them (SST-2/, "
    "RTE/, MRPC/, CoLA/ with train.tsv and dev.tsv; WiC/, CB/ with train.jsonl and val.jsonl; BoolQ/val.jsonl)"
)


def check_glue_dir(path: str) -> None:
    """The folder a fleet mounts at /app/data/glue must exist and hold task folders: Docker makes a missing bind
    source as an empty folder, and every run on it then fails inside its ServerApp."""
    if not path:
        raise ConfigError(f"no data folder: set GLUE_DIR (or data-dir / --glue-dir) to {GLUE_LAYOUT}")
    if not os.path.isdir(path):
        raise ConfigError(
            f"data folder {path} does not exist: set GLUE_DIR (or data-dir / --glue-dir) to {GLUE_LAYOUT}"
        )
    if not any(os.path.isdir(os.path.join(path, entry)) for entry in os.listdir(path)):
        raise ConfigError(f"data folder {path} holds no task folder: copy the task files into it, {GLUE_LAYOUT}")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if check and res.returncode != 0:
        raise FleetError(f"{' '.join(cmd)}: {res.stderr.strip()}")
    return res


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_pids(ns: str) -> None:
    pids = sh("ip", "netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)


def clean_stale() -> list[str]:
    """Delete namespaces and bridges of fleets whose owner process is gone (a crashed earlier run)."""
    removed = []
    live_tokens = set()
    for line in sh("ip", "netns", "list", check=False).stdout.splitlines():
        ns = line.split()[0] if line.strip() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)-([0-9a-f]+)-.+", ns)
        if not m:
            continue
        if _alive(int(m.group(1))):
            live_tokens.add(m.group(2))
            continue
        _kill_ns_pids(ns)
        sh("ip", "netns", "del", ns, check=False)
        removed.append(ns)
    for line in sh("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(BR_PREFIX) and name[len(BR_PREFIX) :] not in live_tokens:
            sh("ip", "link", "del", name, check=False)
            removed.append(name)
    if shutil.which("iptables"):
        for rule in sh("iptables", "-S", "FORWARD", check=False).stdout.splitlines():
            m = re.search(rf'--comment "?{NS_PREFIX}([0-9a-f]+)"?', rule)
            if m and m.group(1) not in live_tokens and rule.startswith("-A "):
                sh("iptables", "-D", *rule.split()[1:], check=False)
                removed.append(f"iptables rule {m.group(1)}")
    return removed


def free_subnet() -> int:
    used = sh("ip", "-4", "-o", "addr", "show", check=False).stdout
    for n in range(1, 250):
        if f" 10.213.{n}." not in used:
            return n
    raise FleetError("no free 10.213.N.0/24 subnet for the fleet's bridge")


# ---------------------------------------------------------------------------------------------------------
# the fleet


def flwr_env(home: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLWR_")}
    env.update(
        PATH=os.pathsep.join([BIN, env.get("PATH", "")]),
        FLWR_HOME=home,
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        # Dependencies are installed (the image has them baked in): never `uv sync` at run time.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return env


# The flwr CLI as both fleets (namespaces here, Docker in scripts/compose_fleet.py) drive it.


def write_cli_config(home: str, address: str, ca: str | None) -> None:
    """FLWR_HOME/config.toml naming the SuperLink "fleet" at `address`, trusting `ca` (None: insecure)."""
    os.makedirs(home, exist_ok=True)
    tls = f'root-certificates = "{ca}"' if ca else "insecure = true"
    with open(os.path.join(home, "config.toml"), "w") as f:
        f.write(f'[superlink]\ndefault = "fleet"\n\n[superlink.fleet]\naddress = "{address}"\n{tls}\n')


def superlink_answers(res: subprocess.CompletedProcess) -> bool:
    """Whether `flwr ls fleet --format json` reached the SuperLink (`flwr ls` exits 0 when it is unreachable)."""
    with contextlib.suppress(json.JSONDecodeError, AttributeError):
        return json.loads(res.stdout).get("success") is not False
    return False


def registered_ids(out: str, expected: int) -> list[int]:
    """The node ids deploy/register-keys.sh printed, one per key, in the order of the keys."""
    ids = [int(i) for i in re.findall(r"SuperNode (\d+) registered", out)]
    if len(ids) != expected:
        raise FleetError(f"expected {expected} registrations, the SuperLink answered: {out[-1500:]}")
    return ids


def supernode_statuses(res: subprocess.CompletedProcess) -> dict[int, str]:
    """Node id -> status (online, offline, registered...) from `flwr supernode list fleet --format json`."""
    try:
        return {int(n["node-id"]): n["status"] for n in json.loads(res.stdout)["nodes"]}
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise FleetError(f"flwr supernode list: {res.stdout[-500:]} {res.stderr[-500:]}") from exc


@dataclass
class Edge:
    """Run one pod like an edge device: pinned to `cpus` (taskset) in a memory cgroup limited to `memory_mb`."""

    pod: str
    cpus: str = "0"
    memory_mb: int = 4096
    cgroup: str = ""


def memory_cgroup_root() -> tuple[str, int]:
    """Where to make a memory cgroup (under this process's own one) and the cgroup version (1 or 2)."""
    with open("/proc/self/cgroup") as f:
        lines = f.read().splitlines()
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            root = os.path.join("/sys/fs/cgroup/memory", path.lstrip("/"))
            if os.path.isdir(root):
                return root, 1
    for line in lines:
        if line.startswith("0::"):
            root = os.path.join("/sys/fs/cgroup", line[3:].lstrip("/"))
            if os.path.exists(os.path.join(root, "cgroup.controllers")):
                return root, 2
    raise FleetError("no writable memory cgroup (v1 memory controller or v2) found under /sys/fs/cgroup")


class Fleet:
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
        self.workdir = os.path.abspath(workdir)
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
        self.node_ids: dict[str, int] = {}
        self.resumed: dict[int, int] = {}  # run id -> the round its resume-from checkpoint had completed
        self.edge = edge
        self.supernode_env = dict(supernode_env or {})
        self.bridge = f"{BR_PREFIX}{self.token}"
        self.home = os.path.join(self.workdir, "cli-home")

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

    def __enter__(self) -> Fleet:
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

    def write_cli_config(self) -> None:
        write_cli_config(
            self.home, self.superlink_address(), None if self.insecure else os.path.join(self.certs, "ca.crt")
        )

    def register(self, public_keys: Sequence[str] | None = None) -> None:
        """`flwr supernode register` every SuperNode's public key (deploy/register-keys.sh); remembers the node
        id the SuperLink gave each key (`node_ids`, by key name = service name)."""
        keys = public_keys or [os.path.join(self.keys, f"{s.name}.pub") for s in self.by_kind("supernode")]
        out = sh_env(
            ["bash", os.path.join(ROOT, "deploy", "register-keys.sh"), "fleet", *keys], self.cli_env(), cwd=ROOT
        )
        ids = registered_ids(out, len(keys))
        self.node_ids.update({os.path.basename(k).removesuffix(".pub"): i for k, i in zip(keys, ids, strict=True)})

    def node_status(self, name: str) -> str:
        """The SuperLink's status of a SuperNode (online, offline, registered...) from `flwr supernode list`."""
        statuses = supernode_statuses(self.flwr("supernode", "list", "fleet", "--format", "json"))
        return statuses.get(self.node_ids[name], "absent")

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

    def cli_env(self) -> dict[str, str]:
        return flwr_env(self.home)

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
            cmd = self._edge_wrap(cmd)
        log = open(os.path.join(self.logs, f"{name}.log"), "ab")  # noqa: SIM115 (kept open by the child)
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=home)
        log.close()
        self.procs[name] = proc
        return proc

    def _edge_wrap(self, cmd: list[str]) -> list[str]:
        edge = self.edge
        if not edge.cgroup:
            root, version = memory_cgroup_root()
            edge.cgroup = os.path.join(root, f"{NS_PREFIX}{os.getpid()}-{self.token}-edge")
            os.makedirs(edge.cgroup, exist_ok=True)
            limit = str(edge.memory_mb * 1024 * 1024)
            knob = "memory.limit_in_bytes" if version == 1 else "memory.max"
            with open(os.path.join(edge.cgroup, knob), "w") as f:
                f.write(limit)
            if version == 1 and os.path.exists(os.path.join(edge.cgroup, "memory.memsw.limit_in_bytes")):
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(edge.cgroup, "memory.memsw.limit_in_bytes"), "w") as f,
                ):
                    f.write(limit)  # no swap beyond the limit either
        procs = os.path.join(edge.cgroup, "cgroup.procs")
        # The shell joins the cgroup and then becomes the process: every child is in the cgroup from its start.
        return ["sh", "-c", f'echo $$ > {procs} && exec taskset -c {edge.cpus} "$@"', "edge", *cmd]

    def edge_peak_mb(self) -> float | None:
        if self.edge is None or not self.edge.cgroup:
            return None
        for knob in ("memory.max_usage_in_bytes", "memory.peak"):
            p = os.path.join(self.edge.cgroup, knob)
            if os.path.exists(p):
                with open(p) as f:
                    return int(f.read()) / 2**20
        return None

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
        _kill_ns_pids(self.ns[pod])

    def up_superlink(self, timeout: float = 60) -> None:
        self.up_pod(self.superlink.pod)
        self.wait_superlink(timeout)

    def wait_superlink(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if superlink_answers(self.flwr("ls", "fleet", "--format", "json")):
                return
            proc = self.procs.get(self.superlink.name)
            if proc is not None and proc.poll() is not None:
                raise FleetError(f"the SuperLink exited with {proc.returncode}: {self.tail(self.superlink.name)}")
            time.sleep(0.5)
        raise FleetError(f"the SuperLink did not answer within {timeout:.0f} s: {self.tail(self.superlink.name)}")

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
            _kill_ns_pids(ns)
            sh("ip", "netns", "del", ns, check=False)
        for veth in self.veth.values():
            sh("ip", "link", "del", veth, check=False)
        sh("ip", "link", "del", self.bridge, check=False)
        if self.edge is not None and self.edge.cgroup and os.path.isdir(self.edge.cgroup):
            with contextlib.suppress(OSError):
                os.rmdir(self.edge.cgroup)
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

    # -- runs ------------------------------------------------------------------------------------------
    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([os.path.join(BIN, "flwr"), *args], env=self.cli_env(), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)  # fmt: skip

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

    def local_path(self, path: str) -> str:
        """A path of the run config as this process reads it (the namespace fleet runs on the host's paths)."""
        return path

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


class WireLog:
    """Per-round wire bytes of every namespace, beside the records' message-level counts: <records>/wire.jsonl."""

    def __init__(self, fleet: Fleet, records: str, resumed_round: int = -1) -> None:
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


def sh_env(cmd: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> str:
    res = subprocess.run(list(cmd), env=dict(env), cwd=cwd, capture_output=True, text=True)
    if res.returncode != 0:
        raise FleetError(f"{' '.join(cmd)} exited {res.returncode}: {res.stdout[-1000:]} {res.stderr[-1000:]}")
    return res.stdout


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else repr(value)


def run_config_arg(run_config: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={toml_value(v)}" for k, v in run_config.items())


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


def measure_idle(fleet: Fleet, seconds: float) -> dict[str, float]:
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


def stop_run(fleet: Fleet, run_id: int) -> bool:
    """`flwr stop`: the SuperLink records the run as stopped before the fleet goes down under it."""
    try:
        return fleet.flwr("stop", str(run_id), "fleet", timeout=30).returncode == 0
    except subprocess.TimeoutExpired:
        return False


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
    try:  # before any process starts: a bad key or an empty data folder is told in seconds, not after the fleet
        check_glue_dir(glue)
        for method in methods:
            check_run_config({**rc, "method": method})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    exit_on_signals()  # SIGINT and SIGTERM unwind through Fleet.__exit__: every process, namespace and link goes
    workdir = args.workdir or tempfile.mkdtemp(prefix="fedsubspace-fleet-")
    overrides = [os.path.join(ROOT, "deploy", "compose.insecure.yml")] if args.insecure else []
    rows, ok = [], True
    idle = {"node_bytes_per_second": 0.0}
    under_way: dict[str, Any] = {}  # the run an interruption stops and reports
    try:
        with Fleet(workdir, overrides=overrides, glue_dir=glue, nodes=args.nodes) as fleet:
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
                    under_way["flwr stop"] = stop_run(fleet, run_id)
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
