"""docker-compose.yml as compose reads it: `${VAR}` interpolated, override files merged, each service's binary,
command, environment, volumes and pod (the service whose network namespace it runs in).

The namespace fleet (namespaces.py) runs these services as host processes, so the compose file cannot drift from
what it runs: `translate` turns a compose argument into the host's (service names -> addresses, container paths
-> the host folders behind them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from scripts.fleet import ROOT, FleetError

COMPOSE = os.path.join(ROOT, "docker-compose.yml")

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
