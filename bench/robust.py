"""Benchmark: what the shipped aggregation defaults cost (honest clients) and hold (hostile ones), for all seven
methods; writes docs/results-robust.md.

Each run drives the method's real server strategy and the real client code (both named by its entry in
common/methods.py) in one process, the way tests/test_hostile.py does, on SST-2 with the embedded
MiniLM, Dirichlet alpha 0.5 over labels, the same seed and steps for every run, every `aggregation.*` key at
its shipped default (`--rules` adds other rules). The server evaluates the global model on the whole SST-2
dev split after the last round. Scenarios: 10, 5 and 3 honest clients, each attack at 1 hostile client
of 10 and 2 of 5, and the last attack at 1 of 3. A hostile client trains its honest reply, then sends what passes every wire check
and hurts most (`attack`): every value at the bound, away from the global value; its update turned around and
scaled until its largest value reaches the bound; or the first, claiming num-examples = 1e12. Two hostile
clients send the same (they collude). Measured: the norm of the first round's global update over that of the
honest run with as many clients, the dev loss and accuracy after the last round, and whether the model is
finite; "the model" is every tensor the method declares its global model (MethodSpec.global_model: FedTT's
cores, on forward hooks, included), and what an attack is measured from is the method's declaration too
(attack_reference, reference_values, value_bound).

    .venv/bin/python -m bench.robust [--rounds 3] [--local-steps 8] [--methods fedkrso,fedavg] [--rules mean]
    .venv/bin/python -m bench.robust --report     # the page from the records, nothing run

Each finished run is recorded in bench/records/robust/<run>.json (committed); a rerun reads the runs recorded
with the same settings and runs only the rest, so the table can be continued on any machine.
Seven methods x 10 scenarios of 3 rounds is 70 runs: about an hour on 2 cores; `--methods` and `--scenarios`
cut it down.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import numpy as np
import torch
from flwr.app import Array, ConfigRecord, Message

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from bench import adaptive_page  # noqa: E402
from bench.adaptive_page import shipped_rule  # noqa: E402
from bench.claims import NOT_RUN, paired_differences, sample_sd, verdict  # noqa: E402
from bench.plan import write_json  # noqa: E402
from common.config import parse_run_config  # noqa: E402
from common.evaluation import evaluate  # noqa: E402
from common.methods import METHODS, MethodError, get_method  # noqa: E402
from common.nodestore import STATE_DIR_ENV  # noqa: E402
from common.records import RunRecorder  # noqa: E402
from common.robust import RULES  # noqa: E402
from common.tasks import get_task  # noqa: E402
from common.training import dev_encoded  # noqa: E402
from server_app.app import build_setup  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
ATTACKS = ("bound", "sign flip", "bound + 1e12")
SCENARIOS = {  # name -> (clients, hostile, attack)
    "honest, 10": (10, 0, None),
    "honest, 5": (5, 0, None),
    "honest, 3": (3, 0, None),
    **{f"{a}, 1 of 10": (10, 1, a) for a in ATTACKS},
    **{f"{a}, 2 of 5": (5, 2, a) for a in ATTACKS},
    "bound + 1e12, 1 of 3": (3, 1, "bound + 1e12"),
}
# The aim at the shipped defaults: one hostile client of three or of ten at the bounds claiming 10^12 examples
# leaves the final dev loss within LOSS_MARGIN of the honest run's with as many clients.
AIM_SCENARIOS = ("bound + 1e12, 1 of 10", "bound + 1e12, 1 of 3")
LOSS_MARGIN = 0.05
STATE_DICT = "common.modeling:model_tensors"  # the global_model of a method whose model's state_dict is all of it


class NodeList:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self):
        return list(range(1, self.n + 1))


def value_bound(cfg, record: str) -> float:
    """The largest |value| the server accepts in this record of this method's replies (its wire declares it)."""
    return get_method(cfg.method).load_value_bound()(cfg, record)


def references(cfg, setup, instruction) -> dict[str, dict[str, np.ndarray]]:
    """Per reply record, the global values its arrays replace, for the instruction (a Message or its content) the
    reply answers; a record absent is an update, measured from 0. Both are the method's declarations
    (MethodSpec.attack_reference: which records; reference_values: where their global values are)."""
    spec = get_method(cfg.method)
    content = getattr(instruction, "content", instruction)
    refs = spec.load_reference_values()(setup, content)
    zero = [r for r in refs if spec.attack_references().get(r) != "global"]
    if zero:
        raise MethodError(f"method '{cfg.method}': reference_values gives values for {zero}, not declared 'global'")
    return refs


def attack(content, kind: str, cfg, refs: dict[str, dict[str, np.ndarray]]):
    """An honest reply's every float turned into what passes the checks and hurts most: "bound": every value
    at the bound, away from the global value; "sign flip": the update turned around and scaled until its
    largest value reaches the bound; "high": every value at +bound; "bound + 1e12": "bound", claiming 10^12
    examples. Changes `content` in place and returns it."""
    spec = get_method(cfg.method)
    for name in (spec.reply_record, "head"):
        if name not in content:
            continue
        from_global = spec.attack_references().get(name) == "global"
        bound = 0.999 * value_bound(cfg, name)
        rec = content[name]
        for key in list(rec.keys()):
            if rec[key].dtype != "float32":
                continue
            if from_global and key not in refs.get(name, {}):
                raise MethodError(f"method '{cfg.method}': reference_values gives no global value of {name}/{key}")
            ref = refs.get(name, {}).get(key, np.float64(0.0))
            update = rec[key].numpy().astype(np.float64) - ref
            if kind == "sign flip":
                new = ref - (bound - np.max(np.abs(ref))) / max(float(np.max(np.abs(update))), 1e-30) * update
            elif kind == "high":
                new = np.full(update.shape, bound)
            else:
                new = np.where(update >= 0, bound, -bound)
            rec[key] = Array(np.asarray(new, np.float32))
    if kind == "bound + 1e12":
        content["metrics"]["num-examples"] = 10**12
    return content


def global_model(cfg, setup) -> dict[str, torch.Tensor]:
    """Every tensor of the server's global model, by name (MethodSpec.global_model: FedTT's cores included)."""
    return dict(get_method(cfg.method).load_global_model()(setup))


def flat_weights(cfg, setup) -> torch.Tensor:
    """The whole global model as one float64 vector, in the declaration's order."""
    return torch.cat([t.detach().reshape(-1).double() for t in global_model(cfg, setup).values()])


def whole_model_measured(record: dict) -> bool:
    """Whether a record's update norm and finiteness cover the whole global model: recorded with
    MethodSpec.global_model, or of a method whose global model is its state_dict, which records before read (a
    FedTT record before then measured its head only, its cores being on hooks)."""
    return record.get("measure") == "global_model" or get_method(record["method"]).global_model == STATE_DICT


def run_name(method: str, rule: str, scenario: str, seed: int = 0) -> str:
    slug = scenario.replace(" + ", "-plus-").replace(", ", "-").replace(" ", "-")
    return f"robust-{method}-{rule}-{slug}" + (f"-s{seed}" if seed else "")


def settings_of(args) -> dict:
    """What a run's figures depend on besides method, rule and scenario: a record made otherwise is run again."""
    return {"rounds": args.rounds, "local_steps": args.local_steps, "max_length": args.max_length}


def run(method: str, rule: str, scenario: str, seed: int, args, dev) -> dict:
    """One run; `seed` fixes the partitions, the initialisation and every client's dropout and batches (seed 0
    is the page's first column; the others say whether a difference is more than a rerun moves)."""
    clients, hostile, kind = SCENARIOS[scenario]
    name = run_name(method, rule, scenario, seed)
    cfg = parse_run_config(
        {
            "method": method, "task": "sst2", "data-dir": args.glue, "results-dir": tempfile.mkdtemp(prefix="robust-"),
            "run-name": name,
            "partitioning": "dirichlet", "dirichlet-alpha": 0.5, "seed": seed, "train.local-steps": args.local_steps,
            "train.batch-size": 16, "train.max-length": args.max_length, "min-clients": clients,
            "aggregation.rule": rule,
        }
    )  # fmt: skip
    os.environ[STATE_DIR_ENV] = tempfile.mkdtemp(prefix="robust-nodes-")
    recorder = RunRecorder(cfg.results_dir, name, cfg.to_flat())
    setup = build_setup(cfg, recorder)
    client = get_method(method).load_client().train
    w0 = flat_weights(cfg, setup)
    first_update = None
    rows = []
    start = time.perf_counter()
    for rnd in range(1, args.rounds + 1):
        msgs = {
            m.metadata.dst_node_id: m
            for m in setup.strategy.configure_train(rnd, None, ConfigRecord(), NodeList(clients))
        }
        replies = []
        for node, msg in sorted(msgs.items()):
            part = node - 1
            torch.manual_seed(1_000_003 * seed + 1000 * rnd + part)
            content = client(msg.content, cfg, {"partition-id": part, "num-partitions": clients}, 1, node)
            if part >= clients - hostile:
                content = attack(content, kind, cfg, references(cfg, setup, msg))
            replies.append(Message(content, reply_to=msg))
        setup.strategy.aggregate_train(rnd, replies)  # the strategy updates the server's model
        if rnd == 1:
            first_update = float((flat_weights(cfg, setup) - w0).norm())
        rec = recorder.end_round(rnd, None)
        rows.append(rec)
        print(f"{name} round {rnd}: {rec['clients']} replies, {rec['clipped']} clipped, failed {rec['failed']}")
    result = evaluate(setup.model, dev, get_task("sst2"), 64)
    seconds = time.perf_counter() - start
    finite = bool(torch.isfinite(flat_weights(cfg, setup)).all())
    print(f"{name}: accuracy {100 * result['accuracy']:.2f}, loss {result['loss']:.3f}, {seconds:.0f} s", flush=True)
    return {
        "method": method, "rule": rule, "scenario": scenario, "seed": seed, "settings": settings_of(args), **result,
        "seconds": seconds, "finite": bool(finite), "first_update": first_update, "measure": "global_model", "rounds": rows,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg()[0],
    }  # fmt: skip


def record_path(records: str, name: str) -> str:
    return os.path.join(records, f"{name}.json")


def read_record(records: str, name: str, args) -> dict | None:
    """A finished run's record made with these settings, or None (absent, unreadable or made otherwise)."""
    try:
        with open(record_path(records, name)) as f:
            r = json.load(f)
    except (OSError, ValueError):
        return None
    return r if isinstance(r, dict) and r.get("settings") == settings_of(args) else None


def loss_gaps(hostile: dict[int, dict], honest: dict[int, dict]) -> dict[int, float]:
    """Per seed that has both runs: the hostile run's final dev loss minus the honest run's."""
    return paired_differences({k: r["loss"] for k, r in hostile.items()}, {k: r["loss"] for k, r in honest.items()})


def verdicts(results: dict) -> list[str]:
    """One row per method and aim scenario, at the shipped defaults: the final dev loss against the honest
    run's with as many clients and the same seed, both under the rule the method's default applies at that
    many replies; over several seeds, the mean difference against the aim and 'within noise' where the
    margin is smaller than the seeds' spread of the difference."""
    rows = []
    for method in METHODS:
        for scenario in AIM_SCENARIOS:
            clients = SCENARIOS[scenario][0]
            rule = shipped_rule(method, clients)
            by_scenario = results.get((method, rule), {})
            hostile, honest = by_scenario.get(scenario, {}), by_scenario.get(f"honest, {clients}", {})
            gaps = loss_gaps(hostile, honest)
            label = get_method(method).label
            if not gaps:
                rows.append(f"| {label} | {scenario} | {rule} | 0 | - | - | - | - | {NOT_RUN} |")
                continue
            gap = statistics.fmean(gaps.values())
            finite = all(hostile[seed]["finite"] for seed in gaps)
            per_seed = "" if len(gaps) < 2 else " (" + ", ".join(f"{g:+.3f}" for g in gaps.values()) + ")"
            rows.append(
                f"| {label} | {scenario} | {rule} | {len(gaps)} | "
                f"{statistics.fmean(honest[s]['loss'] for s in gaps):.3f} | "
                f"{statistics.fmean(hostile[s]['loss'] for s in gaps):.3f} | {gap:+.3f}{per_seed} | <= {LOSS_MARGIN} | "
                f"{verdict(gap, LOSS_MARGIN, False, '', 3, sample_sd(gaps.values())) if finite else 'not met: the model is not finite'} |"
            )
    return rows


def honest_cost(results: dict) -> list[str]:
    """The shipped rule's accuracy against the plain mean's with every client honest, over the seeds that have
    both."""
    rows = []
    for method in METHODS:
        for clients in (10, 5, 3):
            rule = shipped_rule(method, clients)
            ours = results.get((method, rule), {}).get(f"honest, {clients}", {})
            mean = results.get((method, "mean"), {}).get(f"honest, {clients}", {})
            seeds = sorted(set(ours) & set(mean))
            if not seeds:
                continue
            a = statistics.fmean(100 * ours[s]["accuracy"] for s in seeds)
            b = statistics.fmean(100 * mean[s]["accuracy"] for s in seeds)
            rows.append(
                f"| {get_method(method).label} | {clients} | {rule} | {len(seeds)} | {a:.2f} | {b:.2f} | {a - b:+.2f} |"
            )
    return rows


def write_page(results: dict, args, command: str) -> str:
    runs = [r for by in results.values() for seeds in by.values() for r in seeds.values()]
    seeds = sorted({r.get("seed", 0) for r in runs})
    dates = sorted(r["date"][:10] for r in runs)
    minutes = sum(r["seconds"] for r in runs) / 60
    lines = [
        "# Robust aggregation at the shipped defaults: what it costs and what it holds",
        "",
        f"Produced by `{command}` ({dates[0]} to {dates[-1]}; {platform.machine()}, {os.cpu_count()} cores, CPU "
        f"only, torch {torch.__version__} with {torch.get_num_threads()} threads; {minutes:.1f} min of runs). "
        "Setting: SST-2, embedded all-MiniLM-L6-v2, Dirichlet alpha 0.5 over labels, "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (a seed fixes the partitions, "
        "initialisation, dropout and batches; seed 0 for every run, the others for the aim rows), "
        f"{args.rounds} rounds of {args.local_steps} local steps of batch 16 (max length {args.max_length}), "
        'each method\'s own learning rate (`train.lr = "auto"`) and every other setting at its shipped default, '
        "`aggregation.*` included (norm-cap 2, weight-cap 4, attackers 2; rule `auto`: trimmed-or-capped for the "
        "first-order methods, which is trimmed-mean from 4b = 8 replies and the capped mean below, the capped mean "
        "for the zero-order ones, whose default was the bounded mean until the adaptive attacks below) "
        "unless the rule column says otherwise; the whole dev split (872 examples) evaluated after the last round. Every run drives the real "
        "strategy and client code in one process; its record is `bench/records/robust/<run>.json`, and "
        "`python -m bench.robust --report` rewrites this page from those records without running anything.",
        "",
        "Attacks (bench/robust.py `attack`): every value at the server's bound away from the global value; the "
        "update turned around and scaled to the bound; the first with num-examples = 1e12. The hostile clients "
        "collude (send the same). Update ratio: the norm of round 1's global update over that of the honest run "
        "with as many clients, and whether the model is finite, over every tensor of the global model ('-' for a "
        "FedTT record made when only its head was measured: its cores hang on forward hooks, outside the model's "
        "state_dict).",
        "",
        f"## The aim: one hostile client of three or of ten leaves the final dev loss within {LOSS_MARGIN}",
        "",
        "Over several seeds the dev losses are means over the seeds that have both runs, the difference is the "
        "mean of the per-seed differences (each seed's in brackets), and the verdict says 'within noise' where "
        "the margin to the aim is smaller than the standard deviation of those differences.",
        "",
        "| method | scenario | rule applied | seeds | honest dev loss | hostile dev loss | difference | aim | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- |",
        *verdicts(results),
        "",
        "## The cost with every client honest: the shipped rule against the plain example-weighted mean",
        "",
        "| method | clients | rule applied | seeds | accuracy, shipped rule | accuracy, mean | difference (points) |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
        *honest_cost(results),
        "",
        "Three short rounds, mostly one seed: differences of a point or two are within what reruns move "
        "(docs/benchmark.md).",
        "Below 4b = 8 replies the first-order default is the capped mean: no reply counts for more than the "
        "round's median reply, in update norm or in weight. The `median`, `trimmed-mean` (at 5 replies: the "
        "median of five) and `geometric-median` rows show why not a robust rule there: with few label-skewed "
        "clients the honest replies disagree, and a rule that keeps one or two of them lost up to 20 points "
        "where the mean of all of them learns; the bounded `mean` rows (norm-cap 2, weight-cap 4) show why not "
        "the plain bounded mean: one hostile client of three moved its dev loss by up to +0.74.",
        "",
        *adaptive_page.section(adaptive_page.read_records(adaptive_page.records_dir(ROOT))),
        "## Every run",
        "",
        "| method | rule | scenario | seed | update ratio | accuracy | dev loss | model finite | rounds failed |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for (method, rule), by_scenario in results.items():
        for scenario, by_seed in by_scenario.items():
            for seed, r in by_seed.items():
                clients = SCENARIOS[scenario][0]
                honest = by_scenario.get(f"honest, {clients}", {}).get(seed)
                whole = whole_model_measured(r) and honest is not None and whole_model_measured(honest)
                ratio = r["first_update"] / honest["first_update"] if whole and honest["first_update"] else None
                failed = sum(1 for row in r["rounds"] if row.get("failed"))
                lines.append(
                    f"| {get_method(method).label} | {rule} | {scenario} | {seed} | "
                    f"{'-' if ratio is None else f'{ratio:.2f}x'} | {100 * r['accuracy']:.2f} | {r['loss']:.3g} | "
                    f"{('yes' if r['finite'] else 'no') if whole_model_measured(r) else '-'} | {failed} |"
                )
    lines.append("")
    return "\n".join(lines)


def read_results(args) -> dict:
    """Every recorded run of these settings, in registry order: (method, rule) -> scenario -> seed -> record."""
    files = {n.removesuffix(".json") for n in os.listdir(args.records) if n.endswith(".json")}
    results: dict = {}
    for method in METHODS:
        for rule in RULES:
            for scenario in SCENARIOS:
                base = run_name(method, rule, scenario)
                seeds = [0] if base in files else []
                seeds += sorted(
                    int(n[len(base) + 2 :]) for n in files if n.startswith(base + "-s") and n[len(base) + 2 :].isdigit()
                )
                for seed in seeds:
                    r = read_record(args.records, run_name(method, rule, scenario, seed), args)
                    if r is not None:
                        results.setdefault((method, rule), {}).setdefault(scenario, {})[seed] = r
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=8)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--rules", default="auto", help="comma list of rules; auto = each method's shipped rule")
    p.add_argument("--scenarios", default=";".join(SCENARIOS), help="';'-separated names of SCENARIOS")
    p.add_argument("--glue", default=os.environ.get("GLUE_DIR", os.path.join(ROOT, "..", "shared", "data", "glue")))
    p.add_argument("--records", default=os.path.join(ROOT, "bench", "records", "robust"))
    p.add_argument("--out", default=os.path.join(DOCS, "results-robust.md"))
    p.add_argument("--seeds", default="0", help="comma list of seeds to run (the page shows every seed recorded)")
    p.add_argument("--report", action="store_true", help="only rewrite the page from the records")
    args = p.parse_args()
    try:
        seeds = [int(x) for x in args.seeds.split(",")]
    except ValueError:
        raise SystemExit(f"error: --seeds takes a comma list of integers, not '{args.seeds}'") from None
    if any(seed < 0 for seed in seeds):
        raise SystemExit(f"error: --seeds takes seeds >= 0, not '{args.seeds}'")
    for scenario in args.scenarios.split(";"):
        if scenario not in SCENARIOS:
            raise SystemExit(f"error: unknown scenario '{scenario}'; choose from: {'; '.join(SCENARIOS)}")
    for method in args.methods.split(","):
        if method not in METHODS:
            raise SystemExit(f"error: unknown method '{method}'; choose from: {', '.join(METHODS)}")
    from flwr.supercore.task_identity import TaskIdentity  # what the ServerApp runtime sets for Messages

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    os.makedirs(args.records, exist_ok=True)
    dev = None
    for method in [] if args.report else args.methods.split(","):
        for asked in args.rules.split(","):
            for scenario, seed in ((sc, se) for sc in args.scenarios.split(";") for se in seeds):
                rule = shipped_rule(method, SCENARIOS[scenario][0]) if asked == "auto" else asked
                name = run_name(method, rule, scenario, seed)
                if read_record(args.records, name, args) is not None:
                    print(f"{name}: recorded, not run again", flush=True)
                    continue
                if dev is None:
                    cfg = parse_run_config({"task": "sst2", "data-dir": args.glue, "train.max-length": args.max_length})
                    dev = dev_encoded(cfg)
                write_json(record_path(args.records, name), run(method, rule, scenario, seed, args, dev))
    results = read_results(args)
    if not results:
        raise SystemExit(f"error: no records of these settings in {args.records}")
    recorded = sorted({seed for by in results.values() for r in by.values() for seed in r})
    command = f"python -m bench.robust --rounds {args.rounds} --local-steps {args.local_steps}"
    if len(recorded) > 1:  # the other seeds were run for some rows only: the seed column says which
        command += f"`, then `{command} --seeds {','.join(map(str, recorded[1:]))} --methods M --scenarios S"
    page = write_page(results, args, command)
    with open(args.out, "w") as f:
        f.write(page)
    print(page)


if __name__ == "__main__":
    main()
