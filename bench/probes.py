"""The benchmark's probes, each in a fresh process with one thread (as a simulation worker has): one real
client round of every method (its own client `train()` on the round-1 message its own server strategy
builds), FedKSeed once more with as many perturbations per step as FedSPZO, plain inference of the same model
over the same batches, and the TT contraction's cost. bench/run.py runs them (`run_probes`) and reads the
results; a probe's process is `python -m bench.probes --child <kind> <spec>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bench.plan import ROOT
from common.methods import get_method


class NodeIds:
    """What a strategy's configure_train asks of the grid: the ids of the connected nodes."""

    def __init__(self, count: int) -> None:
        self.ids = list(range(1, count + 1))

    def get_node_ids(self) -> list[int]:
        return list(self.ids)


def child_messages(spec: dict) -> dict:
    """Write the round-1 message each method's server strategy sends (Flower's protobuf format, no pickle)."""
    from flwr.app import ConfigRecord
    from flwr.common.serde import recorddict_to_proto
    from flwr.supercore.task_identity import TaskIdentity

    from common.config import parse_run_config
    from common.records import RunRecorder
    from server_app.app import build_setup

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # what a ServerApp's runtime sets
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in spec["configs"].items():
            cfg = parse_run_config(overrides)
            setup = build_setup(cfg, RunRecorder(tmp, name, cfg.to_flat()))
            messages = list(setup.strategy.configure_train(1, None, ConfigRecord(), NodeIds(cfg.min_clients)))
            path = os.path.join(spec["folder"], f"{name}.msg")
            with open(path, "wb") as f:
                f.write(recorddict_to_proto(messages[0].content).SerializeToString())
            out[name] = path
    return out


def child_probe(spec: dict) -> dict:
    """One client round (or plain inference over the same batches) in this fresh process, one thread."""
    import torch
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    from common.config import parse_run_config
    from common.memory import PeakRSS
    from common.training import batch, client_data, step_batches
    from common.zeroorder import load_zo_model

    torch.set_num_threads(1)
    cfg = parse_run_config(spec["config"])
    node = {"partition-id": 0, "num-partitions": spec["clients"]}
    if spec["kind"] == "inference":
        with PeakRSS() as mem:
            net = load_zo_model(cfg).loaded.model  # the frozen model in eval mode, no gradients
            encoded, key = client_data(cfg, node)
            batches = step_batches(cfg, len(encoded["labels"]), 1, key)
            start = time.perf_counter()
            with torch.no_grad():
                for idx in batches:
                    net(**batch(encoded, idx))
            seconds = time.perf_counter() - start
        return {"peak_rss_mb": mem.peak_mb, "seconds_per_step": seconds / len(batches), "forward_passes_per_step": 1}
    proto = ProtoRecordDict()
    with open(spec["message"], "rb") as f:
        proto.ParseFromString(f.read())
    reply = get_method(cfg.method).load_client().train(recorddict_from_proto(proto), cfg, node, 1, 1)
    m = reply["metrics"]
    steps, seconds = float(m["local-steps"]), float(m["train-seconds"])
    result = {"peak_rss_mb": float(m["peak-rss-mb"]), "seconds_per_step": seconds / steps, "local_steps": steps}
    if "forward-passes" in m:
        result["forward_passes_per_step"] = float(m["forward-passes"]) / steps
        result["perturb_share"] = float(m["perturb-seconds"]) / seconds
    return result


def child_contraction(spec: dict) -> dict:
    """Microseconds to contract one 384 x 64 TT matrix (rank 4) to dense and back-propagate through it: ours
    (methods.fedtt.tt.tt_to_matrix) and tensorly's tt_to_tensor where tensorly is installed."""
    import torch

    from methods.fedtt.tt import core_shapes, init_cores, mode_sizes, tt_to_matrix

    torch.set_num_threads(1)
    shapes = core_shapes(mode_sizes(384, 64), 4)
    cores = [c.requires_grad_() for c in init_cores(shapes, 1 / 384, torch.Generator().manual_seed(0))]
    fns = {"ours (tt_to_matrix)": lambda: tt_to_matrix(cores, 384, 64)}
    try:
        import tensorly as tl

        tl.set_backend("pytorch")
        fns["tensorly tt_to_tensor"] = lambda: tl.tt_to_tensor(cores).reshape(384, 64)
    except ImportError:
        pass
    out = {}
    for name, fn in fns.items():
        for _ in range(20):
            fn().sum().backward()
        start = time.perf_counter()
        for _ in range(spec["repeats"]):
            fn().sum().backward()
        out[name] = 1e6 * (time.perf_counter() - start) / spec["repeats"]
    return out


def in_child(kind: str, spec: dict, **env: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.probes", "--child", kind, json.dumps(spec)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false", **env},
    )
    if out.returncode != 0:
        raise SystemExit(f"probe {kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


CHILDREN = {"messages": child_messages, "probe": child_probe, "contraction": child_contraction}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="one probe, in this process (bench/run.py starts it)")
    ap.add_argument(
        "--child", nargs=2, required=True, metavar=("KIND", "SPEC"), help=f"one of {sorted(CHILDREN)}, JSON"
    )
    args = ap.parse_args(argv)
    kind, spec = args.child
    print(json.dumps(CHILDREN[kind](json.loads(spec))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
