"""docker-compose.yml on a real Docker engine, through deploy/README.md's own commands (`make test-compose`).

`make test-compose` first runs scripts/docker_engine.py (an engine, Compose v2, the flwr/* images or local
stand-ins with the same tags and layout, torch for the executor image), then this module. One fleet for the
module (scripts/fleet/docker.py: certs, keys, build, up, register, up, in a copy of the repository, under a
compose project of its own), TLS and SuperNode authentication on, the tiny 2-layer BERT on RTE. Then:
- every Flower service runs as uid 49999 and writes its volumes;
- an unregistered key is refused; `flwr` without the CA is refused;
- FedSPZO after both executors and a SuperNode were restarted (the pairs stay connected through their pods);
- FedKRSO with supernode-3's SuperNode process killed (SIGKILL of the container's main process, a crash) while
  its ClientApp trains round 1: Docker's restart policy brings it back and the same node trains round 2;
- FedTT+ with the SuperLink killed once round 1's checkpoint is written: Docker restarts it and the run is
  continued with `resume-from`;
each run's final status from `flwr ls`, its records read back from the `results` volume, and per-round wire
bytes from the pods' interfaces (`wire.jsonl`, as the namespace fleet writes it).
Skipped where no engine answers (`make test-compose` starts one); a failure to bring the fleet up fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
import time
import warnings

import pytest

from harness.fakes import assert_wire_covers_messages

pytestmark = [pytest.mark.compose, pytest.mark.system]

STANDIN_LABEL = '{{index .Config.Labels "org.fedsubspace.standin"}}'


def _engine() -> str:
    if shutil.which("docker") is None:
        return "no docker client"
    if subprocess.run(["docker", "info"], capture_output=True).returncode != 0:
        return "no Docker engine answers (make test-compose starts one)"
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode != 0:
        return "no Compose v2 (make test-compose installs it)"
    return ""


OWN_SIZES = (9, 12, 17)  # rows of each SuperNode's own file (docker-compose.yml: data-file='.../own/node-<i>.jsonl')


def _instructions(path: str, rows: int, start: int = 0) -> None:
    with open(path, "w") as f:
        for i in range(start, start + rows):
            f.write(json.dumps({"prompt": f"What comes after {i}?", "response": str(i + 1)}) + "\n")


def _data_dir(root, glue_dir, tiny_bert, tiny_llama) -> str:
    """What the containers see at /app/data/glue: RTE, the tiny models, and own/: each SuperNode's own
    instruction file and the server's, readable by uid 49999."""
    data = os.path.join(root, "glue")
    shutil.copytree(os.path.join(glue_dir, "RTE"), os.path.join(data, "RTE"))
    shutil.copytree(tiny_bert, os.path.join(data, "tiny-bert"))
    shutil.copytree(tiny_llama, os.path.join(data, "tiny-llama"))
    os.makedirs(os.path.join(data, "own"))
    for i, rows in enumerate(OWN_SIZES):
        _instructions(os.path.join(data, "own", f"node-{i}.jsonl"), rows, start=100 * (i + 1))
    _instructions(os.path.join(data, "own", "server.jsonl"), 40)
    for d in (root, data):
        os.chmod(d, 0o755)
    subprocess.run(["chmod", "-R", "a+rX", data], check=True)
    return data


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, glue_dir, tiny_bert, tiny_llama):
    if why := _engine():
        pytest.skip(why)
    from scripts.fleet.docker import ComposeFleet

    images = [f"flwr/{c}:1.41.0" for c in ("superlink", "supernode", "superexec")]
    res = subprocess.run(["docker", "image", "inspect", "-f", STANDIN_LABEL, *images], capture_output=True, text=True)
    if "1" in res.stdout.split():
        warnings.warn("flwr/* images are local stand-ins (deploy/standin/Dockerfile), not Flower's", stacklevel=1)
    root = str(tmp_path_factory.mktemp("compose"))
    data = _data_dir(root, glue_dir, tiny_bert, tiny_llama)
    with ComposeFleet(root, glue_dir=data, torch_index=os.environ.get("TORCH_INDEX", "")) as f:
        print(f"\ncompose fleet up: {json.dumps({k: round(v, 1) for k, v in f.timings.items()})}")
        yield f


def config(**extra):
    return {
        "task": "rte", "model": "/app/data/glue/tiny-bert", "data-dir": "/app/data/glue",
        "results-dir": "/app/results", "train.local-steps": 2, "krso.intervals": 2, "train.batch-size": 8,
        "train.max-length": 32, "eval.max-examples": 32, "tt.bottleneck": 8, "spzo.split-layer": 1,
        "zo.params": "bitfit", "spzo.p1": 1, "spzo.p2": 2, "zo.lr": 1e-3, "min-clients": 3, "round-timeout": 120.0, **extra,
    }  # fmt: skip


def rows_of(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def completed(fleet, run_id, status):
    assert status == "finished:completed", (
        f"{status}\n{fleet.flwr('log', str(run_id), 'fleet', '--show').stdout[-3000:]}"
    )


def check_wire(records, rounds):
    """wire.jsonl has every round; a trained round's wire bytes (the pods' eth0) cover its messages."""
    wire = rows_of(os.path.join(records, "wire.jsonl"))
    assert [w["round"] for w in wire] == rounds
    assert_wire_covers_messages(wire)  # through each round: a row seen late books the next round's first bytes
    for w in wire:
        if w["round"] == 0:
            continue
        assert w["message_bytes_down"] > 0 and w["message_bytes_up"] > 0, w
        assert w["tls"] and w["overhead_seconds"] > 0, w
    return wire


def test_services_run_as_app_and_write_their_volumes(fleet):
    """No Flower service runs as root, and each writes the volume it keeps its state in."""
    for service, volume in [("superlink", "/app/state"), ("superexec-serverapp", "/app/results"),
                            ("supernode-1", None), ("superexec-clientapp-1", "/app/state")]:  # fmt: skip
        assert fleet.compose("exec", "-T", service, "id", "-u").stdout.strip() == "49999", service
        if volume:
            probe = f"{volume}/.write-probe"
            fleet.compose("exec", "-T", service, "sh", "-c", f"touch {probe} && rm {probe}")
    assert os.path.exists(os.path.join(fleet.volume_dir("superlink-state"), "state.db"))
    init = fleet.sh("docker", "inspect", "-f", "{{.State.ExitCode}}", fleet.container("volumes-init"))
    assert init.stdout.strip() == "0"


def test_unregistered_key_is_refused(fleet):
    """A SuperNode with a key the SuperLink does not know is refused: Flower logs exit code 305, the container
    exits with status 1 (what Docker and its restart policy see)."""
    keys = os.path.join(fleet.app, "deploy", "keys")
    fleet.sh("deploy/make-keys.sh", "--name", "intruder")
    ca = os.path.join(fleet.app, "deploy", "certs", "ca.crt")
    res = fleet.sh(
        "docker", "run", "--rm", "--network", f"{fleet.project}_default",
        "-v", f"{ca}:/app/certificates/ca.crt:ro", "-v", f"{keys}/intruder:/app/keys/supernode:ro",
        "flwr/supernode:1.41.0", "--superlink", "superlink:8000", "--root-certificates", "/app/certificates/ca.crt",
        "--auth-supernode-private-key", "/app/keys/supernode", "--max-retries", "2", check=False, timeout=180,
    )  # fmt: skip
    out = res.stdout + res.stderr
    assert res.returncode == 1 and "305" in out and "Failed to activate SuperNode" in out, out[-3000:]
    assert set(fleet.node_statuses().values()) == {"online"} and len(fleet.node_ids) == 3


def test_flwr_without_the_ca_is_refused(fleet, tmp_path):
    """A `flwr` connection that does not trust the fleet's CA cannot talk to the SuperLink."""
    home = tmp_path / "no-ca"
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink.fleet]\naddress = "127.0.0.1:{fleet.port}"\n')
    from scripts.fleet import BIN
    from scripts.fleet.flwr_cli import flwr_env

    res = subprocess.run([os.path.join(BIN, "flwr"), "ls", "fleet", "--format", "json"], env=flwr_env(str(home)),
                         cwd=fleet.app, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert json.loads(res.stdout).get("success") is False, res.stdout[-2000:]
    assert "runs" not in json.loads(res.stdout)


def test_fedspzo_after_executors_and_a_supernode_restart(fleet):
    """Both executors and a SuperNode restarted by Docker: each pair still shares its pod's namespace, so the
    next run is served by all three nodes."""
    fleet.compose("restart", "superexec-serverapp", "superexec-clientapp-2", "supernode-1")
    fleet.wait_online(list(fleet.node_ids), 180)
    cfg = config(method="fedspzo", **{"num-server-rounds": 1, "run-name": "spzo"})
    run_id = fleet.submit(cfg)
    records = fleet.records("spzo")
    completed(fleet, run_id, fleet.watch(run_id, records, 420))
    rows = rows_of(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 3 and rows[1]["rejected"] == 0
    check_wire(records, [0, 1])


def test_every_supernode_instruction_tunes_on_its_own_file(fleet):
    """A run on a data task: each SuperNode trains on the file its node config names (9, 12 and 17 rows), the
    server evaluates on its own file's held-out tenth; a decoder, the loss on the response tokens."""
    cfg = config(
        method="fedkrso", task="/app/data/glue/own/server.jsonl", model="/app/data/glue/tiny-llama",
        **{"num-server-rounds": 1, "run-name": "own-files", "eval.generate": 2, "eval.max-new-tokens": 3},
    )  # fmt: skip
    del cfg["data-dir"]
    run_id = fleet.submit(cfg)
    records = fleet.records("own-files")
    completed(fleet, run_id, fleet.watch(run_id, records, 420))
    rows = rows_of(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 3 and rows[1]["rejected"] == 0
    # all of each node's own file: 38 rows, where partitions of the server's file would hold its 36 train rows
    assert rows[1]["examples"] == sum(OWN_SIZES)
    assert all(r["perplexity"] > 1 and r["generated"] == 2 for r in rows)


def _server_tensors(fleet, records, server_round):
    """The server's global tensors after `server_round`, rebuilt here from that round's checkpoint (kept by the
    harness as checkpoint-round-<T>) with the same `resume` a resumed run uses; the run config's container
    paths are read as the host folders behind them."""
    from common.config import parse_run_config
    from common.records import RunRecorder
    from server_app import checkpoint
    from server_app.app import build_setup, resume

    saved = checkpoint.read(os.path.join(records, f"checkpoint-round-{server_round}.safetensors"))
    assert saved.round == server_round
    host = {k: v.replace("/app/data/glue", fleet.env["GLUE_DIR"], 1) if isinstance(v, str) else v
            for k, v in saved.config.items()}  # fmt: skip
    cfg = parse_run_config({**host, "results-dir": os.path.join(fleet.workdir, "rebuilt"), "run-name": "x"})
    setup = build_setup(cfg, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    resume(setup, saved, run_id=-1)
    return setup.strategy.global_tensors()


def test_supernode_crash_mid_round_and_the_node_trains_again(fleet):
    """FedKRSO, 2 rounds: supernode-3's SuperNode process is killed with SIGKILL while its ClientApp trains
    round 1. Docker's restart policy starts it again (refused until the SuperLink counts the old session
    offline, then admitted); round 1 closes with the other two and round 2 has all three: the same node, in the
    same pod, caught up from the update log and trained."""
    events: dict = {}

    def crash():
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and "flwr-clientapp" not in fleet.processes("superexec-clientapp-3"):
            time.sleep(0.2)
        events["caught"] = "flwr-clientapp" in fleet.processes("superexec-clientapp-3")
        events["restarts"] = fleet.restarts("supernode-3")
        os.kill(fleet.main_pid("supernode-3"), signal.SIGKILL)

    def on_round(row):
        if row["round"] == 0 and "thread" not in events:
            events["thread"] = threading.Thread(target=crash, daemon=True)
            events["thread"].start()

    cfg = config(method="fedkrso", **{"num-server-rounds": 2, "run-name": "krso-crash", "round-timeout": 150.0})
    run_id = fleet.submit(cfg)
    records = fleet.records("krso-crash")
    status = fleet.watch(run_id, records, 720, on_round)
    events["thread"].join(timeout=200)
    completed(fleet, run_id, status)
    assert events.get("caught"), "supernode-3's ClientApp was not caught training round 1"
    assert fleet.restarts("supernode-3") > events["restarts"]  # Docker brought the crashed process back
    rows = rows_of(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert rows[1]["clients"] == 2  # round 1 closed without the crashed node
    assert rows[2]["clients"] == 3 and rows[2]["rejected"] == 0  # and it trained round 2
    check_wire(records, [0, 1, 2])
    # The node replayed round 1, which it missed, before training round 2: its stored copy of the global model
    # is the server's after round 1 (to 1e-6: W + B P is a BLAS product).
    from safetensors import safe_open
    from safetensors.torch import load_file

    node_id = fleet.node_ids["supernode-3"]
    state = os.path.join(fleet.volume_dir("supernode-3-state"), f"run-{run_id}", f"node-{node_id}",
                         "fedkrso-state.safetensors")  # fmt: skip
    with safe_open(state, "pt") as f:
        assert f.metadata()["round"] == "1"
    node, server = load_file(state), _server_tensors(fleet, records, 1)
    assert node and set(node) <= set(server)
    for name, value in node.items():
        assert (value - server[name]).abs().max().item() <= 1e-6, name
    copy = fleet.records_copy("krso-crash", os.path.join(fleet.workdir, "krso-crash"))
    assert rows_of(os.path.join(copy, "rounds.jsonl")) == rows


def test_superlink_crash_then_resume_from(fleet):
    """FedTT+, 2 rounds: the SuperLink process is killed with SIGKILL once round 1's checkpoint is written.
    Docker restarts it on its database (keys stay registered, the SuperNodes and the ServerApp executor find it
    again in their pods); the interrupted run does not complete, and a new run with `resume-from` runs round 2
    only, its records starting with the first run's rows."""
    from server_app import checkpoint

    cfg = config(method="fedtt-plus", **{"num-server-rounds": 2, "run-name": "tt-first"})
    records = fleet.records("tt-first")
    run_id = fleet.submit(cfg)
    deadline, written = time.monotonic() + 420, False
    while not written and time.monotonic() < deadline:
        try:
            written = checkpoint.read(records).round == 1
        except checkpoint.CheckpointError:
            time.sleep(0.2)
    assert written, "round 1's checkpoint never appeared"
    restarts = fleet.restarts("superlink")
    os.kill(fleet.main_pid("superlink"), signal.SIGKILL)
    before = rows_of(os.path.join(records, "rounds.jsonl"))
    deadline = time.monotonic() + 120
    while fleet.restarts("superlink") == restarts and time.monotonic() < deadline:
        time.sleep(0.5)
    assert fleet.restarts("superlink") > restarts
    fleet.wait_superlink(120)
    status = fleet.status(run_id)
    if not status.startswith("finished:"):  # whatever of it is left must not write beside the resumed run
        fleet.flwr("stop", str(run_id), "fleet")
    assert status != "finished:completed", status
    fleet.wait_online(list(fleet.node_ids), 240)
    run2 = fleet.submit({**cfg, "run-name": "tt-resumed", "resume-from": "/app/results/tt-first"})
    records2 = fleet.records("tt-resumed")
    completed(fleet, run2, fleet.watch(run2, records2, 420))
    rows = rows_of(os.path.join(records2, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[:2] == before[:2]
    assert rows[2]["clients"] == 3 and rows[2]["rejected"] == 0
    assert checkpoint.read(records2).round == 2
    assert [w["round"] for w in check_wire(records2, [2])] == [2]
