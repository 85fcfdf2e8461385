"""The adaptive-attack section of docs/results-robust.md, from bench/records/adaptive/*.json (bench/adaptive.py
makes them; `python -m bench.robust --report` writes the page). Nothing here runs anything."""

from __future__ import annotations

import json
import os

from bench.claims import NOT_RUN, verdict
from common.config import parse_run_config
from common.methods import METHODS, get_method
from common.robust import round_rule

ATTACKS = ("ALIE", "IPM", "flip under the cap", "flip + lying count", "bias", "bound + 1e12")
FRACTIONS = {"1 of 10": (10, 1), "2 of 10": (10, 2), "3 of 10": (10, 3), "1 of 3": (3, 1)}  # name -> (n, f)
# The aims of issue 32: no attack moves a round more than RATIO_AIM x an honest round at 1 of 10 and at 1 of 3,
# nor more than RATIO_AIM_3 x at 3 of 10; over many rounds at 1 of 10 the final accuracy within ACCURACY_AIM.
RATIO_AIM, RATIO_AIM_3, ACCURACY_AIM = 1.5, 2.0, 1.0


ONE_ROUND_HEADER = (
    "| method | hostile | rule applied | " + " | ".join(ATTACKS) + " | aim | verdict (worst attack) |",
    "| --- | --- | --- | " + " | ".join("---:" for _ in ATTACKS) + " | --- | --- |",
)


def slug(text: str) -> str:
    return text.replace(" + ", "-plus-").replace(" ", "-").lower()


def run_name(method: str, attack: str | None, f: int, clients: int, rounds: int, rule: str, seed: int = 0) -> str:
    """A record's name; `rule`: the rule its rounds applied (common.robust.round_rule)."""
    what = "honest" if attack is None else f"{slug(attack)}-{f}-of-{clients}"
    return f"adaptive-{method}-{rule}-{what}-{clients}-r{rounds}" + (f"-s{seed}" if seed else "")


def shipped_rule(method: str, clients: int) -> str:
    """The rule a round of `clients` replies applies at the method's shipped defaults (common.robust.round_rule)."""
    ag = parse_run_config({"method": method}).aggregation
    return round_rule(clients, ag.rule, ag.attackers)


def records_dir(root: str) -> str:
    return os.path.join(root, "bench", "records", "adaptive")


def record_path(folder: str, name: str) -> str:
    return os.path.join(folder, f"{name}.json")


def read_records(folder: str) -> list[dict]:
    if not os.path.isdir(folder):
        return []
    out = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".json"):
            with open(os.path.join(folder, name)) as f:
                out.append(json.load(f))
    return out


def ratio_aim(fraction: str) -> float:
    return RATIO_AIM_3 if fraction == "3 of 10" else RATIO_AIM


def one_round_rows(records: list[dict], every: bool = True) -> list[str]:
    """Per method and fraction: each attack's update ratio (and deviation), the worst against the aim; `every`:
    a row for each method and fraction, recorded or not."""
    by = {(r["method"], r["attack"], r["hostile"], r["clients"]): r for r in records if r["rounds"] == 1}
    rows = []
    for method in METHODS:
        for fraction, (n, f) in FRACTIONS.items():
            found = [by[(method, a, f, n)] for a in ATTACKS if (method, a, f, n) in by]
            label = get_method(method).label
            if not found and not every:
                continue
            if not found:
                rows.append(f"| {label} | {fraction} | - | " + " | ".join("-" for _ in ATTACKS) + f" | - | {NOT_RUN} |")
                continue
            cells = []
            for a in ATTACKS:
                r = by.get((method, a, f, n))
                cells.append("-" if r is None else f"{r['ratio']:.2f}x ({r['deviation']:.2f})")
            worst = max(found, key=lambda r: r["ratio"])
            finite = all(r["finite"] for r in found)
            aim = ratio_aim(fraction)
            v = verdict(worst["ratio"], aim, False, "x", 3) if finite else "not met: the model is not finite"
            rows.append(f"| {label} | {fraction} | {found[0]['rule']} | " + " | ".join(cells) + f" | <= {aim}x | {v} |")
    return rows


def many_round_rows(records: list[dict]) -> list[str]:
    """Per method and attack at 1 of 10 over R rounds: the final accuracy against the honest run's."""
    runs = [r for r in records if r["rounds"] > 1]
    honest = {(r["method"], r["rounds"]): r for r in runs if r["attack"] is None}
    rows = []
    for r in sorted(
        runs, key=lambda r: (METHODS.index(r["method"]), r["rounds"], ATTACKS.index(r["attack"]) if r["attack"] else -1)
    ):
        if r["attack"] is None:
            continue
        h = honest.get((r["method"], r["rounds"]))
        label = get_method(r["method"]).label
        if h is None:
            rows.append(
                f"| {label} | {r['attack']} | {r['rounds']} | {r['rule']} | - | {100 * r['accuracy']:.2f} | - | - | - | {NOT_RUN} |"
            )
            continue
        shift = 100 * (h["accuracy"] - r["accuracy"])  # points lost to the attack
        v = verdict(shift, ACCURACY_AIM, False, " points") if r["finite"] else "not met: the model is not finite"
        rows.append(
            f"| {label} | {r['attack']} | {r['rounds']} | {r['rule']} | {100 * h['accuracy']:.2f} | "
            f"{100 * r['accuracy']:.2f} | {shift:+.2f} | {h['loss']:.3f} -> {r['loss']:.3f} | <= {ACCURACY_AIM} | {v} |"
        )
    return rows


def section(records: list[dict]) -> list[str]:
    """The page's adaptive-attack section (empty without records)."""
    if not records:
        return []
    shipped = [r for r in records if r["rule"] == shipped_rule(r["method"], r["clients"])]
    other = sorted({r["rule"] for r in records if r not in shipped and r["rounds"] == 1})
    one = [r for r in shipped if r["rounds"] == 1]
    steps = ", ".join(sorted({str(r["settings"]["local_steps"]) for r in records if r["rounds"] == 1}))
    lines = [
        "## Attackers who adapt (bench/adaptive.py)",
        "",
        "Omniscient, colluding attackers who know the server's rule, norm cap and bounds, at the shipped "
        f"defaults, seed {records[0]['seed']}, {steps} local steps of batch 16 (bench/adaptive.py's docstring says "
        "what each attack sends). One round from the same start: the update ratio is the norm of the global "
        "model's change over the honest round's with as many clients; in brackets the deviation, the norm of its "
        "difference from the honest change over the same (a flip can keep the ratio near 1 and still move the "
        "model the wrong way: the deviation says so). The aim column is the issue's: at most 1.5x at 1 of 10 and 1 "
        "of 3, 2x at 3 of 10.",
        "",
        *ONE_ROUND_HEADER,
        *one_round_rows(one),
        "",
        'Why a row misses its aim, and what each default holds and does not: docs/security.md, "Attackers who '
        "adapt\". In short: f colluders at the round's median norm M move a mean of n replies by up to f M / n, "
        "while the honest round itself is the norm of the mean of n honest updates, which the zero-order "
        "methods' scalars, pointing many ways, make about M / sqrt(n) or less; ALIE stays inside the honest "
        "spread of every coordinate, so no coordinate-wise rule cuts it; and three colluders are more than the "
        "b = 2 trimmed-mean cuts at each end (`aggregation.attackers`).",
        "",
    ]
    for rule in other:
        lines += [
            f"The same under `{rule}`, where it is not the method's shipped rule (tried for the choice of the default):",
            "",
            *ONE_ROUND_HEADER,
            *one_round_rows(
                [r for r in records if r not in shipped and r["rule"] == rule and r["rounds"] == 1], every=False
            ),
            "",
        ]
    many = many_round_rows(shipped)
    if many:
        lines += [
            "Over several rounds at 1 of 10, the attackers adapting every round ("
            + ", ".join(sorted({f"{r['settings']['local_steps']} local steps" for r in shipped if r["rounds"] > 1}))
            + "): the dev accuracy after the last round against the honest run's (points lost; one seed, so a "
            "point either way is within what reruns move, docs/benchmark.md).",
            "",
            "| method | attack | rounds | rule applied | honest accuracy | attacked accuracy | points lost | "
            "dev loss | aim | verdict |",
            "| --- | --- | ---: | --- | ---: | ---: | ---: | --- | --- | --- |",
            *many,
            "",
            *honest_cost(records),
        ]
    return lines


def honest_cost(records: list[dict]) -> list[str]:
    """With every client honest over several rounds: the shipped rule's accuracy against the plain mean's."""
    runs = {(r["method"], r["rule"], r["rounds"]): r for r in records if r["attack"] is None and r["rounds"] > 1}
    lines = []
    for (method, rule, rounds), r in sorted(runs.items(), key=lambda kv: METHODS.index(kv[0][0])):
        mean = runs.get((method, "mean", rounds))
        if rule != shipped_rule(method, r["clients"]) or rule == "mean" or mean is None:
            continue
        lines.append(
            f"With every client honest ({get_method(method).label}, {rounds} rounds): {rule} "
            f"{100 * r['accuracy']:.2f}, the mean {100 * mean['accuracy']:.2f}, "
            f"{100 * (r['accuracy'] - mean['accuracy']):+.2f} points (aim: at most 0.5 points lost)."
        )
    return [*lines, ""] if lines else []
