"""Benchmark: FedKRSO against FedAvg full fine-tuning, measured in one run; writes docs/results.md.

Both methods run through `flwr run .` (scripts/simulate.py) on SST-2 with the embedded MiniLM, 10 simulated
clients, Dirichlet label skew alpha 0.5, the same seed, the same number of local steps and batch size; only
the learning rate is each method's own. The page gets a table per round, the ratios the project aims at,
and two plots (accuracy against round and against cumulative bytes per client).

    .venv/bin/python bench/krso_vs_fedavg.py [--rounds 8] [--clients 10] [--local-steps 20]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.simulate import read_rounds, simulate

DOCS = os.path.join(ROOT, "docs")


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def plot(runs: dict[str, list[dict]], path_round: str, path_bytes: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rounds in runs.items():
        pts = [(r["round"], 100 * r["accuracy"]) for r in rounds if r["accuracy"] is not None]
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xlabel("round")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_round, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rounds in runs.items():
        total, pts = 0.0, []
        for r in rounds:
            if r["clients"]:
                total += (r["bytes_down"] + r["bytes_up"]) / r["clients"]
            if r["accuracy"] is not None and total > 0:  # round 0 has sent nothing: no place on a log axis
                pts.append((total / 2**20, 100 * r["accuracy"]))
        ax.plot(*zip(*pts, strict=True), marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative MB per client (down + up)")
    ax.set_ylabel("SST-2 dev accuracy (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_bytes, dpi=120)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--local-steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--krso-lr", type=float, default=5e-4)
    ap.add_argument("--fedavg-lr", type=float, default=5e-5)
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "results", "bench"))
    args = ap.parse_args()

    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = {
        "task": "sst2", "num-server-rounds": args.rounds, "seed": 0, "partitioning": "dirichlet",
        "dirichlet-alpha": 0.5, "train.local-steps": args.local_steps, "train.batch-size": args.batch_size,
        "results-dir": args.results_dir, "min-clients": args.clients,
    }  # fmt: skip
    plan = {
        "FedKRSO": {"method": "fedkrso", "train.lr": args.krso_lr, "krso.k": 4, "krso.rank": 8, "krso.intervals": 4},
        "FedAvg": {"method": "fedavg", "train.lr": args.fedavg_lr},
    }
    runs, summaries = {}, {}
    for name, overrides in plan.items():
        cfg = {**common, **overrides, "run-name": f"bench-{overrides['method']}-{stamp}"}
        print(f"== {name}: {args.rounds} rounds, {args.clients} clients", flush=True)
        start = time.time()
        result = simulate(cfg, args.clients, quiet=True, timeout=6 * 3600, progress=True)
        if result["status"] != "finished:completed" or result["summary"] is None:
            print(f"{name} failed: {result['status']}; see the log of run {result['run_id']}", file=sys.stderr)
            return 1
        runs[name], summaries[name] = read_rounds(result["records"]), result["summary"]
        print(f"== {name} done in {time.time() - start:.0f} s; records in {result['records']}", flush=True)

    os.makedirs(DOCS, exist_ok=True)
    plot(runs, os.path.join(DOCS, "krso_accuracy_round.png"), os.path.join(DOCS, "krso_accuracy_bytes.png"))
    k, a = summaries["FedKRSO"], summaries["FedAvg"]
    kp, ap_ = k["per_client_per_round"], a["per_client_per_round"]
    down_ratio, up_ratio = ap_["bytes_down"] / kp["bytes_down"], ap_["bytes_up"] / kp["bytes_up"]
    acc_gap = 100 * (a["final_accuracy"] - k["final_accuracy"])
    mem_ratio = kp["peak_rss_mb"] / ap_["peak_rss_mb"]
    command = "make bench  # = " + " ".join(["python bench/krso_vs_fedavg.py", *sys.argv[1:]])

    lines = [
        "# Results",
        "",
        "## FedKRSO vs FedAvg full fine-tuning — SST-2, all-MiniLM-L6-v2",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores, "
        f"CPU only; simulation through `flwr run`, 2 client processes at a time). Setting: {args.clients} clients, "
        f"Dirichlet alpha 0.5 over labels, seed 0, {args.rounds} rounds, {args.local_steps} local steps of batch "
        f"{args.batch_size} per client per round for both methods, Adam; lr {args.krso_lr} (FedKRSO: subspace "
        f"B and head) and {args.fedavg_lr} (FedAvg: all weights). FedKRSO: K = 4 seeds per round, rank r = 8, "
        f"I = 4 intervals of J = {args.local_steps // 4} steps, all 37 linear layers as targets. Accuracy on the "
        "full SST-2 dev split (872 examples), evaluated by the server after every round.",
        "",
        "| | FedKRSO | FedAvg | ratio | aim |",
        "| --- | --- | --- | --- | --- |",
        f"| bytes per client per round, down | {mb(kp['bytes_down'])} | {mb(ap_['bytes_down'])} | "
        f"{down_ratio:.1f}x fewer | >= 20x {'met' if down_ratio >= 20 else 'NOT met'} |",
        f"| bytes per client per round, up | {mb(kp['bytes_up'])} | {mb(ap_['bytes_up'])} | "
        f"{up_ratio:.1f}x fewer | >= 20x {'met' if up_ratio >= 20 else 'NOT met'} |",
        f"| final accuracy (round {args.rounds}) | {100 * k['final_accuracy']:.2f} | {100 * a['final_accuracy']:.2f} | "
        f"{acc_gap:+.2f} points (FedAvg - FedKRSO) | within 1.5 {'met' if acc_gap <= 1.5 else 'NOT met'} |",
        f"| best accuracy | {100 * k['best_accuracy']:.2f} (round {k['best_round']}) | "
        f"{100 * a['best_accuracy']:.2f} (round {a['best_round']}) | | |",
        f"| client peak RSS | {kp['peak_rss_mb']:.0f} MB | {ap_['peak_rss_mb']:.0f} MB | {100 * mem_ratio:.0f}% | "
        f"<= 60% {'met' if mem_ratio <= 0.6 else 'NOT met'} |",
        f"| seconds per local step (mean) | {kp['seconds_per_local_step']:.3f} | {ap_['seconds_per_local_step']:.3f} | "
        f"{kp['seconds_per_local_step'] / ap_['seconds_per_local_step']:.2f} | |",
        f"| wall time of the run | {k['wall_seconds']:.0f} s | {a['wall_seconds']:.0f} s | | |",
        "",
        "![accuracy against round](krso_accuracy_round.png) ![accuracy against cumulative bytes](krso_accuracy_bytes.png)",
        "",
        "### Per round",
        "",
        "| round | FedKRSO acc | FedAvg acc | FedKRSO down/client | FedKRSO up/client | FedAvg down/client | "
        "FedAvg up/client | FedKRSO peak MB | FedAvg peak MB | FedKRSO s/step | FedAvg s/step |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for rk, ra in zip(runs["FedKRSO"], runs["FedAvg"], strict=True):

        def cell(r, key, fmt):
            v = r.get(key)
            return "-" if v is None else fmt(v)

        def per_client(r, key):
            return mb(r[key] / r["clients"]) if r["clients"] else "-"

        lines.append(
            f"| {rk['round']} | {cell(rk, 'accuracy', lambda v: f'{100 * v:.2f}')} | "
            f"{cell(ra, 'accuracy', lambda v: f'{100 * v:.2f}')} | {per_client(rk, 'bytes_down')} | "
            f"{per_client(rk, 'bytes_up')} | {per_client(ra, 'bytes_down')} | {per_client(ra, 'bytes_up')} | "
            f"{cell(rk, 'client_peak_rss_mb', lambda v: f'{v:.0f}')} | {cell(ra, 'client_peak_rss_mb', lambda v: f'{v:.0f}')} | "
            f"{cell(rk, 'seconds_per_local_step', lambda v: f'{v:.3f}')} | {cell(ra, 'seconds_per_local_step', lambda v: f'{v:.3f}')} |"
        )
    lines += [
        "",
        "How each figure is measured: bytes are the serialized sizes of every record of every message "
        "(`count_bytes()` of Flower's records), summed over clients and divided by the replies of the round; "
        "FedKRSO's round 1 carries no update log yet, so its mean down is below its steady state. Peak RSS is "
        "the highest resident memory of the client process while it handles the round (model load, data, "
        "training, reply), sampled every 5 ms; it includes the Python, torch and Ray worker baseline that both "
        "methods share. Seconds per local step = the client's training time / its local steps (one thread per "
        "client process).",
        "",
        f"Raw records: `{os.path.relpath(args.results_dir, ROOT)}/bench-*-{stamp}/` (rounds.jsonl, summary.json).",
        "",
    ]
    notes_path = os.path.join(DOCS, "results-notes.md")
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            lines += [f.read()]
    with open(os.path.join(DOCS, "results.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.results_dir, f"bench-{stamp}.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    print("\n".join(lines[:16]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
