"""The emulated aarch64 Python (scripts/arm64_env.sh) as seen from Python: find or build it, run code in it.

Used by tests/test_arm64.py and scripts/rng_report.py. The emulation is built once (about 250 MB of Debian and
PyPI packages, cached outside the repository); where it cannot be built (not x86_64, no root, no apt, no qemu),
`emulated_python` says why instead.
"""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV_SCRIPT = os.path.join(ROOT, "scripts", "arm64_env.sh")


class EmulationUnavailable(RuntimeError):
    """aarch64 emulation cannot be built on this machine; the message says what is missing."""


def emulated_python() -> str:
    """The path of the aarch64 Python wrapper, built on first use. Raises EmulationUnavailable (the script's
    exit status 3) with its reason, RuntimeError if the build failed otherwise."""
    proc = subprocess.run([ENV_SCRIPT], capture_output=True, text=True, timeout=1800)
    if proc.returncode == 3:
        raise EmulationUnavailable(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise RuntimeError(f"scripts/arm64_env.sh failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


def _env() -> dict[str, str]:
    """This checkout on the path; the host's PYTHONPATH and ATEN_CPU_CAPABILITY are not passed on."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ATEN_CPU_CAPABILITY")}
    return {**env, "PYTHONPATH": ROOT}


def run_arm64(python: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run `python *args` (the emulated Python) in the repository root and wait for it."""
    return subprocess.run([python, *args], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def start_arm64(python: str, *args: str, log: str) -> subprocess.Popen:
    """Start `python *args` (the emulated Python) in the repository root, stdin a pipe, stdout and stderr into the
    file `log`: the caller feeds it while it starts up."""
    with open(log, "w") as out:
        return subprocess.Popen(
            [python, *args],
            cwd=ROOT,
            env=_env(),
            stdin=subprocess.PIPE,
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
