"""Run one federated simulation through `flwr run .` and report it the way a user needs.

`flwr run` exits 0 even when the run failed and leaves a local SuperLink running in the background, so
this driver: validates the configuration before anything starts (clear errors, no training), runs the
app with N simulated SuperNodes, reads the run's final status with `flwr ls`, prints the records' table,
and stops the local SuperLink it started (every process under `flwr run` or carrying this run's FLWR_HOME).
On SIGINT or SIGTERM it stops the run the same way (`flwr stop` first), prints the rounds it had and exits.

    python -m scripts.simulate --clients 10 -c "method='fedkrso' task='sst2' num-server-rounds=3"

Exit status: 0 when the run finished:completed and wrote its summary, 1 otherwise, 2 for a bad config,
130 / 143 when SIGINT / SIGTERM stopped it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import ConfigError, check_paths, parse_run_config
from common.data import task_of
from common.datafiles import HUB_PREFIX, is_data_task
from common.interrupt import Interrupted, exit_on_signals, stop_processes
from common.records import format_table
from common.runfolder import check_not_overwriting, check_not_written
from common.training import check_partitions
from scripts.fleet.flwr_cli import run_config_arg  # `--run-config` as both fleets write it

FLWR = os.path.join(os.path.dirname(sys.executable), "flwr")

# FLWR_HOME -> its `flwr run`'s pid, for every simulate() under way in this process: a signal reaches the main
# thread only, so runs that other threads drive are stopped from there (stop_all).
RUNNING: dict[str, int] = {}


def app_defaults() -> dict:
    from flwr.common.config import flatten_dict

    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


def flwr_env(flwr_home: str, state_dir: str) -> dict[str, str]:
    env = dict(os.environ)
    # `flwr` and the `flower-superlink` it spawns live beside this interpreter (.venv/bin), which need
    # not be on the PATH of whoever runs `make`.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env.update(
        FLWR_HOME=flwr_home,
        # The project's dependencies are installed in this environment (CPU torch among them); Flower's
        # per-run `uv sync` would try to install them again from the network and pull a CUDA torch.
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_TELEMETRY_ENABLED="0",
        FEDSUBSPACE_STATE_DIR=state_dir,
        FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(free_port()),
        TOKENIZERS_PARALLELISM="false",
        RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO="0",
    )
    return env


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_run(run_id: str, env: dict[str, str]) -> bool:
    """`flwr stop`: the SuperLink marks the run stopped and ends its simulation, so the records say how it ended
    (finished:stopped) rather than a SuperLink that vanished mid-round. False when it did not answer in time."""
    try:
        out = subprocess.run([FLWR, "stop", run_id], env=env, cwd=ROOT, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return out.returncode == 0


def run_status(run_id: str, env: dict[str, str]) -> str:
    out = subprocess.run(
        [FLWR, "ls", "--run-id", run_id, "--format", "json"], env=env, cwd=ROOT, capture_output=True, text=True
    )
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (json.JSONDecodeError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip()[-300:]} {out.stderr.strip()[-300:]})"


def simulate(
    overrides: dict,
    clients: int,
    quiet: bool = False,
    timeout: float = 7200,
    progress: bool = False,
    on_line: Callable[[str], None] | None = None,
    client_cpus: int = 1,
) -> dict:
    """Run one simulation; returns {"status", "run_id", "records", "summary"}. Raises ConfigError early.

    `on_line`: called with every line of the run's log as it arrives (a caller's own progress display).
    `client_cpus`: the cores each simulated client holds (Ray runs cores / client_cpus clients at once, each
    with that many threads)."""
    flat = {**app_defaults(), **overrides}
    if not flat.get("data-dir") and os.environ.get("GLUE_DIR") and not is_data_task(str(flat.get("task", ""))):
        flat["data-dir"] = os.environ["GLUE_DIR"]  # the built-in tasks' folder; a task file needs none
    for key in ("data-dir", "results-dir", "resume-from", "data.eval-file"):
        if flat.get(key):
            flat[key] = os.path.abspath(os.path.expanduser(flat[key]))  # the app runs in another folder
    if is_data_task(str(flat.get("task", ""))) and not str(flat["task"]).startswith(HUB_PREFIX):
        flat["task"] = os.path.abspath(os.path.expanduser(flat["task"]))  # a file of one's own, from anywhere
        overrides = {**overrides, "task": flat["task"]}
    if flat.get("data-dir") and not os.path.isdir(flat["data-dir"]):
        raise ConfigError(f"data-dir '{flat['data-dir']}' is not a folder (set GLUE_DIR or data-dir)")
    cfg = parse_run_config(flat)
    if not flat.get("run-name"):
        flat["run-name"] = f"{flat['method']}-{task_of(cfg).name}-{time.strftime('%Y%m%d-%H%M%S')}"
        cfg = parse_run_config(flat)
    if clients < cfg.min_clients:
        raise ConfigError(f"--clients {clients} is below min-clients={cfg.min_clients}")
    check_paths(cfg)
    check_partitions(cfg, clients)  # every client would fail every round of a split that cannot be made
    records = os.path.join(cfg.results_dir, cfg.run_name)
    check_not_written(records)  # a running server writes it; the ServerApp refuses too, here before anything starts
    check_not_overwriting(records, cfg.resume_from)  # the ServerApp refuses too; here before anything starts
    if cfg.resume_from:  # the ServerApp checks it again; here a bad checkpoint stops before anything starts
        from common.config import check_resume
        from server_app import checkpoint

        saved = checkpoint.read(cfg.resume_from)
        check_resume(cfg, saved.config, saved.round)

    # A Flower home and a SuperLink port of its own: concurrent runs cannot capture each other's runs
    # (a stale local SuperLink on the default port would be reused silently), and the cleanup below
    # stops exactly the processes this run started.
    flwr_home = tempfile.mkdtemp(prefix="fedsubspace-flwr-")
    state_dir = tempfile.mkdtemp(prefix="fedsubspace-nodes-")
    env = flwr_env(flwr_home, state_dir)
    run_config = run_config_arg(
        {k: v for k, v in flat.items() if k in overrides or k in ("data-dir", "results-dir", "run-name")}
    )
    cmd = [
        FLWR, "run", ".", "--stream",
        "--federation-config", f"num-supernodes={clients} client-resources-num-cpus={client_cpus}",
        "--run-config", run_config,
    ]  # fmt: skip
    run_id, proc, interrupted = None, None, None
    try:
        # A session of its own: a terminal's Ctrl-C reaches this driver alone, which stops the run in order
        # below while `flwr run` still holds the tree (the SuperLink it spawned detached among it).
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        RUNNING[flwr_home] = proc.pid
        deadline = time.monotonic() + timeout
        for line in proc.stdout:
            if run_id is None and "Successfully started run" in line:
                run_id = line.strip().split()[-1]
            if on_line is not None:
                on_line(line)
            if not quiet or (progress and "accuracy" in line and "bytes down" in line):
                sys.stdout.write(line)
                sys.stdout.flush()
            if time.monotonic() > deadline:
                proc.kill()
                break
        proc.wait()
        status = run_status(run_id, env) if run_id else "not started"
    except Interrupted as exc:
        interrupted = exc
        status = f"stopped by {exc.name}" + (" (flwr stop)" if run_id and stop_run(run_id, env) else "")
    finally:
        # Everything under `flwr run` and everything carrying this FLWR_HOME: the SuperLink, flwr-simulation,
        # Ray's daemons, agents and ClientAppActors.
        stopped = stop_processes([proc.pid] if proc is not None else [], env=("FLWR_HOME", flwr_home))
        RUNNING.pop(flwr_home, None)
        shutil.rmtree(state_dir, ignore_errors=True)
    if interrupted is not None:
        report_interrupted(interrupted, run_id, stopped, records, flwr_home)
        raise interrupted
    if status == "finished:completed":
        shutil.rmtree(flwr_home, ignore_errors=True)
    else:
        print(f"run {run_id} ended {status}; the SuperLink's log is kept in {flwr_home}", file=sys.stderr)
    result = {"status": status, "run_id": run_id, "records": records, "summary": None}
    summary_path = os.path.join(records, "summary.json")
    if os.path.exists(summary_path):
        with open(summary_path) as f:
            result["summary"] = json.load(f)
    return result


def stop_all() -> int:
    """Stop every run that simulate() calls in other threads have under way (their loops then end as the log
    stream closes); returns how many processes were stopped."""
    return sum(stop_processes([pid], env=("FLWR_HOME", home)) for home, pid in list(RUNNING.items()))


def read_rounds(records: str) -> list[dict]:
    with open(os.path.join(records, "rounds.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def report_interrupted(exc: Interrupted, run_id: str | None, stopped: int, records: str, flwr_home: str) -> None:
    """What an interrupted run leaves: its rounds so far (the table), how to continue it, where its logs are."""
    from server_app import checkpoint

    rows = read_rounds(records) if os.path.exists(os.path.join(records, "rounds.jsonl")) else []
    if rows:
        print(format_table(rows), file=sys.stderr)
    resume = os.path.exists(os.path.join(records, checkpoint.FILENAME))
    print(
        f"{exc.name}: stopped run {run_id or '(not started yet)'} and the {stopped} processes it had started (local "
        f"SuperLink, simulation, Ray); {len(rows)} rows of records in {records}"
        + (f" (continue it with resume-from='{records}')" if resume else "")
        + f"; the SuperLink's log in {flwr_home}",
        file=sys.stderr,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=10, help="simulated SuperNodes (default 10)")
    ap.add_argument(
        "-c", "--run-config", default="", help="run-config overrides, e.g. \"method='fedavg' num-server-rounds=5\""
    )
    ap.add_argument("--quiet", action="store_true", help="do not stream the run's log")
    args = ap.parse_args(argv)
    exit_on_signals()
    from flwr.common.config import parse_config_args

    try:
        result = simulate(parse_config_args([args.run_config]) if args.run_config else {}, args.clients, args.quiet)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ok = result["status"] == "finished:completed" and result["summary"] is not None
    print(f"\nrun {result['run_id']}: {result['status']}; records in {result['records']}")
    if result["summary"] is not None:
        print(format_table(read_rounds(result["records"])))
        s = result["summary"]
        pc = s["per_client_per_round"]
        print(
            f"final accuracy {s['final_accuracy']}, best {s['best_accuracy']} (round {s['best_round']}); "
            f"per client per round: {pc['bytes_down']:.0f} B down, {pc['bytes_up']:.0f} B up, "
            f"peak RSS {pc['peak_rss_mb']:.0f} MB"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
