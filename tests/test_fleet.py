"""The fleet of docker-compose.yml on this machine (scripts/fleet/namespaces.py): SuperLink, ServerApp executor and three
SuperNodes with their ClientApp executors as separate processes, each pod in its own network namespace, TLS
and SuperNode authentication on, every command derived from docker-compose.yml.

One fleet serves the whole module (start-up ~12 s); every method not run on Docker (tests/test_compose.py)
runs 1 round of the tiny BERT (~35-45 s each here), then the edge profile. Marker `fleet`: `make test-fleet`
(in .ci/run), outside `make test` so that the suite stays within its 15 minutes.
Needs root (`ip netns`), openssl and ssh-keygen; skipped with the reason where any is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from common.methods import known
from harness.fakes import assert_wire_covers_messages

pytestmark = [pytest.mark.system, pytest.mark.e2e, pytest.mark.fleet]

# FedSPZO and FedTT+ run on a real Docker engine (tests/test_compose.py), as do the faults: a SuperNode killed
# mid-round that trains the next round and replays the round it missed to the server's model (FedKRSO), and the
# SuperLink killed and the run continued with resume-from (FedTT+).
PLAIN = [*known("fedkrso", "fedavg", "fedkseed", "fedtt", "fedavg-lora")]


def _missing() -> str:
    if os.geteuid() != 0:
        return "needs root for ip netns"
    for tool in ("ip", "openssl", "ssh-keygen", "taskset"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    res = subprocess.run(["ip", "netns", "list"], capture_output=True)
    return "" if res.returncode == 0 else "ip netns does not work here"


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, glue_dir):
    if why := _missing():
        pytest.skip(why)
    from scripts.fleet.namespaces import NamespaceFleet

    with NamespaceFleet(str(tmp_path_factory.mktemp("fleet")), glue_dir=glue_dir) as f:
        f.up()
        yield f


def base_config(tiny_bert, glue_dir, results, **extra):
    return {
        "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "results-dir": str(results),
        "train.local-steps": 2, "krso.intervals": 2, "train.batch-size": 8, "train.max-length": 32,
        "eval.max-examples": 32, "tt.bottleneck": 8, "spzo.split-layer": 1, "spzo.p1": 0, "spzo.p2": 2,
        "zo.lr": 1e-3, "min-clients": 3, "round-timeout": 120.0, **extra,
    }  # fmt: skip


def rounds_of(records):
    with open(os.path.join(records, "rounds.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def wire_of(records):
    with open(os.path.join(records, "wire.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def run(fleet, config, timeout=300, on_round=None):
    run_id = fleet.submit(config)
    records = os.path.join(config["results-dir"], config["run-name"])
    return run_id, records, fleet.watch(run_id, records, timeout, on_round)


def assert_completed(fleet, run_id, status):
    assert status == "finished:completed", (
        f"{status}\n{fleet.flwr('log', str(run_id), 'fleet', '--show').stdout[-3000:]}"
    )


def assert_wire(fleet, records, rounds):
    """wire.jsonl has every round; a trained round's wire bytes cover its messages; overhead is measured."""
    wire = wire_of(records)
    assert [w["round"] for w in wire] == rounds
    # The wire carries the messages plus HTTP, TLS and polling: never less than the messages themselves, counted
    # from the start through each round. WireLog books the counters when it sees a round's row, which is written
    # after the round's messages went, so a round's bytes are never booked later than that round; but a row seen
    # late books the next round's first bytes with it (seen once: FedAvg's round 1 read 7.0 MB on the wire
    # against 12.2 MB of messages), so round by round the wire can read less than the messages while every sum
    # through a round holds.
    assert_wire_covers_messages(wire)
    for w in wire[1:]:
        assert w["message_bytes_down"] > 0 and w["message_bytes_up"] > 0, w
        assert w["tls"] and 0 < w["slowest_client_train_seconds"] < w["round_seconds"] and w["overhead_seconds"] > 0
    return wire


def test_commands_come_from_docker_compose(fleet):
    """What runs is docker-compose.yml's command, translated: no flag of the file is dropped or added."""
    from scripts.fleet.compose import COMPOSE, load_compose

    raw = load_compose(COMPOSE, {"GLUE_DIR": "/data/glue"}, "/volumes")  # required by the file
    assert {s.kind for s in raw.values() if not s.holder} == {"superlink", "supernode", "superexec"}
    # every Flower service runs in a pod whose namespace a holder owns, so a restart of one keeps the pair
    assert all(raw[s.pod].holder for s in raw.values() if not s.holder)
    assert len([s for s in raw.values() if s.kind == "supernode"]) >= 3
    for name, service in fleet.services.items():
        if service.holder:
            continue
        cmd = fleet.command(name)
        assert os.path.basename(cmd[0]) == service.binary
        flags = [a for a in cmd[1:] if a.startswith("--")]
        assert flags == [a for a in raw[name].command if a.startswith("--")]
    link = fleet.command("superlink")
    assert "--enable-supernode-auth" in link and "--ssl-certfile" in link and "--insecure" not in link
    assert "--disable-runtime-dependency-installation" in link
    node = fleet.command("supernode-1")
    assert node[node.index("--superlink") + 1] == fleet.superlink_address()
    assert os.path.isfile(node[node.index("--auth-supernode-private-key") + 1])
    # every pod in its own namespace with its own address
    assert len(set(fleet.addr.values())) == len(fleet.pods) == 4


def test_unregistered_key_is_refused(fleet):
    """A SuperNode whose key was never registered is refused by the SuperLink: Flower's exit code 305."""
    from scripts.fleet import BIN, ROOT
    from scripts.fleet.compose import translate
    from scripts.fleet.flwr_cli import flwr_env, sh_env

    keys = os.path.join(fleet.workdir, "intruder")
    sh_env(["bash", "deploy/make-keys.sh", "--name", "intruder", keys], os.environ, cwd=ROOT)
    service = fleet.services["supernode-1"]
    args = [translate(a, fleet.hosts(), fleet.pod_volumes(service.pod)) for a in service.command]
    args[args.index("--auth-supernode-private-key") + 1] = os.path.join(keys, "intruder")
    args[args.index("--port") + 1] = "9199"
    home = os.path.join(fleet.workdir, "intruder-home")
    os.makedirs(home, exist_ok=True)
    res = subprocess.run(
        ["ip", "netns", "exec", fleet.ns[fleet.superlink.pod], os.path.join(BIN, "flower-supernode"), *args, "--max-retries", "2"],
        env=flwr_env(home), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    out = res.stdout + res.stderr
    # Flower logs exit code 305 (the process itself ends with 1 after its HTTP server shuts down)
    assert res.returncode != 0 and "Exit Code: 305" in out and "Failed to activate SuperNode" in out, out[-3000:]
    nodes = fleet.flwr("supernode", "list", "fleet", "--format", "json")
    listed = json.loads(nodes.stdout)["nodes"]  # the three registered keys, the intruder not among them
    assert len(listed) == 3 and all(n["status"] == "online" for n in listed), nodes.stdout[-2000:]


@pytest.mark.parametrize("method", PLAIN)
def test_every_method_through_flwr_run(fleet, method, tiny_bert, glue_dir, tmp_path):
    """Each method, one round, through `flwr run . fleet`: final status from `flwr ls`, records and wire bytes.
    (FedSPZO and FedTT+ run through the same checks on Docker, tests/test_compose.py.)"""
    cfg = base_config(tiny_bert, glue_dir, tmp_path, method=method, **{"num-server-rounds": 1, "run-name": method})
    run_id, records, status = run(fleet, cfg)
    assert_completed(fleet, run_id, status)
    rows = rounds_of(records)
    assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 3 and rows[1]["rejected"] == 0
    wire = assert_wire(fleet, records, [0, 1])
    assert all(wire[1]["namespaces"][p]["received"] > 0 for p in fleet.node_pods())


def test_edge_profile_one_core_4gb(tiny_bert, glue_dir, tmp_path):
    """The edge profile of scripts/edge_profile.py on its own fleet (one SuperNode): the SuperNode's pod is pinned
    to one core and held in a 4096 MB memory cgroup; a FedAvg round (the method that carries the whole model)
    completes inside it without an OOM kill, and the cgroup's peak is measured. The MiniLM figures in
    deploy/README.md come from the same function over every method."""
    if why := _missing():
        pytest.skip(why)
    from scripts.edge_profile import profile

    extra = base_config(tiny_bert, glue_dir, tmp_path, **{"min-clients": 1})
    for key in ("data-dir", "results-dir"):  # the profile's own
        extra.pop(key)
    row = profile("fedavg", glue_dir, 4096, 1, extra, str(tmp_path))
    assert row["status"] == "finished:completed" and row["fits"] and row["oom_kills"] == 0, row
    assert row["cpus_allowed"] == ["0"]  # SuperNode, executor (and the ClientApps they start): one core
    assert 0 < row["cgroup_peak_mb"] < 4096 and row["round_seconds"] > row["client_train_seconds"] > 0
