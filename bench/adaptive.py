"""Benchmark: attackers who adapt to the defence, for all seven methods at their shipped aggregation defaults;
its tables are a section of docs/results-robust.md (bench/adaptive_page.py).

The attackers are omniscient and collude: each round they see every honest reply of the round (their own
honest ones included), know the server's rule, its norm cap and its value bounds, and all send the same reply.
They work in the space the server aggregates: per reply record (the method's `reply_record` and "head"), the
values minus the global values they replace (MethodSpec.attack_reference; a reply that is already an update,
such as zero-order scalars and FedKRSO accumulators, is its values), a key one reply lacks being a zero update
(a record the method aggregates in another form than it sends, MethodSpec.reply_arrays, is sent in that
form: FedKSeed's sparse scalars dense, which its wire accepts). With u_i the honest updates, mu and sigma
their mean and standard deviation per coordinate, and T the largest norm the server lets through unscaled
(norm-cap x the lower median norm of the round's replies, the attackers' included, which the attackers
compute; norm-cap 1 under capped-mean):

- "ALIE" (Baruch et al. 2019, "A little is enough"): mu - z sigma with the paper's z_max for n and f, at least
  1 (z_max is 0 at 1 of 10, which would send the mean);
- "IPM" (Xie et al. 2020, inner-product manipulation): -eps mu with eps as large as T allows;
- "flip under the cap": the attacker's own honest update turned around and scaled to just under T;
- "flip + lying count": the same, claiming 10^12 examples;
- "bias": the attacker's honest update plus a small push, half the round's median norm, against the honest
  mean's direction, every round;
- "bound + 1e12" (not adaptive, bench/robust.py's worst): every value at the wire's bound, away from the global
  value in the direction of the attacker's own update, claiming 10^12 examples.
Every value is held within 0.999 of the wire's bound, so each reply passes every check.

Measured (`--rounds 1`, the default): one round from the same initial model, the honest replies trained once
per method and number of clients and then aggregated by a fresh strategy per scenario; the update ratio is
the norm of the global model's change (every tensor of MethodSpec.global_model) over that of the honest
round, and the deviation is the norm of its difference from the honest round's change over the same. With
`--rounds R` (R > 1) each scenario is a run of R rounds at 1 of 10 whose attackers adapt every round, and the
dev accuracy and loss after the last round are recorded beside the honest run's.

    .venv/bin/python -m bench.adaptive [--methods fedspzo,fedkseed] [--rounds 1] [--rule auto]
    .venv/bin/python -m bench.adaptive --rounds 10 --methods fedspzo --attacks "IPM;bias"
    .venv/bin/python -m bench.robust --report      # the page, both sections, from the records

Records: bench/records/adaptive/<run>.json (committed); a run recorded with the same settings is not run again.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import statistics
import tempfile
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message

from bench.adaptive_page import ATTACKS, FRACTIONS, record_path, records_dir, run_name, shipped_rule
from bench.plan import write_json
from bench.robust import ROOT, NodeList, flat_weights, references, value_bound
from common.config import parse_run_config
from common.evaluation import evaluate
from common.methods import METHODS, get_method
from common.nodestore import STATE_DIR_ENV
from common.records import RunRecorder
from common.robust import lower_median, round_rule
from common.tasks import get_task
from common.training import dev_encoded
from server_app.app import build_setup

LYING_COUNT = 10**12
BIAS = 0.5  # the bias attack's push, in the round's median honest update norms
BOUND_OVERSHOOT = 1e30  # "bound + 1e12": far beyond any wire bound, so every value lands on it


def normal_quantile(p: float) -> float:
    """Phi^-1(p)."""
    return statistics.NormalDist().inv_cdf(p)


def alie_z(n: int, f: int) -> float:
    """ALIE's z_max (Baruch et al. 2019): s = floor(n/2 + 1) - f supporters needed, z = Phi^-1((n - s) / n);
    at least 1."""
    s = n // 2 + 1 - f
    return max(normal_quantile((n - s) / n) if 0 < (n - s) / n < 1 else 0.0, 1.0)


class UpdateSpace:
    """The space the server aggregates in, for one round's replies: every float key of the reply records
    (union over the replies), its shape, and the reference it is measured from."""

    def __init__(self, cfg, contents: Sequence, refs: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        spec = get_method(cfg.method)
        self.cfg, self.refs = cfg, refs
        self.record, self.arrays = spec.reply_record, spec.load_reply_arrays()  # the space the server aggregates in
        self.keys: list[tuple[str, str]] = []
        self.shapes: dict[tuple[str, str], tuple[int, ...]] = {}
        for content in contents:
            for name, arrays in self._records(content).items():
                for key, value in arrays.items():
                    if (name, key) not in self.shapes:
                        self.keys.append((name, key))
                        self.shapes[(name, key)] = value.shape
        self.keys.sort()
        self.sizes = [math.prod(self.shapes[k]) for k in self.keys]

    def _records(self, content) -> dict[str, dict[str, np.ndarray]]:
        out = {}
        for name in (self.record, "head"):
            if name not in content:
                continue
            rec = content[name]
            if name == self.record and self.arrays is not None:
                out[name] = dict(self.arrays(self.cfg, rec))
                continue
            out[name] = {k: rec[k].numpy() for k in rec if rec[k].dtype == "float32"}
        return out

    def _ref(self, name: str, key: str) -> np.ndarray:
        ref = self.refs.get(name, {}).get(key)
        return np.zeros(self.shapes[(name, key)]) if ref is None else np.asarray(ref, np.float64)

    def vector(self, content) -> np.ndarray:
        """A reply's update as one float64 vector (a key it lacks: a zero update)."""
        records = self._records(content)
        parts = []
        for name, key in self.keys:
            value = records.get(name, {}).get(key)
            parts.append(
                np.zeros(math.prod(self.shapes[(name, key)]))
                if value is None
                else (value.astype(np.float64) - self._ref(name, key)).reshape(-1)
            )
        return np.concatenate(parts)

    def write(self, content, update: np.ndarray) -> None:
        """Put `update` into the reply `content` (in place): every key of the space, values held within 0.999 of
        the wire's bound."""
        at = 0
        per_record: dict[str, dict[str, Array]] = {}
        for (name, key), size in zip(self.keys, self.sizes, strict=True):
            bound = 0.999 * value_bound(self.cfg, name)
            values = update[at : at + size].reshape(self.shapes[(name, key)]) + self._ref(name, key)
            at += size
            per_record.setdefault(name, {})[key] = Array(np.clip(values, -bound, bound).astype(np.float32))
        for name, arrays in per_record.items():
            if name == self.record and self.arrays is not None:  # the record as the server aggregates it
                content[name] = ArrayRecord(arrays)
                continue
            rec = content[name] if name in content else ArrayRecord()
            for key, arr in arrays.items():
                rec[key] = arr
            content[name] = rec


def adapt(attack: str, honest: Sequence[np.ndarray], own: np.ndarray, f: int, cap: float) -> tuple[np.ndarray, bool]:
    """The attackers' update for this round from every honest update, and whether they claim 10^12 examples.
    `cap`: the server's norm-cap for the rule applied (0: none)."""
    stack = np.stack(honest)
    mu = stack.mean(axis=0)
    norms = [float(np.linalg.norm(u)) for u in honest]
    # what the server's lower median will be with f attackers above every honest norm
    honest_kept = norms[: len(norms) - f]
    median = lower_median(honest_kept + [math.inf] * f)
    limit = 0.999 * cap * median if cap else 0.999 * max(norms)

    def to_norm(v: np.ndarray, norm: float) -> np.ndarray:
        return v * (norm / max(float(np.linalg.norm(v)), 1e-30))

    n = len(honest)
    if attack == "ALIE":
        out = mu - alie_z(n, f) * stack.std(axis=0)
        if cap and np.linalg.norm(out) > limit:
            out = to_norm(out, limit)
        return out, False
    if attack == "IPM":
        return to_norm(-mu, limit), False
    if attack in ("flip under the cap", "flip + lying count"):
        return to_norm(-own, limit), attack == "flip + lying count"
    if attack == "bias":
        return own + to_norm(-mu, BIAS * lower_median(norms)), False
    if attack == "bound + 1e12":  # write() holds every value at the wire's bound
        return np.where(own >= 0, 1.0, -1.0) * BOUND_OVERSHOOT, True
    raise ValueError(f"unknown attack '{attack}'; choose one of: {', '.join(ATTACKS)}")


def server_cap(cfg, n: int) -> float:
    ag = cfg.aggregation
    return 1.0 if round_rule(n, ag.rule, ag.attackers) == "capped-mean" else ag.norm_cap


def make_cfg(method: str, clients: int, seed: int, rule: str, args, name: str):
    return parse_run_config(
        {
            "method": method, "task": "sst2", "data-dir": args.glue, "results-dir": tempfile.mkdtemp(prefix="adaptive-"),
            "run-name": name, "partitioning": "dirichlet", "dirichlet-alpha": 0.5, "seed": seed,
            "train.local-steps": args.local_steps, "train.batch-size": 16, "train.max-length": args.max_length,
            "min-clients": clients, **({} if rule == "auto" else {"aggregation.rule": rule}),
        }
    )  # fmt: skip


def train_round(cfg, setup, rnd: int, clients: int, seed: int) -> tuple[dict[int, Message], dict[int, object]]:
    """This round's instructions by node, and every node's honest reply content."""
    client = get_method(cfg.method).load_client().train
    msgs = {
        m.metadata.dst_node_id: m for m in setup.strategy.configure_train(rnd, None, ConfigRecord(), NodeList(clients))
    }
    contents = {}
    for node, msg in sorted(msgs.items()):
        part = node - 1
        torch.manual_seed(1_000_003 * seed + 1000 * rnd + part)
        contents[node] = client(msg.content, cfg, {"partition-id": part, "num-partitions": clients}, 1, node)
    return msgs, contents


def honest_updates(cfg, setup, msgs, contents) -> tuple[UpdateSpace, list[np.ndarray]]:
    """The round's update space and every honest reply's update in it, in node order: what every attack on that
    round starts from."""
    nodes = sorted(contents)
    space = UpdateSpace(cfg, [contents[n] for n in nodes], references(cfg, setup, msgs[nodes[0]]))
    return space, [space.vector(contents[n]) for n in nodes]


def attacked(
    cfg, setup, msgs, contents, attack: str | None, f: int, clients: int, honest: tuple | None = None
) -> list[Message]:
    """The round's replies with the last f nodes' replaced by the attackers' (copies: `contents` untouched).
    `honest`: the round's honest_updates where the caller has them already (one_round: once for every scenario)."""
    nodes = sorted(contents)
    replies = {node: copy.deepcopy(contents[node]) for node in nodes}
    if attack is not None and f:
        space, updates = honest if honest is not None else honest_updates(cfg, setup, msgs, contents)
        update, lying = adapt(attack, updates, updates[-1], f, server_cap(cfg, clients))
        for node in nodes[-f:]:
            space.write(replies[node], update)
            if lying:
                replies[node]["metrics"]["num-examples"] = LYING_COUNT
    return [Message(replies[node], reply_to=msgs[node]) for node in nodes]


def fresh(cfg, name: str):
    os.environ[STATE_DIR_ENV] = tempfile.mkdtemp(prefix="adaptive-nodes-")
    recorder = RunRecorder(cfg.results_dir, name, cfg.to_flat())
    return recorder, build_setup(cfg, recorder)


def one_round(method: str, clients: int, seed: int, args) -> list[dict]:
    """Every scenario of `clients` clients for one method, from one set of honest replies."""
    base = make_cfg(method, clients, seed, args.rule, args, f"adaptive-{method}-{clients}")
    recorder, setup = fresh(base, "honest")
    w0 = flat_weights(base, setup)
    start = time.perf_counter()
    msgs, contents = train_round(base, setup, 1, clients, seed)
    train_seconds = time.perf_counter() - start
    honest = honest_updates(base, setup, msgs, contents)  # the same round for every scenario
    scenarios = [(None, 0)] + [
        (a, f) for a in args.attacks for fr, (n, f) in FRACTIONS.items() if n == clients and fr in args.fractions
    ]
    honest_delta = None
    out = []
    for attack, f in scenarios:
        recorder, setup = fresh(
            base, run_name(method, attack, f, clients, 1, applied_rule(method, clients, args.rule), seed)
        )
        new_msgs = {
            m.metadata.dst_node_id: m
            for m in setup.strategy.configure_train(1, None, ConfigRecord(), NodeList(clients))
        }
        for node, m in new_msgs.items():  # the same instructions as the ones the honest replies answer
            assert dict(m.content["config"]) == dict(msgs[node].content["config"]), "instructions are not deterministic"
        setup.strategy.aggregate_train(1, attacked(base, setup, new_msgs, contents, attack, f, clients, honest))
        row = recorder.end_round(1, None)
        delta = (flat_weights(base, setup) - w0).numpy()
        if attack is None:
            honest_delta = delta
        h = float(np.linalg.norm(honest_delta))
        out.append(
            {
                "method": method, "attack": attack, "hostile": f, "clients": clients, "seed": seed, "rounds": 1,
                "rule": round_rule(clients, base.aggregation.rule, base.aggregation.attackers),
                "settings": settings_of(args), "update_norm": float(np.linalg.norm(delta)), "honest_norm": h,
                "ratio": float(np.linalg.norm(delta)) / h if h else None,
                "deviation": float(np.linalg.norm(delta - honest_delta)) / h if h else None,
                "finite": bool(np.isfinite(delta).all()), "clipped": row.get("clipped"), "rejected": row.get("rejected"),
                "train_seconds": train_seconds, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
        )  # fmt: skip
        r = out[-1]
        print(f"{method} {attack or 'honest'} {f} of {clients}: ratio {r['ratio']:.2f}, deviation {r['deviation']:.2f}, "
              f"clipped {r['clipped']}, rejected {r['rejected']}", flush=True)  # fmt: skip
    return out


def many_rounds(method: str, attack: str | None, f: int, clients: int, seed: int, args, dev) -> dict:
    """A run of args.rounds rounds whose attackers adapt every round; the dev accuracy and loss at its end."""
    name = run_name(method, attack, f, clients, args.rounds, applied_rule(method, clients, args.rule), seed)
    cfg = make_cfg(method, clients, seed, args.rule, args, name)
    recorder, setup = fresh(cfg, name)
    start = time.perf_counter()
    rows = []
    for rnd in range(1, args.rounds + 1):
        msgs, contents = train_round(cfg, setup, rnd, clients, seed)
        setup.strategy.aggregate_train(rnd, attacked(cfg, setup, msgs, contents, attack, f, clients))
        rows.append(recorder.end_round(rnd, None))
        print(f"{name} round {rnd}: clipped {rows[-1].get('clipped')}, failed {rows[-1].get('failed')}", flush=True)
    result = evaluate(setup.model, dev, get_task("sst2"), 64)
    print(f"{name}: accuracy {100 * result['accuracy']:.2f}, loss {result['loss']:.3f}", flush=True)
    return {
        "method": method, "attack": attack, "hostile": f, "clients": clients, "seed": seed, "rounds": args.rounds,
        "rule": round_rule(clients, cfg.aggregation.rule, cfg.aggregation.attackers), "settings": settings_of(args),
        **result, "finite": bool(torch.isfinite(flat_weights(cfg, setup)).all()), "round_rows": rows,
        "seconds": time.perf_counter() - start, "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }  # fmt: skip


def settings_of(args) -> dict:
    """What a record's figures depend on besides its name (method, rule applied, attack, fraction, rounds)."""
    return {"local_steps": args.local_steps, "max_length": args.max_length}


def applied_rule(method: str, clients: int, rule: str) -> str:
    """The rule rounds of `clients` replies apply under --rule (auto: the method's shipped one)."""
    if rule == "auto":
        return shipped_rule(method, clients)
    ag = parse_run_config({"method": method, "aggregation.rule": rule}).aggregation
    return round_rule(clients, ag.rule, ag.attackers)


def recorded(path: str, args) -> bool:
    import json

    try:
        with open(path) as f:
            return json.load(f).get("settings") == settings_of(args)
    except (OSError, ValueError, AttributeError):
        return False


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--attacks", default=";".join(ATTACKS), help="';'-separated, of: " + "; ".join(ATTACKS))
    p.add_argument("--fractions", default=";".join(FRACTIONS), help="';'-separated, of: " + "; ".join(FRACTIONS))
    p.add_argument("--rounds", type=int, default=1, help="1: the one-round ratios; R > 1: runs of R rounds at 1 of 10")
    p.add_argument("--rule", default="auto", help="aggregation.rule of every run (auto: each method's default)")
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--glue", default=os.environ.get("GLUE_DIR", os.path.join(ROOT, "..", "shared", "data", "glue")))
    args = p.parse_args(argv)
    args.attacks = [a for a in args.attacks.split(";") if a]  # "": the honest runs only
    args.fractions = args.fractions.split(";")
    methods = args.methods.split(",")
    for what, given, known in (("method", methods, METHODS), ("attack", args.attacks, ATTACKS), ("fraction", args.fractions, FRACTIONS)):  # fmt: skip
        for x in given:
            if x not in known:
                raise SystemExit(f"error: unknown {what} '{x}'; choose from: {'; '.join(known)}")
    if args.rounds < 1:
        raise SystemExit(f"error: --rounds must be >= 1, got {args.rounds}")
    from flwr.supercore.task_identity import TaskIdentity  # what the ServerApp runtime sets for Messages

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    folder = records_dir(ROOT)
    os.makedirs(folder, exist_ok=True)
    if args.rounds == 1:
        for method in methods:
            for clients in sorted({FRACTIONS[fr][0] for fr in args.fractions}, reverse=True):
                names = [run_name(method, None, 0, clients, 1, applied_rule(method, clients, args.rule), args.seed)] + [
                    run_name(method, a, f, clients, 1, applied_rule(method, clients, args.rule), args.seed)
                    for a in args.attacks
                    for fr, (n, f) in FRACTIONS.items()
                    if n == clients and fr in args.fractions
                ]
                if all(recorded(record_path(folder, n), args) for n in names):
                    print(f"{method}, {clients} clients: recorded, not run again", flush=True)
                    continue
                for r in one_round(method, clients, args.seed, args):
                    write_json(
                        record_path(
                            folder, run_name(method, r["attack"], r["hostile"], clients, 1, r["rule"], args.seed)
                        ),
                        r,
                    )
        return
    dev = None
    for method in methods:
        for attack, f in [(None, 0)] + [(a, 1) for a in args.attacks]:
            path = record_path(
                folder, run_name(method, attack, f, 10, args.rounds, applied_rule(method, 10, args.rule), args.seed)
            )
            if recorded(path, args):
                print(f"{path}: recorded, not run again", flush=True)
                continue
            if dev is None:
                dev = dev_encoded(
                    parse_run_config({"task": "sst2", "data-dir": args.glue, "train.max-length": args.max_length})
                )
            write_json(path, many_rounds(method, attack, f, 10, args.seed, args, dev))


if __name__ == "__main__":
    main()
