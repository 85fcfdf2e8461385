"""bench/scale.py's measurement 3 (its docstring says what and how): the server's memory and aggregation time
against the number of replies, and how often the aggregation reads each reply (harness.readcount)."""

from __future__ import annotations

import contextlib
import copy
import gc
import time
import tracemalloc

from bench.scale_setup import fresh_nodes, run_config
from common.methods import get_method

MODES = ("timed", "traced", "counted")  # one fresh strategy each: the counting costs time and memory


def one_aggregation(method: str, n: int, model: str, work: str, mode: str, rule: str) -> dict:
    """A fresh strategy's rounds 1 and 2 under `rule` with n replies each (copies of node 1's real reply to that
    round, made before the round's aggregate_train, in a list as Flower hands them over). Round 1's replies
    come from nodes the server has not seen (the log methods add each to their map of the rounds nodes hold);
    round 2's from the same nodes again, the round of a fleet running. Returns per round the seconds, and the
    MB of the reply Messages; `mode` "traced": per round tracemalloc's peak MB of what aggregate_train
    allocated (`mb`, else 0); "counted": per round how often it read each reply (`reads`,
    harness.readcount), in a call of its own, neither timed nor traced, since the counting costs both."""
    from flwr.app import ConfigRecord, Message

    from common.config import parse_run_config
    from common.records import RunRecorder
    from common.wire import content_bytes
    from harness.fakes import NodeList, client_reply
    from harness.readcount import counted_reads
    from server_app.app import build_setup

    fresh_nodes(work)
    name = f"{method}-{rule}-agg-{n}-{mode}"
    cfg = parse_run_config(run_config(method, model, work, name, 2, **{"aggregation.rule": rule}))
    setup = build_setup(cfg, RunRecorder(work, name, cfg.to_flat()))
    train = get_method(method).load_client().train
    traced, out = mode == "traced", {"seconds": [], "mb": [], "reads": []}
    for server_round in (1, 2):
        messages = list(setup.strategy.configure_train(server_round, None, ConfigRecord(), NodeList(range(1, n + 1))))
        template = client_reply(train, cfg, messages[0], {1: 0}).content
        replies = [Message(copy.deepcopy(template), reply_to=msg) for msg in messages]  # Flower's list
        out["messages_mb"] = n * content_bytes(template) / 2**20
        counting = counted_reads(setup.strategy) if mode == "counted" else contextlib.nullcontext()
        gc.collect()  # the same start for every point: no garbage, the interpreter's free lists emptied
        if traced:
            tracemalloc.start()
        start = time.perf_counter()
        try:
            with counting as reads:
                _, metrics = setup.strategy.aggregate_train(server_round, replies)
            out["seconds"].append(time.perf_counter() - start)
            out["mb"].append(tracemalloc.get_traced_memory()[1] / 2**20 if traced else 0.0)
        finally:
            if traced:
                tracemalloc.stop()
        if metrics is None or metrics["clients"] != n:
            raise RuntimeError(f"{method}: round {server_round} of {n} replies did not aggregate them all")
        if reads is not None:
            out["reads"].append(reads.summary(replies))
        del replies, messages
    return out


def reply_arrays(model: str, work: str) -> tuple[dict, dict]:
    """FedAvg's reply as the strategy decodes it (name -> float32 array) and the global arrays it replaces."""
    from flwr.app import ConfigRecord

    from common.config import parse_run_config
    from common.records import RunRecorder
    from harness.fakes import NodeList, client_reply
    from server_app.app import build_setup

    fresh_nodes(work)
    cfg = parse_run_config(run_config("fedavg", model, work, "fedavg-mean", 1))
    setup = build_setup(cfg, RunRecorder(work, "fedavg-mean", cfg.to_flat()))
    msg = list(setup.strategy.configure_train(1, None, ConfigRecord(), NodeList([1])))[0]
    reply = client_reply(get_method("fedavg").load_client().train, cfg, msg, {1: 0}).content
    return {k: a.numpy() for k, a in reply["arrays"].items()}, {k: a.numpy() for k, a in msg.content["arrays"].items()}


def mean_alone(counts: list[int], model: str, work: str, limit_mb: float) -> dict:
    """common.robust's mean of n FedAvg replies (norm-cap 2 as shipped): streaming, each reply made when it is
    read (a lazy sequence, read twice), against the in-memory path given a list of them."""
    import numpy as np

    from common import robust

    template, reference = reply_arrays(model, work)
    size_mb = sum(a.nbytes for a in template.values()) / 2**20

    class Lazy:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __iter__(self):
            for i in range(self.n):
                yield {k: (v + np.float32(1e-3 * (i % 7))) for k, v in template.items()}

    out = {"streaming": {"replies": [], "mb": [], "seconds": []}, "in_memory": {"replies": [], "mb": []}}
    for n in counts:
        weights = [1.0 + i % 5 for i in range(n)]
        for kind in ("streaming", "in_memory"):
            if kind == "in_memory" and n * size_mb > limit_mb / 4:
                continue
            replies = Lazy(n) if kind == "streaming" else list(Lazy(n))
            tracemalloc.start()
            start = time.perf_counter()
            if kind == "streaming":
                robust.aggregate_round(replies, weights, norm_cap=2.0, reference=reference)
            else:
                robust._aggregate_all(replies, weights, "mean", 0, 2.0, 0.0, reference)
            seconds = time.perf_counter() - start
            peak = tracemalloc.get_traced_memory()[1] / 2**20
            tracemalloc.stop()
            del replies
            out[kind]["replies"].append(n)
            out[kind]["mb"].append(peak + (n * size_mb if kind == "in_memory" else 0.0))
            if kind == "streaming":
                out[kind]["seconds"].append(seconds)
        print(f"mean of {n} FedAvg replies: streaming {out['streaming']['mb'][-1]:.1f} MB", flush=True)
    out["reply_mb"] = size_mb
    return out


def server_scaling(
    method: str, counts: list[int], model: str, work: str, limit_mb: float, reply_mb: float, rule: str = "mean"
) -> dict:
    """Measurement 3 for one method under `rule`; points whose Messages (and, under a robust rule, decoded
    replies) would exceed limit_mb are left out (and said). Per point three fresh strategies: timed, traced,
    counted (`reads`, `first_round_reads`: harness.readcount's summary of round 2's and round 1's reads)."""
    out = {"rule": rule, "replies": [], "mb": [], "first_round_mb": [], "messages_mb": [], "seconds": [],
           "first_round_seconds": [], "reads": [], "first_round_reads": [], "left_out": []}  # fmt: skip
    for n in counts:
        if (1.5 if rule == "mean" else 2.5) * n * reply_mb > limit_mb:  # the Messages (+ the replies held)
            out["left_out"].append(n)
            continue
        timed, traced, counted = (one_aggregation(method, n, model, work, mode, rule) for mode in MODES)
        out["replies"].append(n)
        out["mb"].append(traced["mb"][1])  # round 2: the nodes known
        out["first_round_mb"].append(traced["mb"][0])
        out["messages_mb"].append(traced["messages_mb"])
        out["seconds"].append(timed["seconds"][1])
        out["first_round_seconds"].append(timed["seconds"][0])
        out["first_round_reads"].append(counted["reads"][0])
        out["reads"].append(counted["reads"][1])
        r = counted["reads"][1]
        print(
            f"{method} ({rule}): {n} replies, peak {traced['mb'][1]:.3f} MB (round 1: {traced['mb'][0]:.3f}), "
            f"{timed['seconds'][1]:.2f} s; a reply's metrics validated {r['metrics']}, its update decoded "
            f"{r['decoded']} in {r['passes']} passes",
            flush=True,
        )
    return out
