"""The flwr CLI as both fleets drive it: its environment and config.toml (a private FLWR_HOME naming the SuperLink
"fleet"), the run config as `flwr run --run-config` takes it, and what its answers say (whether the SuperLink
answered, the node ids a registration printed, the SuperNodes' statuses)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
from collections.abc import Mapping, Sequence
from typing import Any

from scripts.fleet import BIN, FleetError


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


def sh_env(cmd: Sequence[str], env: Mapping[str, str], cwd: str | None = None) -> str:
    """A command (deploy/'s certificate, key and registration scripts) run with `env`: its output, or FleetError."""
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
