"""The `fedsubspace` command: the project's tools behind one entry point.

    fedsubspace simulate --clients 10 -c "method='fedtt' task='rte'"   # scripts/simulate.py
    fedsubspace fleet --methods fedkrso,fedavg -c "data-dir='/abs/glue'" # scripts/fleet/cli.py
    fedsubspace bench --quick                                          # bench/run.py
    fedsubspace report results/<run name>                               # a run's table and accuracy plot
    fedsubspace export results/<run name> exported/                     # the global model, Hugging Face folder
    fedsubspace generate exported/ "a prompt"                           # its greedy answer

`python -m common.cli ...` is the same command. simulate, fleet and bench run from a source checkout (they
start `flwr run .` there, read its deploy/ files or write its docs/), so `make install` installs this entry
point editable; report needs only a run's records folder and matplotlib, export and generate a run folder or an
export (they are in common/, so they work from any install).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from common.records import fmt_bytes, text_table

# The checkout this module sits in (an editable install points here); a wheel has no scripts/ or bench/.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# command -> (module with a main(argv) -> int, its file in the checkout, one line of help)
WRAPPED = {
    "simulate": ("scripts.simulate", "scripts/simulate.py", "one federated simulation through `flwr run .`"),
    "fleet": (
        "scripts.fleet.cli",
        "scripts/fleet/cli.py",
        "the fleet of docker-compose.yml on this machine (needs root)",
    ),
    "bench": ("bench.run", "bench/run.py", "the benchmark: every method on the same work -> docs/results.md"),
}


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """The wrapped scripts' argparse takes its program name from sys.argv[0]: make it `fedsubspace <command>`."""
    saved = sys.argv[0]
    sys.argv[0] = f"fedsubspace {name}"
    try:
        yield
    finally:
        sys.argv[0] = saved


def run_wrapped(name: str, argv: Sequence[str]) -> int:
    module, path, _ = WRAPPED[name]
    if not os.path.exists(os.path.join(ROOT, path)):
        print(
            f"error: fedsubspace {name} runs from a source checkout ({path} is not in {ROOT}): in the checkout, "
            "install the command with `pip install --no-deps -e .` (make install does), or run "
            f"`python -m {module}` there",
            file=sys.stderr,
        )
        return 2
    if importlib.util.find_spec(module.split(".")[0]) is None:  # the editable install puts the checkout on the path
        print(
            f"error: fedsubspace {name} cannot import {module} from {ROOT}: reinstall the command there with "
            f"`pip install --no-deps -e .` (make install does), or run `python -m {module}` in the checkout",
            file=sys.stderr,
        )
        return 2
    with _program_name(name):
        return importlib.import_module(module).main(list(argv))


# ---------------------------------------------------------------- report


class ReportError(ValueError):
    """A folder that holds no run records; the message says what was expected."""


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        lines = [line for line in f if line.strip()]
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise ReportError(f"{path}: line {i + 1} is not JSON") from None
            # a run still under way may be writing its last line: report the rounds before it
    return rows


def load_run(run_dir: str) -> dict[str, Any]:
    """A run's records: rounds.jsonl rows, summary.json (None while it runs), a fleet's wire.jsonl rows by round."""
    if not os.path.isdir(run_dir):
        raise ReportError(f"{run_dir} is not a folder: give a run's records folder, e.g. results/<run name>")
    rounds = _read_jsonl(os.path.join(run_dir, "rounds.jsonl"))
    if not rounds:
        raise ReportError(
            f"{run_dir} holds no rounds (rounds.jsonl missing or empty): give a run's records folder, "
            "e.g. results/<run name> (simulation) or <results-dir>/fleet-<method>-<time> (fleet)"
        )
    summary = None
    if os.path.exists(os.path.join(run_dir, "summary.json")):
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    wire = {row["round"]: row for row in _read_jsonl(os.path.join(run_dir, "wire.jsonl"))}
    return {"rounds": rounds, "summary": summary, "wire": wire}


def cumulative_bytes(rounds: Sequence[dict[str, Any]], key: str = "bytes") -> list[int]:
    """Bytes sent down and up, all clients, from the start of the run to the end of each round."""
    total, out = 0, []
    for r in rounds:
        total += (r.get(f"{key}_down") or 0) + (r.get(f"{key}_up") or 0)
        out.append(total)
    return out


def report_table(run: dict[str, Any]) -> str:
    rounds, wire = run["rounds"], run["wire"]
    header = ["round", "accuracy %", "loss", "clients", "bytes down", "bytes up", "cumulative", "seconds"]
    if wire:  # a fleet run: what the network interfaces counted, framing and TLS included
        header += ["wire down", "wire up"]
    rows = [header]
    for r, total in zip(rounds, cumulative_bytes(rounds), strict=True):
        row = [
            str(r["round"]),
            "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}",
            "-" if r.get("loss") is None else f"{r['loss']:.4f}",
            str(r.get("clients", "-")),
            fmt_bytes(r.get("bytes_down")),
            fmt_bytes(r.get("bytes_up")),
            fmt_bytes(total),
            "-" if r.get("seconds") is None else f"{r['seconds']:.1f}",
        ]
        if wire:
            w = wire.get(r["round"], {})
            row += [fmt_bytes(w.get("wire_bytes_down")), fmt_bytes(w.get("wire_bytes_up"))]
        rows.append(row)
    return text_table(rows)


def describe(run_dir: str, run: dict[str, Any]) -> str:
    first, summary = run["rounds"][0], run["summary"]
    config = summary.get("config", {}) if summary else {}
    what = f"{first.get('method')} on {first.get('task')}"
    if "train.lr" in config:
        what += f", train.lr {config['train.lr']:g}"
    bytes_are = "bytes: all clients' in the round, and since the start (down + up)"
    if summary is None:
        return f"{run_dir}: {what}; no summary.json (under way or stopped): the rounds so far; {bytes_are}"
    final, best = summary.get("final_accuracy"), summary.get("best_accuracy")
    acc = "-" if final is None else f"{100 * final:.2f}% final, {100 * best:.2f}% best (round {summary['best_round']})"
    return f"{run_dir}: {what}; {summary['rounds']} rounds, {acc}; {bytes_are}"


def plot(run_dir: str, run: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    rounds = run["rounds"]
    cumulative = cumulative_bytes(rounds)
    points = [
        (r["round"], total, 100 * r["accuracy"])
        for r, total in zip(rounds, cumulative, strict=True)
        if r.get("accuracy") is not None
    ]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    axes[0].plot([p[0] for p in points], [p[2] for p in points], marker="o")
    axes[0].set_xlabel("round")
    axes[0].xaxis.get_major_locator().set_params(integer=True)
    axes[1].plot([p[1] / 2**20 for p in points], [p[2] for p in points], marker="o", label="messages")
    axes[1].set_xlabel("cumulative MB sent, down + up, all clients")
    if run["wire"]:
        on_wire = cumulative_bytes([run["wire"].get(r["round"], {}) for r in rounds], key="wire_bytes")
        measured = [
            (w, 100 * r["accuracy"]) for r, w in zip(rounds, on_wire, strict=True) if r.get("accuracy") is not None
        ]
        axes[1].plot(
            [w / 2**20 for w, _ in measured], [a for _, a in measured], marker="s", ls="--", label="on the wire"
        )
        axes[1].legend(fontsize=8)
    first = rounds[0]
    for ax in axes:
        ax.set_ylabel(f"{first.get('task')} dev accuracy (%)")
        ax.grid(alpha=0.3)
        if not points:
            ax.text(0.5, 0.5, "no evaluated round yet", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle(f"{first.get('method')} on {first.get('task')}: {os.path.basename(os.path.abspath(run_dir))}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run_dir: str, png: str | None = None) -> int:
    try:
        run = load_run(run_dir)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(describe(run_dir, run))
    print(report_table(run))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("error: the plot needs matplotlib: pip install 'matplotlib>=3.8'", file=sys.stderr)
        return 1
    path = png or os.path.join(run_dir, "report.png")
    plot(run_dir, run, path)
    print(f"accuracy against round and against cumulative bytes: {path}")
    return 0


# ---------------------------------------------------------------- main


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedsubspace",
        description="Federated fine-tuning with tiny messages, on Flower: the project's commands.",
        epilog="`fedsubspace <command> --help` shows each command's options.",
    )
    commands = ap.add_subparsers(dest="command", metavar="<command>")
    for name, (_, path, line) in WRAPPED.items():
        commands.add_parser(name, help=f"{line} ({path})", add_help=False)
    rep = commands.add_parser(
        "report", help="print a run's table and plot its accuracy against round and cumulative bytes"
    )
    rep.add_argument("run_dir", metavar="RUN_DIR", help="a run's records folder (simulation or fleet)")
    rep.add_argument("--png", help="where to write the plot (default RUN_DIR/report.png)")
    exp = commands.add_parser(
        "export", help="write a run's global model as a Hugging Face folder (server_app/export.py, docs/export.md)"
    )
    exp.add_argument("run_dir", metavar="RUN_DIR", help="a run's records folder, holding its checkpoint.safetensors")
    exp.add_argument(
        "out_dir", metavar="OUT_DIR", help="the folder to write (new or empty; --force replaces an export)"
    )
    exp.add_argument("--round", type=int, help="the round to export (default: the last completed one)")
    exp.add_argument("--force", action="store_true", help="replace OUT_DIR if it holds a previous export")
    gen = commands.add_parser("generate", help="load an exported folder with transformers and print its greedy answer")
    gen.add_argument("folder", metavar="OUT_DIR", help="a folder `fedsubspace export` wrote")
    gen.add_argument("prompt", metavar="PROMPT", nargs="?", help="the prompt (with --chat: the first message)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    gen.add_argument("--chat", action="store_true", help="a conversation, with the tokenizer's chat template")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in WRAPPED:  # the script parses its own options, --help included
        return run_wrapped(argv[0], argv[1:])
    ap = parser()
    args = ap.parse_args(argv)
    if args.command == "report":
        return report(args.run_dir, args.png)
    if args.command in ("export", "generate"):
        # torch and transformers: only for these commands. The command sits above every floor (it runs the
        # scripts, the benchmark and the server's export), the one module of common/ that imports upwards.
        if args.command == "export":
            from server_app.export import export_command

            return export_command(args.run_dir, args.out_dir, args.round, args.force)
        from common.export import generate_command

        return generate_command(args.folder, args.prompt, args.max_new_tokens, args.chat)
    ap.print_help(sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
