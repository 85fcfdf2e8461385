"""The server's checkpoint: everything a run needs to continue after its last completed round.

Written by the ServerApp after every completed round to `<results-dir>/<run-name>/checkpoint.safetensors`
and read back by a run whose `resume-from` names that file (or its folder). The checkpoint holds only what
is small and is replaced whole each round (one rename); what grows by a row or an entry a round lives beside
it in files that are only appended to: the run's records (rounds.jsonl and the method's own <name>.jsonl,
common/records.py), of which the checkpoint keeps each file's row count and SHA-256, and the update log of
FedKRSO, FedSPZO and FedKSeed, one segment file per round, each written once. A round therefore writes about
its own row and entry however long the run has been going.

Format (version 3): a safetensors file (numbers only: never a pickle, nothing executed on load).
  tensors   "<strategy key>"  the method's own tensors (its strategy's `state_dict()`):
                              FedAvg, FedAvg-LoRA: "arrays/<name>", the global values of every parameter
                                they train, float32 (the names every version has given them)
                              FedKRSO, FedSPZO, FedKSeed: the records of the method's instruction for round
                                T+1 other than its "log" (FedKRSO: "head/<name>"; the others: none), in its
                                wire format (common/<method>/wire.py), each record's arrays under
                                "<record>/<key>"; the log itself is in the segments below
                              FedTT, FedTT+: "cores/<adapter>.<down|up>.<core>" and "head/<name>", float32
  metadata  "format"   "fedsubspace-server-checkpoint"
            "version"  "3"
            "state"    JSON: {"round": T (the last completed round), "flower-run-id": the run that wrote it,
                              "config": the run config as flat run-config keys,
                              "strategy": the strategy's JSON state (RNG state of client sampling, node_round
                                map, FedTT+ scores, the model digest of log methods, and for them "log-head":
                                the SHA-256 of segment T, which binds the checkpoint to exactly the log 1..T),
                              "records": {"rounds": {"rows": T + 1, "sha256": hex SHA-256 of the first T + 1
                                lines of rounds.jsonl beside it, newlines included}, "<name>": the same for
                                the lines of <name>.jsonl that were written by then}}
            "sha256"   hex SHA-256 over the format name, the version, the "state" text and every tensor
                       (name, dtype, shape, bytes) in name order

Update-log segments (log methods only): `<records>/log/round-<t, 6 digits>.safetensors` for t = 1..T, one per
round, each a safetensors file holding the method's instruction for round t+1 to a node that holds round t-1,
in the wire format, less the records the checkpoint holds:
  tensors   "log/<key>"  the instruction's "log" record: round t's entry only
  metadata  "format"     "fedsubspace-update-log-segment"
            "version"    "1"
            "round"      t
            "configs"    JSON: the instruction's ConfigRecords ({record: {key: value}}; server-round t+1,
                         log-first t)
            "previous"   hex SHA-256 of segment t-1 (64 zeros for t = 1)
            "sha256"     hex SHA-256 over the format name, the version, the round, "previous", the "configs"
                         text and every tensor (name, dtype, shape, bytes) in name order
Each segment's digest covers the previous one's, so the digests form a chain whose head (segment T's) the
checkpoint holds. A round writes its segment first (common.files.replace_file), then the checkpoint: a crash
in between leaves a segment T+1 that no checkpoint names; it is ignored and written again by the next
round T+1. Resuming reads segments 1..T in order, checks each, and replays each as the instruction it is
(the method's checked unpacking), so the model is rebuilt exactly as from a version-1 checkpoint. A run
resumed into another records folder writes the whole log into its own folder with its first checkpoint,
the same segments with the same digests (packing is deterministic; a digest covers the tensors in name
order), so the new folder can be resumed from alone.

Records: resuming reads the first "rows" lines of each records file beside the checkpoint, checks their
SHA-256 and their rows (rounds.jsonl: rounds 0..T, each a row that can be summarized), and drops any line
after them (written by a round whose checkpoint never followed). A run resumed into another records folder
reads them from the checkpoint's folder and writes them into its own (common.records.RunRecorder), where
they hash to the same digests. The recorder fsyncs every row before the checkpoint that counts it is written.

Version 2 (still read): the same file with the records' rows themselves in the state ("records":
{"rounds": rows 0..T, "<name>": rows}), rewritten whole each round. Version 1 (still read): as version 2, and
the whole update log inside it, as the instruction for round T+1 carrying rounds 1..T ("log/..." tensors
beside "head/...") and its ConfigRecords in the strategy state under "instruction"; no segments. A run
resumed from either continues in version 3, writing the segments and the records' digests.

Reading refuses, with a CheckpointError that names the file and says what is wrong: a missing file, anything
that is not a complete safetensors file (torn), another format or version, a checksum that does not match (a
flipped byte, an edited round); for a segment also one that is missing, holds another round than its name says
(renamed or reordered), does not follow the previous segment's digest, or (segment T) is not the one the
checkpoint names as the log's head; for a records file one that is missing, holds fewer lines than the
checkpoint counts (truncated) or other ones (edited, replaced); and, checksum or not, any field of the wrong
type or range (records that do not run 0..T or cannot be summarized, a config that is not run-config keys;
each strategy's own fields, e.g. its RNG state, through strategy_field when it loads them), and model values
that are not finite or exceed CHECKPOINT_BOUND (the bound a reply's are held to, with the instructions'
slack): a checkpoint is input. Whether the run config allows resuming from it is checked by
common.config.check_resume. CheckpointError, strategy_field and CHECKPOINT_BOUND live in server_app/state.py,
beside the other checks of a strategy's own state.

Writing is atomic (common.files.replace_file): the bytes go to `<file>.tmp`, created exclusively (a link
planted there is removed, never followed), fsynced and renamed over the file; a crash at any point leaves
the previous checkpoint whole.

Check and describe a checkpoint (exit status 0 when it is whole, 1 with the reason when it is not):
    python -m server_app.checkpoint results/<run-name>
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from common.files import NotAFile, open_file, replace_file
from common.records import records_digest, row_problem
from common.runfolder import CHECKPOINT
from server_app.state import CheckpointError, is_configs, is_int, is_sha256

FORMAT = "fedsubspace-server-checkpoint"
VERSION = 3
READS = (1, 2, 3)  # the versions `read` accepts
ROWS_INSIDE = (1, 2)  # the versions that hold the records' rows themselves (3: their count and digest)
RECORD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a records file <name>.jsonl beside the checkpoint
FILENAME = CHECKPOINT
SEGMENT_FORMAT = "fedsubspace-update-log-segment"
SEGMENT_VERSION = 1
LOG_DIR = "log"  # the segments' folder, beside the checkpoint
LOG_RECORD = "log"  # the instruction record a segment holds (the same name in every log method's wire)
LOG_HEAD = "log-head"  # the strategy state key of the chain head
GENESIS = "0" * 64  # what segment 1 follows


@dataclass
class ServerState:
    round: int  # the last completed round T
    config: dict[str, Any]  # the run config that wrote it (flat run-config keys)
    tensors: dict[str, np.ndarray]  # the strategy's tensors
    strategy: dict[str, Any]  # the strategy's JSON state
    # "rounds": rounds.jsonl rows 0..T, and other .jsonl records: as read back (written: `written`)
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    run_id: int = 0  # the Flower run that wrote it
    path: str = ""  # the file it was read from (named in every error about it)
    log: list[Segment] | None = None  # segments 1..T, read and checked (version 2 of a log method)
    # per record, {"rows", "sha256"} of its file as written (common.records.RunRecorder.digests), what the
    # checkpoint keeps; None: computed from `records`
    written: dict[str, dict[str, Any]] | None = None


@dataclass
class Segment:
    """One round's entry of the update log: the instruction records it holds, checked whole."""

    round: int
    tensors: dict[str, np.ndarray]  # "log/<key>"
    configs: dict[str, dict[str, Any]]  # the instruction's ConfigRecords
    digest: str  # its SHA-256, which the next segment names as "previous"
    path: str = ""


def checkpoint_path(path: str) -> str:
    """A `resume-from` value: the checkpoint file itself, or the run's records folder holding it."""
    return os.path.join(path, FILENAME) if os.path.isdir(path) else path


def records_folder(path: str) -> str:
    """The run records folder a `resume-from` value names (the folder itself, or the checkpoint's folder)."""
    return os.path.dirname(os.path.abspath(checkpoint_path(path)))


def _digest(state_text: str, tensors: Mapping[str, np.ndarray], version: int = VERSION, head: str = "") -> str:
    h = hashlib.sha256()
    h.update(head.encode() if head else f"{FORMAT}\0{version}\0".encode())
    h.update(state_text.encode())
    for name in sorted(tensors):
        t = np.ascontiguousarray(tensors[name])
        h.update(f"\0{name}\0{t.dtype.str}\0{list(t.shape)}\0".encode())
        h.update(t.tobytes())
    return h.hexdigest()


def _numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu").contiguous().numpy()
    return np.ascontiguousarray(value)


def write(path: str, state: ServerState) -> None:
    """Write `state` to `path` atomically (common.files.replace_file)."""
    tensors = {k: _numpy(v) for k, v in state.tensors.items()}
    text = json.dumps(
        {
            "round": state.round,
            "flower-run-id": state.run_id,
            "config": state.config,
            "strategy": state.strategy,
            "records": state.written if state.written is not None else _digests(state.records),
        },
        allow_nan=True,
    )
    meta = {"format": FORMAT, "version": str(VERSION), "state": text, "sha256": _digest(text, tensors, VERSION)}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    replace_file(path, st_save(tensors, metadata=meta))


def _digests(records: Mapping[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    return {name: records_digest(rows) for name, rows in records.items()}


def log_dir(checkpoint_file: str) -> str:
    """The folder of the update-log segments beside a checkpoint file."""
    return os.path.join(os.path.dirname(os.path.abspath(checkpoint_file)), LOG_DIR)


def segment_path(folder: str, t: int) -> str:
    return os.path.join(folder, f"round-{t:06d}.safetensors")


def _segment_digest(t: int, previous: str, configs_text: str, tensors: Mapping[str, np.ndarray]) -> str:
    head = f"{SEGMENT_FORMAT}\0{SEGMENT_VERSION}\0{t}\0{previous}\0"
    return _digest(configs_text, tensors, head=head)


def write_segment(folder: str, t: int, tensors: Mapping[str, Any], configs: Mapping[str, Any], previous: str) -> str:
    """Write round t's segment (atomically, common.files.replace_file), following the segment of digest
    `previous`; returns its digest. `tensors` are the "log/<key>" arrays of the method's instruction."""
    arrays = {k: _numpy(v) for k, v in tensors.items()}
    stray = [k for k in arrays if not k.startswith(LOG_RECORD + "/")]
    if stray:
        raise ValueError(f"a segment holds only the '{LOG_RECORD}' record, not {stray[:3]}")
    text = json.dumps(configs)
    digest = _segment_digest(t, previous, text, arrays)
    meta = {
        "format": SEGMENT_FORMAT,
        "version": str(SEGMENT_VERSION),
        "round": str(t),
        "configs": text,
        "previous": previous,
        "sha256": digest,
    }
    os.makedirs(folder, exist_ok=True)
    replace_file(segment_path(folder, t), st_save(arrays, metadata=meta))
    return digest


def read_trusted(path: str, what: str) -> bytes:
    """The bytes of a file the server trusts once checked (its checkpoint, update log and records), never
    read through a link (common.files.open_file): a link planted in the run folder is refused, naming it."""
    try:
        with os.fdopen(open_file(path, os.O_RDONLY), "rb") as f:
            return f.read()
    except NotAFile as exc:
        raise CheckpointError(f"resume-from: {what}: {exc}; or resume from another copy") from exc


def _safetensors(path: str, what: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; CheckpointError if it is torn or not one."""
    data = read_trusted(path, what)
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8 : 8 + header_len]).get("__metadata__") or {}
    except Exception as exc:  # safetensors refuses anything short, overlong or malformed
        raise CheckpointError(f"resume-from: '{path}' is torn or not {what} ({exc})") from exc
    return tensors, meta


def _json(path: str, text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise CheckpointError(f"resume-from: '{path}' has {what} that is not JSON ({exc})") from exc


def read_segments(checkpoint_file: str, done: int, head: str) -> list[Segment]:
    """Segments 1..`done` beside `checkpoint_file`, each checked and chained, the last one's digest `head`.

    Segments after `done` (written by a round whose checkpoint never followed) are not read."""
    folder = log_dir(checkpoint_file)
    segments: list[Segment] = []
    previous = GENESIS
    for t in range(1, done + 1):
        path = segment_path(folder, t)
        if not os.path.isfile(path):
            raise CheckpointError(
                f"resume-from: '{path}' is missing: the update log beside '{checkpoint_file}' must hold every "
                f"round 1..{done}; copy the run's '{LOG_DIR}' folder with its checkpoint"
            )
        tensors, meta = _safetensors(path, "an update-log segment")
        if meta.get("format") != SEGMENT_FORMAT or meta.get("version") != str(SEGMENT_VERSION):
            raise CheckpointError(
                f"resume-from: '{path}' is not an update-log segment of version {SEGMENT_VERSION} "
                f"(format {meta.get('format')!r}, version {meta.get('version')!r})"
            )
        text = meta.get("configs", "")
        digest = _segment_digest(t, meta.get("previous", ""), text, tensors)
        if meta.get("round") != str(t):
            raise CheckpointError(
                f"resume-from: '{path}' holds round {str(meta.get('round'))[:20]!r}, not round {t}: "
                "segments were renamed or reordered"
            )
        if meta.get("sha256") != digest:
            raise CheckpointError(
                f"resume-from: '{path}' fails its SHA-256 check: the segment was altered or damaged after it "
                "was written; resume from another copy or start a fresh run"
            )
        if meta.get("previous") != previous:
            raise CheckpointError(
                f"resume-from: '{path}' does not follow the segment of round {t - 1} (its digest chain is "
                "broken): a segment was replaced by one of another run or another order"
            )
        configs = _json(path, text, "a 'configs' field")
        stray = [k for k in tensors if not k.startswith(LOG_RECORD + "/")]
        if not is_configs(configs) or stray:
            raise CheckpointError(
                f"resume-from: '{path}' holds other records than an instruction's log and configs "
                f"({stray[:3] or str(configs)[:60]})"
            )
        segments.append(Segment(t, tensors, configs, digest, path))
        previous = digest
    if previous != head:
        raise CheckpointError(
            f"resume-from: the update log in '{folder}' ends with digest {previous[:16]}..., but '{checkpoint_file}' "
            f"was written after the log ending {head[:16]}...: the segments are not the ones of this checkpoint"
        )
    return segments


def read(resume_from: str) -> ServerState:
    """The checkpoint named by `resume-from`, checked whole; raises CheckpointError naming what is wrong."""
    path = checkpoint_path(resume_from)
    if not os.path.isfile(path):
        where = f"no {FILENAME} in folder '{resume_from}'" if os.path.isdir(resume_from) else f"'{path}' does not exist"
        if os.path.isfile(os.path.join(records_folder(resume_from), "rounds.jsonl")):
            raise CheckpointError(
                f"resume-from: {where}, only records: the run stopped before its first checkpoint (written after "
                "round 1), so there is nothing to resume; start it again under its run-name without resume-from "
                "(its records are moved aside and it runs from round 0)"
            )
        raise CheckpointError(
            f"resume-from: {where}; point it at a run's checkpoint file or its records folder "
            f"(<results-dir>/<run-name>/{FILENAME}, written after each completed round)"
        )
    tensors, meta = _safetensors(path, "a checkpoint")
    if meta.get("format") != FORMAT:
        raise CheckpointError(
            f"resume-from: '{path}' is not a fedsubspace server checkpoint (format {meta.get('format')!r})"
        )
    version = next((v for v in READS if meta.get("version") == str(v)), None)
    if version is None:
        raise CheckpointError(
            f"resume-from: '{path}' has checkpoint format version {meta.get('version')!r}; this code reads versions "
            f"{', '.join(map(str, READS))}: resume it with the code that wrote it"
        )
    text = meta.get("state", "")
    if meta.get("sha256") != _digest(text, tensors, version):
        raise CheckpointError(
            f"resume-from: '{path}' fails its SHA-256 check: the file was altered or damaged after it was written; "
            "resume from another copy or start a fresh run"
        )
    # The checksum proves the file is what its writer wrote, not that the writer wrote sense (a checksum can be
    # recomputed after an edit): every field is checked by type and range before anything uses it.
    state = _json(path, text, "a state")
    problem = _state_problem(state, version)
    if not problem and version > 1 and LOG_HEAD in state["strategy"] and not is_sha256(state["strategy"][LOG_HEAD]):
        problem = f"has a strategy state whose '{LOG_HEAD}' is not a SHA-256 digest"
    if problem:
        raise CheckpointError(f"resume-from: '{path}' {problem}; resume from another copy or start a fresh run")
    records = state["records"]
    if version not in ROWS_INSIDE:
        records = read_records(path, records, state["round"])
    segments = None
    if version > 1 and LOG_HEAD in state["strategy"]:
        segments = read_segments(path, state["round"], state["strategy"][LOG_HEAD])
    return ServerState(
        round=state["round"],
        config=state["config"],
        tensors=tensors,
        strategy=state["strategy"],
        records=records,
        run_id=state["flower-run-id"],
        path=path,
        log=segments,
    )


def _state_problem(state: Any, version: int = VERSION) -> str | None:
    """What is wrong with a checkpoint's JSON state, or None: the fields every method's state has."""
    if not isinstance(state, dict):
        return f"has a state that is a {type(state).__name__}, not an object"
    missing = [k for k in ("round", "flower-run-id", "config", "strategy", "records") if k not in state]
    if missing:
        return f"has an incomplete state (no {', '.join(missing)})"
    done, config, records = state["round"], state["config"], state["records"]
    if not is_int(done, 1):
        return f"has round {str(done)[:40]!r}, not a round number >= 1"
    if not is_int(state["flower-run-id"]):
        return f"has flower-run-id {str(state['flower-run-id'])[:40]!r}, not a run id"
    if not isinstance(config, dict) or not all(
        isinstance(k, str) and isinstance(v, (str, int, float, bool)) for k, v in config.items()
    ):
        return f"has a config that is not run-config keys and values ({str(config)[:60]})"
    if not isinstance(state["strategy"], dict):
        return f"has a strategy state that is a {type(state['strategy']).__name__}, not an object"
    if version not in ROWS_INSIDE:
        return _digests_problem(records, done)
    if not isinstance(records, dict) or not all(isinstance(v, list) for v in records.values()):
        return "has records that are not lists of rows"
    if "rounds" not in records:
        return "has round records that are not rows"
    for name, rows in records.items():
        if problem := _rows_problem(name, rows, done):
            return problem
    return None


def _rows_problem(name: str, rows: list, done: int) -> str | None:
    """What keeps the rows of record `name` from continuing a run whose last completed round is `done`."""
    if name == "rounds":
        if not all(isinstance(r, dict) for r in rows):
            return "has round records that are not rows"
        if [r.get("round") for r in rows] != list(range(done + 1)):
            return f"says round {done} but holds the records of rounds {[r.get('round') for r in rows][:12]}: it is inconsistent"
    for row in rows:
        if problem := row_problem(row, name == "rounds"):
            return f"has a {name} record that cannot be summarized ({problem})"
    return None


def _digests_problem(records: Any, done: int) -> str | None:
    """What is wrong with a version-3 checkpoint's "records": {name: {"rows": count, "sha256": digest}}."""
    if not isinstance(records, dict) or not all(
        isinstance(name, str)
        and RECORD_NAME.fullmatch(name)
        and isinstance(d, dict)
        and set(d) == {"rows", "sha256"}
        and is_int(d["rows"])
        and is_sha256(d["sha256"])
        for name, d in records.items()
    ):
        return f"has records that are not the row counts and SHA-256 digests of .jsonl files ({str(records)[:80]})"
    counted = records.get("rounds", {}).get("rows")
    if counted != done + 1:
        return f"says round {done} but counts {counted} rows of rounds.jsonl, not {done + 1}: it is inconsistent"
    return None


def read_records(checkpoint_file: str, digests: Mapping[str, Mapping[str, Any]], done: int) -> dict[str, list]:
    """The records beside `checkpoint_file`: of each `<name>.jsonl` the first digests[name]["rows"] lines,
    checked against their SHA-256 and as rows; lines after them (a round whose checkpoint never followed) are
    dropped."""
    folder = os.path.dirname(os.path.abspath(checkpoint_file))
    records: dict[str, list] = {}
    for name, expected in digests.items():
        path, count = os.path.join(folder, f"{name}.jsonl"), expected["rows"]
        if not os.path.isfile(path):
            if count == 0:
                records[name] = []
                continue
            raise CheckpointError(
                f"resume-from: '{path}' is missing: '{checkpoint_file}' was written after its first {count} rows; "
                "copy the run's records (its .jsonl files) with its checkpoint"
            )
        lines = read_trusted(path, "a records file").split(b"\n")[:-1]  # complete lines: a crash may cut the last
        if len(lines) < count:
            raise CheckpointError(
                f"resume-from: '{path}' holds {len(lines)} complete rows, but '{checkpoint_file}' was written after "
                f"its first {count}: the file was truncated or replaced; resume from another copy or start a fresh run"
            )
        lines = lines[:count]
        if hashlib.sha256(b"".join(line + b"\n" for line in lines)).hexdigest() != expected["sha256"]:
            raise CheckpointError(
                f"resume-from: '{path}' fails its SHA-256 check: its first {count} rows are not the ones "
                f"'{checkpoint_file}' was written after (a row was edited, or the file replaced); resume from "
                "another copy or start a fresh run"
            )
        try:
            rows = [json.loads(line) for line in lines]
        except ValueError as exc:
            raise CheckpointError(f"resume-from: '{path}' has a row that is not JSON ({exc})") from exc
        if problem := _rows_problem(name, rows, done):
            raise CheckpointError(f"resume-from: '{path}' {problem}; resume from another copy or start a fresh run")
        records[name] = rows
    return records


def describe(state: ServerState) -> str:
    """A few lines on a checkpoint: the run, its progress, what it holds."""
    c = state.config
    last = state.records["rounds"][-1]
    sizes = {
        "the method's tensors": sum(t.nbytes for t in state.tensors.values()),
        f"update log in {len(state.log or ())} chained segments": sum(
            t.nbytes for s in state.log or () for t in s.tensors.values()
        ),
    }
    held = ", ".join(f"{n / 2**20:.2f} MB {what}" for what, n in sizes.items() if n) or "no tensors"
    return (
        f"{c.get('method')} on {c.get('task')} (model {c.get('model') or 'embedded MiniLM'}, seed {c.get('seed')}): "
        f"round {state.round} of {c.get('num-server-rounds')} done, written by Flower run {state.run_id}\n"
        f"holds {held}; records of rounds 0..{state.round}, last accuracy {last.get('accuracy')}\n"
        f"resume with: resume-from='<this path>' num-server-rounds=N (N > {state.round}) and the same settings"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m server_app.checkpoint <checkpoint file or run records folder>", file=sys.stderr)
        return 2
    try:
        state = read(args[0])
    except CheckpointError as exc:
        print(f"not usable: {exc}", file=sys.stderr)
        return 1
    print(f"{checkpoint_path(args[0])}: whole (SHA-256 checked)\n{describe(state)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
