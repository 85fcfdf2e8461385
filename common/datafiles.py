"""Tasks from the user's own data: a local `.jsonl`, `.csv` or `.parquet` file, or a Hugging Face dataset id.

`task` names a built-in GLUE/SuperGLUE task (common/tasks.py), or a path to such a file, or `hf:org/name`
(`hf:org/name:config` for a dataset with configurations). Two kinds (`task-kind`, inferred from the columns
when "auto"):

- `classification`: a text column (`data.text-column`, default "text"), optionally a second text
  (`data.text-pair-column`, "text_pair", used when the file has it) and a label (`data.label-column`,
  "label"), as strings or integers. The label set is `data.labels` when given (a comma list, in label order),
  else the sorted distinct labels of the task file (integers sorted as numbers). A decoder scores the label
  words (`data.label-words`, one per label; default: the label names) with its own LM head.
- `instruction`: `data.prompt-column` ("prompt") and `data.response-column` ("response"), with an optional
  `data.input-column` ("input", appended to the prompt: the Alpaca layout) and `data.system-column`
  ("system"); or a chat column `data.messages-column` ("messages"): a list of {"role", "content"} whose last
  message is the assistant's answer, the one the loss is computed on.

Evaluation split: `data.eval-file` when given (same layout), else a held-out `data.eval-fraction` (default
0.1) of the task file, cut by a seeded permutation (seed 0, whatever the run seed), so every method of every
run on a file is scored on the same rows. A Hugging Face dataset uses its "validation" (or "test") split where
it has one.

Every problem is reported before anything trains, as `file:line: ...` (JSONL, CSV: the file's own line
numbers; Parquet: `file: row N`; a Hub dataset: `hf:id [split] row N`) naming the column and what to change.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np

FILE_SUFFIXES = (".jsonl", ".csv", ".parquet")
HUB_PREFIX = "hf:"
KINDS = ("classification", "instruction")
EVAL_SPLIT_SEED = 0
ROLES = ("system", "user", "assistant")


class DataError(ValueError):
    """Data that cannot be trained on; the message names the file, the line and the column, and the fix."""


def is_data_task(task: str) -> bool:
    """Whether `task` names a file or a Hub dataset rather than a built-in task."""
    return task.startswith(HUB_PREFIX) or task.lower().endswith(FILE_SUFFIXES)


@dataclass(frozen=True)
class Row:
    where: str  # "path:line" or "path: row N": where an error about this row points
    values: dict[str, Any]


@dataclass(frozen=True)
class Columns:
    """The run-config keys naming the columns (data.*-column), with their defaults."""

    text: str = "text"
    text_pair: str = "text_pair"
    label: str = "label"
    prompt: str = "prompt"
    response: str = "response"
    input: str = "input"
    system: str = "system"
    messages: str = "messages"
    client: str = ""

    @classmethod
    def of(cls, data_cfg) -> Columns:
        return cls(
            data_cfg.text_column, data_cfg.text_pair_column, data_cfg.label_column, data_cfg.prompt_column,
            data_cfg.response_column, data_cfg.input_column, data_cfg.system_column, data_cfg.messages_column,
            data_cfg.client_column,
        )  # fmt: skip


# ------------------------------------------------------------------------------------------- reading


def _decode_error(path: str, raw: bytes, err: UnicodeDecodeError, offset: int = 0) -> DataError:
    line = raw[: offset + err.start].count(b"\n") + 1
    return DataError(
        f"{path}:{line}: not UTF-8 (byte {offset + err.start} of the file is {raw[offset + err.start]:#04x}): "
        "save the file as UTF-8"
    )


def _jsonl_rows(path: str) -> Iterator[Row]:
    with open(path, "rb") as fh:
        raw = fh.read()
    start = 0
    for number, line in enumerate(raw.split(b"\n"), start=1):
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise _decode_error(path, raw, err, start) from None
        start += len(line) + 1
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: a JSONL line must be one JSON object, got {type(record).__name__}")
        yield Row(f"{path}:{number}", record)


def _csv_rows(path: str) -> Iterator[Row]:
    with open(path, "rb") as fh:
        raw = fh.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise _decode_error(path, raw, err) from None
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    for row in reader:
        line = reader.line_num
        if header is None:
            header = row
            if not header or any(not h.strip() for h in header):
                raise DataError(f"{path}:1: the first line must name every column (a CSV header), got {row}")
            continue
        if not row or row == [""]:
            continue
        if len(row) != len(header):
            raise DataError(f"{path}:{line}: {len(row)} fields, but the header names {len(header)}: {header}")
        yield Row(f"{path}:{line}", dict(zip(header, row, strict=True)))


def _parquet_rows(path: str) -> Iterator[Row]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ...: all mean "not a Parquet file"
        raise DataError(f"{path}: cannot read it as Parquet ({err})") from None
    for i, record in enumerate(table.to_pylist(), start=1):
        yield Row(f"{path}: row {i}", record)


def _hub_dataset(task: str) -> datasets.DatasetDict:
    ident = task[len(HUB_PREFIX) :]
    name, _, config = ident.partition(":")
    if not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise DataError(f"task '{task}': a Hugging Face dataset is 'hf:org/name' or 'hf:org/name:config'")
    try:
        return datasets.load_dataset(name, config or None)
    except Exception as err:  # offline, unknown id, gated: datasets raises many kinds
        raise DataError(
            f"task '{task}': cannot load the dataset '{name}' from the Hugging Face Hub ({err}); offline, "
            "give a local .jsonl, .csv or .parquet file"
        ) from None


def _hub_rows(task: str, split: str) -> Iterator[Row]:
    ds = _hub_dataset(task)
    for i, record in enumerate(ds[split], start=1):
        yield Row(f"{task} [{split}] row {i}", dict(record))


def hub_splits(task: str) -> tuple[str, str | None]:
    """(train split, evaluation split or None) of a Hub dataset."""
    names = list(_hub_dataset(task))
    train = "train" if "train" in names else names[0]
    dev = next((s for s in ("validation", "dev", "test") if s in names and s != train), None)
    return train, dev


def read_rows(source: str, split: str = "train") -> list[Row]:
    """Every row of a file (or of a Hub dataset's split); an empty or missing file is an error."""
    if source.startswith(HUB_PREFIX):
        rows = list(_hub_rows(source, split))
    else:
        if not os.path.isfile(source):
            where = os.path.dirname(source) or "."
            raise DataError(f"data file '{source}' not found (looked in {os.path.abspath(where)}): give its path")
        suffix = os.path.splitext(source)[1].lower()
        reader = {".jsonl": _jsonl_rows, ".csv": _csv_rows, ".parquet": _parquet_rows}.get(suffix)
        if reader is None:
            raise DataError(f"data file '{source}': unknown format '{suffix}'; use one of {', '.join(FILE_SUFFIXES)}")
        rows = list(reader(source))
    if not rows:
        raise DataError(f"data file '{source}' holds no examples: it is empty")
    return rows


# ------------------------------------------------------------------------------------------- kinds


def infer_kind(rows: list[Row], cols: Columns, source: str) -> str:
    """instruction when the first row has a messages column or a prompt and a response column; classification
    when it has a text and a label column; else an error listing the columns found."""
    have = set(rows[0].values)
    if cols.messages in have or {cols.prompt, cols.response} <= have:
        return "instruction"
    if {cols.text, cols.label} <= have:
        return "classification"
    raise DataError(
        f"{rows[0].where}: cannot tell the task kind from the columns {sorted(have)}: an instruction task needs "
        f"'{cols.prompt}' and '{cols.response}' (or '{cols.messages}'), a classification task '{cols.text}' and "
        f"'{cols.label}'. Name yours with data.prompt-column, data.response-column, data.text-column, "
        "data.label-column, or set task-kind"
    )


def _field(row: Row, column: str, what: str, key: str, required: bool = True) -> str | None:
    if column not in row.values or row.values[column] is None:
        if not required:
            return None
        raise DataError(
            f"{row.where}: no column '{column}' ({what}; columns here: {sorted(row.values)}): set {key} to the "
            "column that holds it"
        )
    value = row.values[column]
    if not isinstance(value, str):
        raise DataError(f"{row.where}: column '{column}' must be text, got {type(value).__name__} {value!r}")
    return value


def label_name(value: Any) -> str:
    """A label as the text it is known by: strings as they are, integers in decimal, booleans as true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise DataError(f"a label must be a string or an integer, got {type(value).__name__} {value!r}")


def sorted_labels(names: set[str]) -> tuple[str, ...]:
    """Integers as numbers (2 before 10), anything else as text."""
    if all(re.fullmatch(r"-?\d+", n) for n in names):
        return tuple(sorted(names, key=int))
    return tuple(sorted(names))


def row_label(row: Row, cols: Columns) -> str:
    if cols.label not in row.values or row.values[cols.label] is None:
        raise DataError(
            f"{row.where}: no column '{cols.label}' (the label; columns here: {sorted(row.values)}): set "
            "data.label-column"
        )
    try:
        return label_name(row.values[cols.label])
    except DataError as err:
        raise DataError(f"{row.where}: column '{cols.label}': {err}") from None


def classification_columns(rows: list[Row], cols: Columns, labels: tuple[str, ...], pair: bool) -> dict[str, list[Any]]:
    """text, [text_pair], label (index into `labels`), [client]: the normalised columns."""
    index = {name: i for i, name in enumerate(labels)}
    out: dict[str, list[Any]] = {"text": [], "label": []}
    if pair:
        out["text_pair"] = []
    if cols.client:
        out["client"] = []
    for row in rows:
        out["text"].append(_field(row, cols.text, "the text", "data.text-column"))
        if pair:
            out["text_pair"].append(_field(row, cols.text_pair, "the second text", "data.text-pair-column"))
        name = row_label(row, cols)
        if name not in index:
            raise DataError(
                f"{row.where}: column '{cols.label}': unknown label {name!r} (the labels are {list(labels)}): fix "
                "the row, or list every label in data.labels"
            )
        out["label"].append(index[name])
        if cols.client:
            out["client"].append(client_of(row, cols))
    return out


def client_of(row: Row, cols: Columns) -> str:
    if cols.client not in row.values or row.values[cols.client] is None:
        raise DataError(f"{row.where}: no column '{cols.client}' (data.client-column: the client that holds the row)")
    return str(row.values[cols.client])


def _messages(row: Row, cols: Columns) -> list[dict[str, str]]:
    value = row.values[cols.messages]
    if isinstance(value, str):  # a CSV cell holding JSON
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{row.where}: column '{cols.messages}' must be a list of messages (JSON)") from None
    if not isinstance(value, list) or not value:
        raise DataError(f"{row.where}: column '{cols.messages}' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(value):
        if not (isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)):
            raise DataError(
                f"{row.where}: column '{cols.messages}', message {i}: must be {{\"role\": one of {list(ROLES)}, "
                f'"content": text}}, got {m!r}'
            )
        out.append({"role": m["role"], "content": m["content"]})
    if out[-1]["role"] != "assistant":
        raise DataError(
            f"{row.where}: column '{cols.messages}': the last message must be the assistant's (the response the "
            f"model learns), got role '{out[-1]['role']}'"
        )
    if not any(m["role"] == "user" for m in out[:-1]):
        raise DataError(f"{row.where}: column '{cols.messages}': no user message before the answer")
    return out


def instruction_columns(rows: list[Row], cols: Columns) -> dict[str, list[Any]]:
    """messages (JSON text: the conversation up to the answer), response, where, [client]."""
    out: dict[str, list[Any]] = {"messages": [], "response": [], "where": []}
    if cols.client:
        out["client"] = []
    for row in rows:
        if cols.messages in row.values and row.values[cols.messages] is not None:
            conversation = _messages(row, cols)
            prompt, response = conversation[:-1], conversation[-1]["content"]
        else:
            text = _field(row, cols.prompt, "the prompt", "data.prompt-column")
            response = _field(row, cols.response, "the response", "data.response-column")
            extra = _field(row, cols.input, "the input", "data.input-column", required=False)
            system = _field(row, cols.system, "the system message", "data.system-column", required=False)
            if extra:
                text = f"{text}\n\n{extra}"
            prompt = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        if not response.strip():
            raise DataError(f"{row.where}: the response is empty: the loss is computed on it, so it needs text")
        out["messages"].append(json.dumps(prompt, ensure_ascii=False))
        out["response"].append(response)
        out["where"].append(row.where)
        if cols.client:
            out["client"].append(client_of(row, cols))
    return out


def held_out(n: int, fraction: float, source: str) -> tuple[list[int], list[int]]:
    """(train rows, evaluation rows) of a file without an evaluation file: a seeded cut, seed 0."""
    n_dev = max(1, round(fraction * n))
    if n - n_dev < 1:
        raise DataError(
            f"data file '{source}' has {n} examples: too few to hold out data.eval-fraction = {fraction} of them "
            "and train on the rest; give more rows or a data.eval-file"
        )
    perm = np.random.default_rng(EVAL_SPLIT_SEED).permutation(n)
    return sorted(perm[n_dev:].tolist()), sorted(perm[:n_dev].tolist())


def to_dataset(columns: dict[str, list[Any]]) -> datasets.Dataset:
    features = {k: datasets.Value("int64" if k == "label" else "string") for k in columns}
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))
