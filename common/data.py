"""Loading and normalising of the task data: a built-in task's splits, and the run's task (`task_of`: a
built-in one, or one from the user's own data, whose files common/datafiles.py reads). A client's share of a
split is common/partition.py's; a split as the model's inputs, common/encoding.py's.

Every split, local or from the Hugging Face Hub, becomes a ``datasets.Dataset`` with
columns ``text`` (str), ``text_pair`` (str, pair tasks only) and ``label`` (int), so
the rest of the code never sees a task's native format.

BoolQ: only the labelled validation file (3,270 rows) is available offline, so with a
local ``data_dir`` both BoolQ splits come from ``BoolQ/val.jsonl``, cut by a seeded
permutation (seed 0) into 80% train (2,616) / 20% dev (654). Every BoolQ figure from
local data is on this split, not on the official train / validation split (which is
what the Hub path loads).
"""

import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np

from common.tasks import TaskSpec

SPLITS = ("train", "dev")
BOOLQ_SPLIT_SEED = 0
BOOLQ_TRAIN_FRACTION = 0.8

_HUB_SPLITS = {"train": "train", "dev": "validation"}
# Hub columns holding (text, text_pair); WiC's text is additionally prefixed by "word: ".
_HUB_COLUMNS: dict[str, tuple[str, ...]] = {
    "sst2": ("sentence",),
    "rte": ("sentence1", "sentence2"),
    "mrpc": ("sentence1", "sentence2"),
    "cola": ("sentence",),
    "wic": ("sentence1", "sentence2"),
    "cb": ("premise", "hypothesis"),
    "boolq": ("question", "passage"),
}


@dataclass(frozen=True)
class _TsvLayout:
    """Where text, pair and label sit in a GLUE .tsv file, and how labels map to ints."""

    header: tuple[str, ...] | None  # None: the file has no header row (CoLA)
    num_columns: int
    text: int
    pair: int | None
    label: int
    labels: dict[str, int]


@dataclass(frozen=True)
class _JsonlLayout:
    """How a SuperGLUE .jsonl record becomes (text, text_pair, label)."""

    text: Callable[[dict], str]
    pair: str
    labels: dict[str, int]  # keyed by str() of the JSON label


_BINARY = {"0": 0, "1": 1}
_BOOL = {"True": 1, "False": 0}
_LAYOUTS: dict[str, tuple[str, dict[str, str], _TsvLayout | _JsonlLayout]] = {
    "sst2": (
        "SST-2",
        {"train": "train.tsv", "dev": "dev.tsv"},
        _TsvLayout(("sentence", "label"), 2, 0, None, 1, _BINARY),
    ),
    "rte": (
        "RTE",
        {"train": "train.tsv", "dev": "dev.tsv"},
        _TsvLayout(
            ("index", "sentence1", "sentence2", "label"),
            4,
            1,
            2,
            3,
            {"entailment": 0, "not_entailment": 1},
        ),
    ),
    "mrpc": (
        "MRPC",
        {"train": "train.tsv", "dev": "dev.tsv"},
        _TsvLayout(("Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"), 5, 3, 4, 0, _BINARY),
    ),
    "cola": (
        "CoLA",
        {"train": "train.tsv", "dev": "dev.tsv"},
        _TsvLayout(None, 4, 3, None, 1, _BINARY),
    ),
    "wic": (
        "WiC",
        {"train": "train.jsonl", "dev": "val.jsonl"},
        _JsonlLayout(lambda r: f"{r['word']}: {r['sentence1']}", "sentence2", _BOOL),
    ),
    "cb": (
        "CB",
        {"train": "train.jsonl", "dev": "val.jsonl"},
        _JsonlLayout(
            lambda r: r["premise"],
            "hypothesis",
            {"entailment": 0, "contradiction": 1, "neutral": 2},
        ),
    ),
    "boolq": (
        "BoolQ",
        {"train": "val.jsonl", "dev": "val.jsonl"},
        _JsonlLayout(lambda r: r["question"], "passage", _BOOL),
    ),
}

_Columns = tuple[list[str], list[str] | None, list[int]]

_SPLIT_CACHE: dict[tuple[str, str, str | None], datasets.Dataset] = {}


def _missing(path: str, data_dir: str) -> FileNotFoundError:
    """A FileNotFoundError that tells the user how to fix the run config."""
    where = "" if os.path.isdir(data_dir) else f" (data-dir {data_dir!r} does not exist)"
    return FileNotFoundError(
        f"Expected data file {path} not found{where}. Set data-dir to a folder in the "
        "GLUE/SuperGLUE layout (SST-2/, RTE/, MRPC/, CoLA/ with train.tsv and dev.tsv; "
        "WiC/, CB/ with train.jsonl and val.jsonl; BoolQ/val.jsonl), or leave it "
        "empty to download from the Hugging Face Hub."
    )


def _label(labels: dict[str, int], raw: object, path: str, line: int) -> int:
    try:
        return labels[str(raw)]
    except KeyError:
        raise ValueError(f"{path}:{line}: unknown label {raw!r} (expected one of {sorted(labels)})") from None


def _tsv_rows(path: str, layout: _TsvLayout) -> Iterator[tuple[int, list[str]]]:
    """Yield (line number, row); QUOTE_NONE because GLUE quotes are literal text."""
    with open(path, encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        for row in reader:
            line = reader.line_num
            if layout.header is not None and line == 1:
                if tuple(row) != layout.header:
                    raise ValueError(f"{path}:1: header {row} differs from expected {list(layout.header)}")
                continue
            if len(row) != layout.num_columns:
                raise ValueError(
                    f"{path}:{line}: expected {layout.num_columns} tab-separated columns, found {len(row)}"
                )
            yield line, row


def _read_tsv(path: str, layout: _TsvLayout) -> _Columns:
    text: list[str] = []
    pair: list[str] | None = None if layout.pair is None else []
    labels: list[int] = []
    for line, row in _tsv_rows(path, layout):
        labels.append(_label(layout.labels, row[layout.label], path, line))
        text.append(row[layout.text])
        if pair is not None:
            pair.append(row[layout.pair])
    return text, pair, labels


def _read_jsonl(path: str, layout: _JsonlLayout) -> _Columns:
    text: list[str] = []
    pair: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        for line, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
                labels.append(_label(layout.labels, record["label"], path, line))
                text.append(layout.text(record))
                pair.append(record[layout.pair])
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(f"{path}:{line}: malformed record ({err!r})") from None
    return text, pair, labels


def _boolq_split(columns: _Columns, split: str) -> _Columns:
    """Deterministic 80/20 cut of BoolQ val.jsonl, the only labelled BoolQ file offline."""
    text, pair, labels = columns
    n = len(labels)
    perm = np.random.default_rng(BOOLQ_SPLIT_SEED).permutation(n)
    n_train = round(BOOLQ_TRAIN_FRACTION * n)
    keep = np.sort(perm[:n_train] if split == "train" else perm[n_train:]).tolist()
    assert pair is not None
    return [text[i] for i in keep], [pair[i] for i in keep], [labels[i] for i in keep]


def _read_local(task: TaskSpec, split: str, data_dir: str) -> _Columns:
    folder, files, layout = _LAYOUTS[task.name]
    path = os.path.join(data_dir, folder, files[split])
    if not os.path.isfile(path):
        raise _missing(path, data_dir)
    if isinstance(layout, _TsvLayout):
        return _read_tsv(path, layout)
    columns = _read_jsonl(path, layout)
    return _boolq_split(columns, split) if task.name == "boolq" else columns


def _read_hub(task: TaskSpec, split: str) -> _Columns:
    raw = datasets.load_dataset(*task.hub, split=_HUB_SPLITS[split])
    names = _HUB_COLUMNS[task.name]
    text = [str(t) for t in raw[names[0]]]
    if task.name == "wic":
        text = [f"{w}: {t}" for w, t in zip(raw["word"], text, strict=True)]
    pair = [str(t) for t in raw[names[1]]] if len(names) == 2 else None
    return text, pair, [int(y) for y in raw["label"]]


def _to_dataset(task: TaskSpec, columns: _Columns, source: str) -> datasets.Dataset:
    """Build the normalised Dataset, rejecting labels the model head cannot represent."""
    text, pair, labels = columns
    if labels:
        lo, hi = min(labels), max(labels)
        if lo < 0 or hi >= task.num_labels:
            raise ValueError(f"{source}: labels must be in [0, {task.num_labels}), got {lo}..{hi}")
    data: dict[str, list] = {"text": text}
    features = {"text": datasets.Value("string")}
    if task.is_pair:
        if pair is None:
            raise ValueError(f"{source}: pair task {task.name} has no second text")
        data["text_pair"] = pair
        features["text_pair"] = datasets.Value("string")
    data["label"] = labels
    features["label"] = datasets.Value("int64")
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


def load_split(task: TaskSpec, split: str, data_dir: str | None) -> datasets.Dataset:
    """Load a task split, normalised, from ``data_dir`` if given else from the Hub.

    Cached per (task, split, data_dir) so every client in a process reads a file once.
    See the module docstring for how BoolQ is split when read locally.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; known splits: {', '.join(SPLITS)}")
    local_dir = os.path.abspath(data_dir) if data_dir else None
    key = (task.name, split, local_dir)
    if key not in _SPLIT_CACHE:
        if local_dir is None:
            columns, source = _read_hub(task, split), f"hub {task.hub}"
        else:
            columns, source = _read_local(task, split, local_dir), local_dir
        _SPLIT_CACHE[key] = _to_dataset(task, columns, f"{task.name}/{split} ({source})")
    return _SPLIT_CACHE[key]


# --------------------------------------------------------------------------- tasks from the user's own data

DEFAULT_TEMPLATE = "{text}\nAnswer ({choices}):"
DEFAULT_PAIR_TEMPLATE = "{text}\n{text_pair}\nAnswer ({choices}):"
TEMPLATE_FIELDS = ("text", "text_pair", "choices")


def _comma_list(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


@lru_cache(maxsize=8)
def _rows(source: str, split: str, stamp: tuple) -> list:
    from common.datafiles import read_rows

    return read_rows(source, split)


def data_rows(source: str, split: str = "train") -> list:
    """The rows of a file (cached per path and modification) or of a Hub dataset's split."""
    from common.datafiles import HUB_PREFIX

    stamp = () if source.startswith(HUB_PREFIX) or not os.path.isfile(source) else (os.stat(source).st_mtime_ns,)
    return _rows(source, split, stamp)


def _check_template(template: str, where: str) -> None:
    import string

    for _, name, _, _ in string.Formatter().parse(template):
        if name is not None and name not in TEMPLATE_FIELDS:
            raise ValueError(
                f"{where}: unknown field {{{name}}}; a template may use {{text}}, {{text_pair}}, {{choices}}"
            )


def task_of(cfg) -> TaskSpec:
    """The run's task: a built-in one by name, or one read from the run's data file (on a fleet node without
    the server's file, common.training.node_view names the node's own file instead). Both sides of a run
    derive the same spec."""
    from common.tasks import TASKS, get_task

    if cfg.task in TASKS:
        return get_task(cfg.task)
    return _data_task(cfg.task, cfg.task_kind, cfg.data)


@lru_cache(maxsize=8)
def _data_task(task: str, kind: str, data_cfg) -> TaskSpec:
    from common.datafiles import HUB_PREFIX, Columns, DataError, infer_kind, row_label, sorted_labels

    cols = Columns.of(data_cfg)
    rows = data_rows(task, _train_split(task))
    if kind == "auto":
        kind = infer_kind(rows, cols, task)
    stem = task[len(HUB_PREFIX) :] if task.startswith(HUB_PREFIX) else os.path.splitext(os.path.basename(task))[0]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", stem).strip("-.") or "data"
    if kind == "instruction":
        return TaskSpec(name, ("prompt",), 0, ("accuracy",), ("", ""), "eval", kind=kind, source=task)
    if data_cfg.labels.strip():
        labels = _comma_list(data_cfg.labels)
        if len(set(labels)) != len(labels):
            raise DataError(f"data.labels '{data_cfg.labels}' names a label twice")
    else:
        labels = sorted_labels({row_label(r, cols) for r in rows})
    if len(labels) < 2:
        raise DataError(f"{task}: a classification task needs at least 2 labels, found {list(labels)}")
    words = _comma_list(data_cfg.label_words) or labels
    if len(words) != len(labels):
        raise DataError(
            f"data.label-words gives {len(words)} words for {len(labels)} labels {list(labels)}: give one per label"
        )
    pair = cols.text_pair in rows[0].values
    template = data_cfg.template or (DEFAULT_PAIR_TEMPLATE if pair else DEFAULT_TEMPLATE)
    _check_template(template, "data.template")
    return TaskSpec(
        name, ("text", "text_pair") if pair else ("text",), len(labels), ("accuracy",), ("", ""), "eval",
        tuple(words), tuple(" " + w.strip() for w in words), template, kind, tuple(labels), task,
    )  # fmt: skip


def _train_split(source: str) -> str:
    from common.datafiles import HUB_PREFIX, hub_splits

    return hub_splits(source)[0] if source.startswith(HUB_PREFIX) else "train"


def _normalised(task: TaskSpec, rows: list, data_cfg) -> datasets.Dataset:
    from common.datafiles import Columns, classification_columns, instruction_columns, to_dataset

    cols = Columns.of(data_cfg)
    if task.kind == "instruction":
        return to_dataset(instruction_columns(rows, cols))
    return to_dataset(classification_columns(rows, cols, task.label_names, task.is_pair))


@lru_cache(maxsize=8)
def data_split(task: TaskSpec, split: str, data_cfg, own_file: str | None = None) -> datasets.Dataset:
    """A data task's split, normalised: train and dev from the task file (dev: data.eval-file, the Hub
    dataset's own evaluation split, or the held-out data.eval-fraction), or a node's whole own file."""
    from common.datafiles import HUB_PREFIX, held_out, hub_splits

    if own_file is not None:
        return _normalised(task, data_rows(own_file), data_cfg)
    source = task.source
    if split == "dev" and data_cfg.eval_file:
        return _normalised(task, data_rows(data_cfg.eval_file), data_cfg)
    if source.startswith(HUB_PREFIX):
        train_split, dev_split = hub_splits(source)
        if dev_split is not None and not data_cfg.eval_file:
            return _normalised(task, data_rows(source, train_split if split == "train" else dev_split), data_cfg)
        rows = data_rows(source, train_split)
    else:
        rows = data_rows(source)
    if data_cfg.eval_file:
        return _normalised(task, rows, data_cfg)
    train, dev = held_out(len(rows), data_cfg.eval_fraction, source)
    return _normalised(task, [rows[i] for i in (train if split == "train" else dev)], data_cfg)
