"""aarch64 (Raspberry Pi / Jetson CPU) nodes, run here under qemu user-mode emulation (scripts/arm64_env.sh).

- The seeded draws every node reproduces (scripts/rng_draws.py) hash the same on aarch64 as on x86_64.
- The real ClientApp trains one local step of every method on aarch64, on instructions the x86_64 strategies
  built, and its replies pass the x86_64 strategies' checks.
- A node that catches up by replaying the update log holds, on aarch64, the model the x86_64 node holds: bit
  for bit for the zero-order methods (z is the same bits, θ + α·z two correctly rounded operations), to 1e-6 for
  FedKRSO (W + B P is a matrix product, whose summation order is the BLAS library's).

All of it runs in ONE emulated process (scripts/client_jobs.py --draws): starting Python and importing torch and
transformers under qemu takes most of a minute. The emulation is built on first use (about 250 MB of Debian and
PyPI packages, cached outside the repository); the tests skip, saying why, only where it cannot be built (not
x86_64, no root, no apt or no qemu). Both tests are `e2e`: the emulated process takes about 1.5 minutes.
"""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.supercore.task_identity import TaskIdentity

from common.config import parse_run_config
from common.methods import KEEPS_MODEL, METHODS, known
from common.nodestore import NodeStore, state_dir
from common.records import RunRecorder
from harness.fakes import NodeList
from scripts.arm64_emulation import ROOT, EmulationUnavailable, emulated_python, start_arm64
from scripts.client_jobs import load_message, run_job, save_message
from scripts.rng_draws import draws

pytestmark = pytest.mark.system

# One local step of every registered method on a tiny model: COMMON, then the method's SETTINGS where it has
# any; the zero-order methods cover both laws of z.
COMMON = {
    "task": "rte", "train.local-steps": 1, "train.batch-size": 4, "train.max-length": 32, "train.lr": 1e-3,
    "min-clients": 1, "eval.max-examples": 8,
}  # fmt: skip
SETTINGS = {
    "fedkrso": {"krso.k": 2, "krso.rank": 4, "krso.intervals": 1},
    "fedspzo": {
        "spzo.split-layer": 1,
        "spzo.p1": 1,
        "spzo.p2": 2,
        "zo.distribution": "gaussian",
        "zo.lr": 1e-2,
        "zo.params": "all",
    },  # both blocks perturbed: the two-block path
    "fedkseed": {"kseed.k": 16, "zo.lr": 1e-2},
    "fedtt": {"tt.bottleneck": 8, "tt.rank": 3},
    "fedtt-plus": {"tt.bottleneck": 8, "tt.rank": 3},
}
known(*SETTINGS)  # a renamed method fails here rather than silently running at other settings


def _setup(method, tiny_bert, glue_dir, tmp_path, tag):
    from server_app.app import build_setup

    run_config = {"method": method, "model": tiny_bert, "data-dir": glue_dir, **COMMON, **SETTINGS.get(method, {})}
    run_config |= {"results-dir": str(tmp_path / "results"), "run-name": f"{method}-{tag}"}
    cfg = parse_run_config(run_config)
    setup = build_setup(cfg, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    return run_config, cfg, setup


def _instruction(setup, server_round, node):
    return next(iter(setup.strategy.configure_train(server_round, ArrayRecord(), ConfigRecord(), NodeList([node]))))


def _held(cfg, node_config, node):
    """The global model a node holds on its disk (replayed methods)."""
    from common.zeroorder import fingerprint
    from methods.fedkrso.model import build as krso_build
    from methods.fedkrso.model import fingerprint as krso_fingerprint

    if cfg.method == "fedkrso":
        tensors, fp = krso_build(cfg).target_weights(), krso_fingerprint(cfg)
    else:
        from methods.fedkseed.kseed import build as kseed_build
        from methods.fedspzo.spzo import build as spzo_build

        tensors = (spzo_build if cfg.method == "fedspzo" else kseed_build)(cfg).params
        fp = fingerprint(cfg, cfg.method)
    store = NodeStore(state_dir(node_config, 1, node), f"{cfg.method}-state", fp)
    reached = store.load(tensors)
    return reached, {n: t.detach().clone() for n, t in tensors.items()}


@pytest.fixture(scope="module")
def aarch64_run(tiny_bert, glue_dir, tmp_path_factory) -> dict:
    """Builds every method's instructions here (x86_64), runs the ClientApp on them and hashes the seeded draws
    in one emulated aarch64 process, started first so that its start-up (most of a minute under qemu) overlaps
    with the work here; returns what the tests check."""
    try:
        python = emulated_python()
    except EmulationUnavailable as exc:
        pytest.skip(str(exc))
    tmp_path = tmp_path_factory.mktemp("arm64")
    log, summary_path = tmp_path / "arm64.log", tmp_path / "summary.json"
    proc = start_arm64(
        python, "-m", "scripts.client_jobs", "-", "--draws", tiny_bert, "--summary", str(summary_path), log=str(log)
    )
    try:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # Messages outside a runtime
        jobs, checks, replays = [], {}, {}
        arm_nodes = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "arm64-nodes")}
        x86_nodes = {"partition-id": 0, "num-partitions": 2, "state-dir": str(tmp_path / "x86-nodes")}
        for method in METHODS:
            run_config, cfg, setup = _setup(method, tiny_bert, glue_dir, tmp_path, method)
            if method not in KEEPS_MODEL:
                # round 1: node 101 trains one step on aarch64; its reply goes back to this strategy
                path = str(tmp_path / f"{method}-1")
                save_message(_instruction(setup, 1, 101), path + ".msg")
                jobs.append(
                    {"name": f"{method} round 1", "run_config": run_config, "node_config": arm_nodes, "run_id": 1,
                     "node_id": 101, "message": path + ".msg", "reply": path + ".arm"}
                )  # fmt: skip
                checks[method] = (setup, 1, path + ".arm")
                continue
            # x86 node 102 trains round 1; node 103, new, gets round 2's instruction with the whole log, replays
            # it (on aarch64 and here) and trains one step; the aarch64 reply goes back to this strategy
            path = str(tmp_path / f"{method}-1")
            save_message(_instruction(setup, 1, 102), path + ".msg")
            run_job({"run_config": run_config, "node_config": {**x86_nodes, "partition-id": 1}, "run_id": 1,
                     "node_id": 102, "message": path + ".msg", "reply": path + ".x86"})  # fmt: skip
            setup.strategy.aggregate_train(1, [load_message(path + ".x86")])
            setup.strategy.recorder.end_round(1, None)
            path = str(tmp_path / f"{method}-2")
            save_message(_instruction(setup, 2, 103), path + ".msg")
            job = {"run_config": run_config, "node_id": 103, "run_id": 1, "message": path + ".msg"}
            jobs.append({**job, "name": f"{method} replay", "node_config": arm_nodes, "reply": path + ".arm"})
            run_job({**job, "node_config": x86_nodes, "reply": path + ".x86"})
            checks[method] = (setup, 2, path + ".arm")
            replays[method] = cfg
        proc.communicate(json.dumps(jobs), timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()[-5000:]
    summary = json.loads(summary_path.read_text())
    print(f"aarch64 (emulated) seconds per ClientApp call: {summary['seconds']}")
    return {"summary": summary, "checks": checks, "replays": replays, "arm": arm_nodes, "x86": x86_nodes}


@pytest.mark.e2e
def test_seeded_draws_are_bit_identical_on_aarch64(aarch64_run, tiny_bert):
    there, here = aarch64_run["summary"]["draws"], draws(tiny_bert)
    assert set(there) == set(here)
    diff = [k for k in here if not k.startswith("control:") and here[k] != there[k]]
    assert not diff, f"draws differ between x86_64 and aarch64: {diff}"
    # the control: torch's own Gaussian kernel on aarch64 is not the one this x86_64 process uses
    if torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        assert here["control:torch.randn"] != there["control:torch.randn"]


@pytest.mark.e2e
def test_every_method_trains_on_aarch64_and_replays_like_x86(aarch64_run):
    summary, arm_nodes, x86_nodes = aarch64_run["summary"], aarch64_run["arm"], aarch64_run["x86"]
    with open(os.path.join(ROOT, "Makefile")) as f:  # the torch a Raspberry Pi gets from `make install`
        pi_torch = re.search(r"^TORCH_AARCH64 \?= torch==(\S+)", f.read(), re.M).group(1)
    assert summary["machine"] == "aarch64" and summary["torch"].split("+")[0] == pi_torch, summary
    assert set(summary["seconds"]) == {f"{m} round 1" if m not in KEEPS_MODEL else f"{m} replay" for m in METHODS}

    for method, (setup, server_round, reply_path) in aarch64_run["checks"].items():
        reply = load_message(reply_path)
        assert not reply.has_error(), f"{method}: {reply.error.reason}"
        setup.strategy.aggregate_train(server_round, [reply])
        rec = setup.strategy.recorder.end_round(server_round, None)
        assert (rec["clients"], rec["rejected"], rec["failures"]) == (1, 0, 0), f"{method}: {rec}"
        assert rec["bytes_up"] > 0

    for method, cfg in aarch64_run["replays"].items():
        reached_arm, arm = _held(cfg, arm_nodes, 103)
        reached_x86, x86 = _held(cfg, x86_nodes, 103)
        assert reached_arm == reached_x86 == 1, method
        assert arm.keys() == x86.keys()
        if method == "fedkrso":  # W + B P: a matrix product on each CPU's BLAS
            for name in arm:
                torch.testing.assert_close(arm[name], x86[name], rtol=0, atol=1e-6)
        else:
            differ = [n for n in arm if not torch.equal(arm[n], x86[n])]
            assert not differ, f"{method}: the aarch64 node's replayed parameters differ from x86_64's in {differ}"
