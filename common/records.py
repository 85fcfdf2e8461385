"""Run records: `<results-dir>/<run name>/rounds.jsonl` (one object per round) and `summary.json`.

Round 0 is the evaluation of the starting model (no traffic). `bytes_down` / `bytes_up` are all bytes of
the messages' contents in the round, summed over clients; `clients` is the number of replies aggregated,
`clipped` how many of them the aggregation scaled down, `snapshots` how many nodes got the snapshot instead
of the update log (common.catchup) and `bytes_snapshot` its bytes (counted in `bytes_down` too), `failed` why
the round's aggregate was not applied (None: it was), `warnings` what else the round's reader should know
(common.robust). `client_train_seconds` and, for the zero-order methods, `client_forward_passes` (with its
parts `client_full_passes`, `client_block1_passes`, `client_block2_passes`) are means per replying client.
A method may keep more per-round records beside them (`add_record`: `<name>.jsonl`). A resumed run starts
from the records so far (`previous`, read back through the server checkpoint) and appends to them. The run
folder they are written in (never one holding another run's records) and its one writer are
common/runfolder.py's.

Every row is one line, `json.dumps(row)` and a newline (`jsonl_line`), appended and fsynced, and the recorder
keeps a running SHA-256 of each file's lines (`digests`): the server checkpoint holds those row counts and
digests instead of the rows, so that its size does not grow with the round, and a resumed run reads the rows
back from the files, checked against them (server_app/checkpoint.py). `json.dumps` of a row read back with
`json.loads` gives the same line again, so the records a resumed run writes again hash to the same digest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from common.files import DiskFull, disk_full, fsync_dir, open_file, replace_file
from common.runfolder import check_not_overwriting, set_aside_unresumable

# The zero-order clients' model calls per round (common.zeroorder.ModelCalls), kept apart by what ran:
# forward_passes is all of them; a block-2 pass costs a fraction of a full one.
PASSES = ("forward_passes", "full_passes", "block1_passes", "block2_passes")

# The client metrics the round records summarise (RunRecorder.add_replies, ClientStats).
STATS_KEYS = (
    "num-examples",
    "peak-rss-mb",
    "train-seconds",
    "load-seconds",
    "catchup-seconds",
    "train-loss",
    "local-steps",
    *(k.replace("_", "-") for k in PASSES),
)


class ClientStats:
    """The client metrics of a round's accepted replies, folded in one reply at a time: per metric the number of
    replies that carried it, their sum (added in reply order, as sum() of the values would) and their maximum.
    That is all the round records keep of them (RunRecorder.add_replies), so a round holds a few numbers per
    metric instead of one dict per reply, however many replies it has. Only the metrics the records use
    (STATS_KEYS) are folded: a client that sends others adds nothing."""

    __slots__ = ("count", "_n", "_sum", "_max")

    def __init__(self) -> None:
        self.count = 0  # replies added
        self._n: dict[str, int] = {}
        self._sum: dict[str, float] = {}
        self._max: dict[str, float] = {}

    @classmethod
    def of(cls, metrics: Iterable[Mapping[str, float]]) -> ClientStats:
        stats = cls()
        for m in metrics:
            stats.add(m)
        return stats

    def add(self, metrics: Mapping[str, float]) -> None:
        self.count += 1
        for key in STATS_KEYS:
            if key in metrics:
                value = metrics[key]
                self._n[key] = self._n.get(key, 0) + 1
                self._sum[key] = self._sum.get(key, 0) + value
                self._max[key] = value if key not in self._max else max(self._max[key], value)

    def sum(self, key: str) -> float | None:
        return self._sum.get(key)

    def max(self, key: str) -> float | None:
        return self._max.get(key)

    def mean(self, key: str) -> float | None:
        return self._sum[key] / self._n[key] if key in self._n else None


ROW_COUNTS = ("bytes_down", "bytes_up", "clients", "failures", "rejected")
ROW_NUMBERS = ("accuracy", "loss", "client_peak_rss_mb", "client_train_seconds", "seconds_per_local_step")


def row_problem(row: object, round_row: bool = True) -> str | None:
    """What keeps a row read back (a resumed run's records) from being summarized, or None: a round row needs
    its counts (ints >= 0), its seconds and its optional numbers (numbers or null), as end_round writes them."""
    if not isinstance(row, dict):
        return f"a row that is a {type(row).__name__}"
    if not round_row:
        return None
    for key in ROW_COUNTS:
        v = row.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            return f"round {row.get('round')!r}: {key} = {repr(v)[:30]}, not a count"
    for key in ("seconds", *ROW_NUMBERS):
        v = row.get(key)
        if (v is not None or key == "seconds") and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            return f"round {row.get('round')!r}: {key} = {repr(v)[:30]}, not a number"
    return None


SUMMARY_COLUMNS = ("round", "accuracy", "loss", "down/client", "up/client", "peak MB", "train s", "round s")


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def jsonl_line(row: Mapping[str, Any]) -> bytes:
    """One row as a records file holds it (and as the checkpoint's digest of the file covers it)."""
    return (json.dumps(row) + "\n").encode()


def records_digest(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the server checkpoint keeps of a records file holding `rows`: their count and their SHA-256."""
    return {"rows": len(rows), "sha256": hashlib.sha256(b"".join(jsonl_line(r) for r in rows)).hexdigest()}


def _append(path: str, line: bytes) -> None:
    """Append one row and fsync it: the checkpoint written after it names it, so it must be on disk first.
    Never through a link (common.files.open_file): one planted at the name between rounds is refused. A full
    disk leaves no part of the row (the file is cut back to its previous length) and raises DiskFull."""
    with os.fdopen(open_file(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        except OSError as exc:
            if not disk_full(exc):
                raise
            with contextlib.suppress(OSError):
                os.ftruncate(f.fileno(), size)
            raise DiskFull(path, needed=len(line)) from exc


class RunRecorder:
    def __init__(
        self,
        results_dir: str,
        run_name: str,
        config: Mapping[str, Any],
        previous: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    ) -> None:
        """`previous`: the records so far of a resumed run ({"rounds": rows, "<name>": rows of <name>.jsonl}).

        Refuses (ConfigError) a folder that holds another run's records: check_not_overwriting."""
        self.dir = os.path.join(results_dir, run_name)
        check_not_overwriting(self.dir, str(config.get("resume-from") or ""))
        set_aside_unresumable(self.dir)
        os.makedirs(self.dir, exist_ok=True)
        self.config = dict(config)
        previous = previous or {}
        self.rounds: list[dict[str, Any]] = [dict(r) for r in previous.get("rounds", ())]
        self.extra: dict[str, list[dict[str, Any]]] = {
            name: [dict(r) for r in rows] for name, rows in previous.items() if name != "rounds"
        }
        self._path = os.path.join(self.dir, "rounds.jsonl")
        self._sha: dict[str, Any] = {}  # record name -> running SHA-256 of its file's lines
        for name, rows in {"rounds": self.rounds, **self.extra}.items():
            data = b"".join(jsonl_line(r) for r in rows)
            replace_file(os.path.join(self.dir, f"{name}.jsonl"), data)
            self._sha[name] = hashlib.sha256(data)
        self._open: dict[str, Any] | None = None
        self._t0 = time.perf_counter()

    def begin_round(self, server_round: int) -> None:
        self._open = {
            "round": server_round,
            "bytes_down": 0,
            "bytes_up": 0,
            "clients": 0,
            "failures": 0,
            "rejected": 0,
            "clipped": 0,
            "snapshots": 0,
            "bytes_snapshot": 0,
            "failed": None,
            "warnings": [],
            "client_peak_rss_mb": None,
            "client_train_seconds": None,
            "client_train_seconds_max": None,
            "client_load_seconds": None,
            "client_catchup_seconds": None,
            "examples": 0,
            "client_train_loss": None,
            "seconds_per_local_step": None,
            **{f"client_{kind}": None for kind in PASSES},
            "_start": time.perf_counter(),
        }

    def add_down(self, nbytes: int) -> None:
        self._current()["bytes_down"] += int(nbytes)

    def add_replies(
        self, bytes_up: int, client_metrics: ClientStats | Iterable[Mapping[str, float]], failures: int, rejected: int
    ) -> None:
        """The round's replies: their bytes, failures and rejections, and the accepted ones' client metrics
        (a ClientStats folded as they were accepted, or the metrics themselves)."""
        stats = client_metrics if isinstance(client_metrics, ClientStats) else ClientStats.of(client_metrics)
        rec = self._current()
        rec["bytes_up"] += int(bytes_up)
        rec["clients"] += stats.count
        rec["failures"] += failures
        rec["rejected"] += rejected
        rec["client_peak_rss_mb"] = stats.max("peak-rss-mb")
        rec["client_train_seconds"] = stats.mean("train-seconds")
        # the slowest client: a round's overhead = seconds - client_train_seconds_max
        rec["client_train_seconds_max"] = stats.max("train-seconds")
        # building the model and catching up, and reading and encoding the data: the part of a client's round
        # that is not training (a cached model folder keeps it small)
        rec["client_load_seconds"] = stats.mean("load-seconds")
        rec["client_catchup_seconds"] = stats.mean("catchup-seconds")  # of which catching up (log methods)
        # the server's wait for the replies since the round began: the clients' load and train, queued on the
        # cores (simulation) or the network (a fleet); `seconds` - wait_seconds is the aggregation and evaluation
        rec["wait_seconds"] = time.perf_counter() - rec["_start"]
        rec["examples"] = int(stats.sum("num-examples") or 0)  # the accepted replies' training examples
        rec["client_train_loss"] = stats.mean("train-loss")
        steps, secs = stats.sum("local-steps"), stats.sum("train-seconds")
        rec["seconds_per_local_step"] = secs / steps if steps and secs is not None else None
        for kind in PASSES:  # mean per client, like client_train_seconds: compute against accuracy
            rec[f"client_{kind}"] = stats.mean(kind.replace("_", "-"))

    def add_snapshot(self, nbytes: int) -> None:
        """A node that got the snapshot instead of the log (common.catchup); nbytes 0: it got the log."""
        if nbytes:
            self._current()["snapshots"] += 1
            self._current()["bytes_snapshot"] += int(nbytes)

    def add_clipped(self, n: int) -> None:
        """Replies whose update the aggregation scaled down (common.robust: norm-cap, clip-norm)."""
        self._current()["clipped"] += int(n)

    def warn(self, message: str) -> None:
        """Something the round's reader should know (kept in the round's `warnings`)."""
        self._current()["warnings"].append(message)

    def fail_round(self, reason: str) -> None:
        """The round's aggregate was not applied (`failed`: why); the global model stays that of the round before."""
        self._current()["failed"] = reason

    def _current(self) -> dict[str, Any]:
        if self._open is None:
            raise RuntimeError("begin_round() first")
        return self._open

    def end_round(self, server_round: int, evaluation: Mapping[str, float] | None) -> dict[str, Any]:
        """Close the round (round 0: the initial evaluation) and append it to rounds.jsonl."""
        if server_round == 0:
            self.begin_round(0)
        rec = self._current()
        start = rec.pop("_start")
        out = {
            "round": server_round,
            "method": self.config.get("method"),
            "task": self.config.get("task"),
            "accuracy": None if evaluation is None else evaluation.get("accuracy"),
            "loss": None if evaluation is None else evaluation.get("loss"),
            **{k: v for k, v in (evaluation or {}).items() if k not in ("accuracy", "loss")},
            **{k: v for k, v in rec.items() if k != "round"},
            "seconds": time.perf_counter() - start,
        }
        self.rounds.append(out)
        line = jsonl_line(out)
        _append(self._path, line)
        self._sha["rounds"].update(line)
        self._open = None
        return out

    def add_record(self, name: str, row: Mapping[str, Any]) -> None:
        """Append one row to the method's own record `<name>.jsonl` (resumed like rounds.jsonl)."""
        self.extra.setdefault(name, []).append(dict(row))
        line = jsonl_line(row)
        _append(os.path.join(self.dir, f"{name}.jsonl"), line)
        if name not in self._sha:  # the file is new: make its name durable too
            fsync_dir(self.dir)
            self._sha[name] = hashlib.sha256()
        self._sha[name].update(line)

    def records(self) -> dict[str, list[dict[str, Any]]]:
        """The records so far, as a resumed run's `previous`."""
        return {"rounds": list(self.rounds), **{name: list(rows) for name, rows in self.extra.items()}}

    def digests(self) -> dict[str, dict[str, Any]]:
        """Per record ("rounds" and each `<name>`), what the checkpoint keeps of it: `records_digest` of its rows
        so far, from the running digests (constant time, however many rounds)."""
        rows = {"rounds": self.rounds, **self.extra}
        return {name: {"rows": len(rows[name]), "sha256": h.copy().hexdigest()} for name, h in self._sha.items()}

    def finish(self) -> dict[str, Any]:
        summary = summarize(self.rounds, self.config)
        summary["wall_seconds"] = time.perf_counter() - self._t0
        replace_file(os.path.join(self.dir, "summary.json"), json.dumps(summary, indent=2).encode())
        return summary


def summarize(rounds: Sequence[Mapping[str, Any]], config: Mapping[str, Any]) -> dict[str, Any]:
    trained = [r for r in rounds if r["round"] > 0]
    evaluated = [r for r in rounds if r.get("accuracy") is not None]
    best = max(evaluated, key=lambda r: r["accuracy"], default=None)
    final = evaluated[-1] if evaluated else None
    replies = sum(r["clients"] for r in trained)

    def mean(key: str) -> float | None:
        values = [r[key] for r in trained if r.get(key) is not None]
        return sum(values) / len(values) if values else None

    return {
        "method": config.get("method"),
        "task": config.get("task"),
        "rounds": len(trained),
        "final_accuracy": None if final is None else final["accuracy"],
        "final_round": None if final is None else final["round"],
        "best_accuracy": None if best is None else best["accuracy"],
        "best_round": None if best is None else best["round"],
        "initial_accuracy": next((r["accuracy"] for r in rounds if r["round"] == 0), None),
        "totals": {
            "bytes_down": sum(r["bytes_down"] for r in trained),
            "bytes_up": sum(r["bytes_up"] for r in trained),
            "client_replies": replies,
            "failures": sum(r["failures"] for r in trained),
            "rejected": sum(r["rejected"] for r in trained),
            "seconds": sum(r["seconds"] for r in trained),
        },
        "per_client_per_round": {
            "bytes_down": sum(r["bytes_down"] for r in trained) / replies if replies else None,
            "bytes_up": sum(r["bytes_up"] for r in trained) / replies if replies else None,
            "peak_rss_mb": max((r["client_peak_rss_mb"] for r in trained if r["client_peak_rss_mb"]), default=None),
            "train_seconds": mean("client_train_seconds"),
            "seconds_per_local_step": mean("seconds_per_local_step"),
            "forward_passes": mean("client_forward_passes"),
        },
        "config": dict(config),
    }


def format_table(rounds: Sequence[Mapping[str, Any]]) -> str:
    """The end-of-run table: one line per round."""
    rows = [SUMMARY_COLUMNS]
    for r in rounds:
        n = r["clients"] or None
        rows.append(
            (
                str(r["round"]),
                "-" if r.get("accuracy") is None else f"{100 * r['accuracy']:.2f}",
                "-" if r.get("loss") is None else f"{r['loss']:.4f}",
                fmt_bytes(r["bytes_down"] / n if n else None),
                fmt_bytes(r["bytes_up"] / n if n else None),
                "-" if r.get("client_peak_rss_mb") is None else f"{r['client_peak_rss_mb']:.0f}",
                "-" if r.get("client_train_seconds") is None else f"{r['client_train_seconds']:.1f}",
                f"{r['seconds']:.1f}",
            )
        )
    return text_table(rows)


def text_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells (the first one the header) as right-aligned columns."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows)
