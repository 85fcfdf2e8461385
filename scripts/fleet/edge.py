"""One pod of the namespace fleet run like an edge device (a 4 GB Raspberry Pi, scripts/edge_profile.py): every
process of the pod pinned to `cpus` with taskset, in a memory cgroup limited to `memory_mb` (cgroup v1
memory.limit_in_bytes + memsw, or v2 memory.max), its peak read back when the run is over."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

from scripts.fleet import FleetError


@dataclass
class Edge:
    """Run one pod like an edge device: pinned to `cpus` (taskset) in a memory cgroup limited to `memory_mb`."""

    pod: str
    cpus: str = "0"
    memory_mb: int = 4096
    cgroup: str = ""

    def wrap(self, cmd: list[str], cgroup_name: str) -> list[str]:
        """`cmd` run in the edge's cgroup (made on first use, named `cgroup_name`) and pinned to its CPUs."""
        if not self.cgroup:
            root, version = memory_cgroup_root()
            self.cgroup = os.path.join(root, cgroup_name)
            os.makedirs(self.cgroup, exist_ok=True)
            limit = str(self.memory_mb * 1024 * 1024)
            knob = "memory.limit_in_bytes" if version == 1 else "memory.max"
            with open(os.path.join(self.cgroup, knob), "w") as f:
                f.write(limit)
            if version == 1 and os.path.exists(os.path.join(self.cgroup, "memory.memsw.limit_in_bytes")):
                with (
                    contextlib.suppress(OSError),
                    open(os.path.join(self.cgroup, "memory.memsw.limit_in_bytes"), "w") as f,
                ):
                    f.write(limit)  # no swap beyond the limit either
        procs = os.path.join(self.cgroup, "cgroup.procs")
        # The shell joins the cgroup and then becomes the process: every child is in the cgroup from its start.
        return ["sh", "-c", f'echo $$ > {procs} && exec taskset -c {self.cpus} "$@"', "edge", *cmd]

    def peak_mb(self) -> float | None:
        """The cgroup's peak memory (every process of the pod together, page cache included)."""
        if not self.cgroup:
            return None
        for knob in ("memory.max_usage_in_bytes", "memory.peak"):
            p = os.path.join(self.cgroup, knob)
            if os.path.exists(p):
                with open(p) as f:
                    return int(f.read()) / 2**20
        return None

    def remove(self) -> None:
        if self.cgroup and os.path.isdir(self.cgroup):
            with contextlib.suppress(OSError):
                os.rmdir(self.cgroup)


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
