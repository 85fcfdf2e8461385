"""The Raspberry Pi install gets a CPU torch: checked against PyPI's own metadata, not assumed.

`make install` on aarch64 installs the Makefile's TORCH_AARCH64 first, then requirements.txt. The whole set is
resolved here for linux/aarch64, Python 3.11, as pip on a Pi would (uv evaluates the wheels' markers for the
target platform and reads only their metadata, no wheel is downloaded): it must contain no CUDA package. The
control, torch 2.13.0 (the x86_64 pin), must pull CUDA on aarch64, so the check can fail.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.system

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UV = os.path.join(os.path.dirname(sys.executable), "uv")
CUDA = re.compile(r"^(nvidia-|cuda-|triton\b)")
INDEX = "https://pypi.org/simple"  # the index a Pi's pip reads; the resolution below asks it for metadata


def make_install_commands(tmp_path, machine: str) -> str:
    """What `make install` would run on a machine whose `uname -m` is `machine` (make -n: nothing runs)."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    uname = fake / "uname"
    uname.write_text(f"#!/bin/sh\necho {machine}\n")
    uname.chmod(uname.stat().st_mode | stat.S_IEXEC)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    env.pop("TORCH", None)
    venv = tmp_path / f"venv-{machine}"
    out = subprocess.run(
        ["make", "-n", "-B", "install", f"VENV={venv}"], cwd=ROOT, env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


def torch_spec(commands: str) -> str:
    match = re.search(r"pip install --quiet \"(torch[^\"]*)\"", commands)
    assert match, f"no torch install in:\n{commands}"
    return match.group(1)


def test_make_install_picks_the_aarch64_torch_only_on_aarch64(tmp_path):
    arm, x86 = (
        torch_spec(make_install_commands(tmp_path, "aarch64")),
        torch_spec(make_install_commands(tmp_path, "x86_64")),
    )
    assert arm != x86 and arm.startswith("torch==") and x86 == "torch==2.13.0"


def resolve_for_aarch64(requirements: list[str]) -> list[str]:
    proc = subprocess.run(
        [UV, "pip", "compile", "-", "--python-platform", "aarch64-manylinux_2_28", "--python-version", "3.11",
         "--index-url", INDEX, "--no-header", "--no-annotate", "--quiet"],
        input="\n".join(requirements), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [line.split("==")[0].strip().lower() for line in proc.stdout.splitlines() if "==" in line]


@pytest.fixture(scope="module")
def pypi():
    """Skips, saying why, where the package index cannot be reached: the resolution needs its metadata, and a
    machine without the network says nothing about the install either way. Where it is reachable (CI), the test
    runs; an index that answers but fails the resolution is a failure, not a skip."""
    probe = f"{INDEX}/torch/"
    try:
        urllib.request.urlopen(probe, timeout=20).close()
    except urllib.error.HTTPError:
        raise  # the index answered: whatever it said is for the test to report, not a reason to skip
    except OSError as exc:  # not reached: no route, no name, refused, timed out
        pytest.skip(f"package index not reachable ({probe}: {exc}); the aarch64 install check needs its metadata")


@pytest.mark.e2e
def test_the_raspberry_pi_install_resolves_to_no_cuda_package(tmp_path, pypi):
    spec = torch_spec(make_install_commands(tmp_path, "aarch64"))
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        requirements = [line.split("#")[0].strip() for line in f if line.split("#")[0].strip()]
    names = resolve_for_aarch64([spec, *requirements])
    assert "torch" in names and "transformers" in names and "flwr" in names
    assert not [n for n in names if CUDA.match(n)], f"{spec} pulls CUDA onto aarch64: {names}"
    # the control: PyPI's torch 2.13.0 for aarch64 is a CUDA build
    assert [n for n in resolve_for_aarch64(["torch==2.13.0"]) if CUDA.match(n)]
