"""Network namespaces for the fleet: one per pod, joined to a bridge of the fleet's own by a veth pair. Names carry
the owner's pid and the fleet's token (namespaces fsfleet-<owner pid>-<token>-<pod>, bridge fsb<token>, veths
fs<token><index>), so that what a crashed run left (its owner process is gone) is found and removed by the next
(`clean_stale`), iptables FORWARD rule included."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess

from scripts.fleet import FleetError

NS_PREFIX = "fsfleet-"  # namespaces: fsfleet-<owner pid>-<token>-<service>
BR_PREFIX = "fsb"  # bridges: fsb<token>; veths: fs<token><index>


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


def kill_ns_pids(ns: str) -> None:
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
        kill_ns_pids(ns)
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
