"""Loading, normalising and federated partitioning of the task data.

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
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from common.tasks import TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

SPLITS = ("train", "dev")
PARTITION_SCHEMES = ("iid", "dirichlet")
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
_PARTITION_CACHE: dict[tuple, datasets.Dataset] = {}


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


def _min_partition_size(n: int, num_partitions: int) -> int:
    """At least one example per client; at most 10 so small tasks stay splittable."""
    return max(1, min(10, n // (4 * num_partitions)))


def _make_partitioner(scheme: str, n: int, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=_min_partition_size(n, num_partitions),
        self_balancing=True,
        seed=seed,
    )


@lru_cache(maxsize=16)
def _all_partitions(
    labels: tuple[int, ...], num_partitions: int, scheme: str, alpha: float, seed: int
) -> tuple[tuple[int, ...], ...]:
    """Every partition at once: Dirichlet draws them jointly, and we verify the cover."""
    n = len(labels)
    # IidPartitioner takes contiguous shards, so shuffle first (with the seed) to make
    # shards random; the "idx" column maps back to positions in `labels`.
    order = np.random.default_rng(seed).permutation(n) if scheme == "iid" else np.arange(n)
    partitioner = _make_partitioner(scheme, n, num_partitions, alpha, seed)
    partitioner.dataset = datasets.Dataset.from_dict({"label": np.asarray(labels)[order], "idx": order})
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every resampling; we report failure.
            warnings.simplefilter("ignore")
            parts = tuple(
                tuple(sorted(np.asarray(partitioner.load_partition(pid)["idx"]).tolist()))
                for pid in range(num_partitions)
            )
    except ValueError as err:
        raise ValueError(
            f"Dirichlet partitioning of {n} examples into {num_partitions} partitions "
            f"with alpha={alpha} (seed {seed}) could not give every partition at least "
            f"{_min_partition_size(n, num_partitions)} examples in flwr_datasets' 11 "
            f"sampling attempts ({err}). Use a larger alpha (e.g. >= 0.3), fewer "
            "partitions, or a different seed."
        ) from None
    flat = [i for part in parts for i in part]
    if len(flat) != n or set(flat) != set(range(n)):
        raise ValueError(
            f"{scheme} partitioning with alpha={alpha} did not produce disjoint "
            "partitions covering the data; use a larger alpha."
        )
    return parts


def partition_indices(
    labels: Sequence[int],
    num_partitions: int,
    partition_id: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[int]:
    """Sorted example indices of one client's partition (disjoint, covering, seeded).

    ``iid``: a seeded shuffle cut into near-equal contiguous shards. ``dirichlet``:
    per-label Dirichlet(alpha) label skew (flwr_datasets, self-balancing); alpha is
    ignored for ``iid``.
    """
    n = len(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; known schemes: {', '.join(PARTITION_SCHEMES)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_partitions > n:
        raise ValueError(f"Cannot split {n} examples into {num_partitions} partitions (more partitions than examples)")
    key_alpha = float(alpha) if scheme == "dirichlet" else 0.0
    parts = _all_partitions(tuple(int(y) for y in labels), num_partitions, scheme, key_alpha, seed)
    return list(parts[partition_id])


def load_partition(
    task: TaskSpec,
    data_dir: str | None,
    num_partitions: int,
    partition_id: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> datasets.Dataset:
    """One client's share of the train split, cached per arguments."""
    key = (
        task.name,
        os.path.abspath(data_dir) if data_dir else None,
        num_partitions,
        partition_id,
        scheme,
        float(alpha),
        seed,
    )
    if key not in _PARTITION_CACHE:
        train = load_split(task, "train", data_dir)
        labels = np.asarray(train["label"]).tolist()
        indices = partition_indices(labels, num_partitions, partition_id, scheme, alpha, seed)
        _PARTITION_CACHE[key] = train.select(indices)
    return _PARTITION_CACHE[key]


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: "PreTrainedTokenizerBase",
    task: TaskSpec,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Tokenise a whole (small) split at once: padded to its longest example.

    Pair tasks pass ``text_pair`` so the model sees the two segments separated.
    Returns input_ids, attention_mask and labels.
    """
    if len(dataset) == 0:
        raise ValueError(f"{task.name}: cannot tokenize an empty dataset")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pair = list(dataset["text_pair"]) if task.is_pair else None
    enc = tokenizer(
        list(dataset["text"]),
        pair,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long),
    }


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of ``steps`` minibatches, walking seeded permutations epoch after epoch.

    Fixed-step local training needs batches that span epochs: the permutations are
    concatenated and cut into ``batch_size`` chunks, so every example is seen once per
    epoch-length of steps (a chunk crossing an epoch boundary may repeat an index).
    With ``n < batch_size`` every batch is the whole set, freshly permuted.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    if n < batch_size:
        return [rng.permutation(n).tolist() for _ in range(steps)]
    epochs = -(-steps * batch_size // n)  # ceil division
    stream = [i for _ in range(epochs) for i in rng.permutation(n).tolist()]
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]


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


def natural_partition(clients: Sequence[str], num_partitions: int, partition_id: int, column: str) -> list[int]:
    """The rows of partition `partition_id` when each row names its client: the clients in sorted order, client
    i to partition i mod num_partitions (a client's rows stay together: the data's own, natural partition)."""
    names = sorted(set(clients))
    if len(names) < num_partitions:
        raise ValueError(
            f"partitioning = 'natural': data.client-column '{column}' names {len(names)} clients, fewer than the "
            f"{num_partitions} simulated nodes: run with at most {len(names)} nodes, or partition iid"
        )
    mine = {c for i, c in enumerate(names) if i % num_partitions == partition_id}
    return [i for i, c in enumerate(clients) if c in mine]


MAX_RESPONSE_CLASSES = 50  # Dirichlet over an instruction task's responses: a short answer's few values only


def response_classes(responses: Sequence[str]) -> list[int]:
    """An instruction task's responses as the labels a Dirichlet skew draws over: each distinct answer (stripped,
    case-folded) a class, in sorted order. Only a task of few answers has labels this way (a prompt with a
    one-word answer, as scripts/glue_instructions.py writes); free-text responses are refused."""
    keys = [r.strip().casefold() for r in responses]
    classes = sorted(set(keys))
    if len(classes) > MAX_RESPONSE_CLASSES:
        raise ValueError(
            f"partitioning = 'dirichlet' skews an instruction task by its answers, and this one has {len(classes)} "
            f"distinct responses (at most {MAX_RESPONSE_CLASSES}: a short answer such as a label word): use iid, or "
            "natural with data.client-column"
        )
    index = {c: i for i, c in enumerate(classes)}
    return [index[k] for k in keys]


def data_partition(cfg, task: TaskSpec, num_partitions: int, partition_id: int) -> datasets.Dataset:
    """One simulated client's share of a data task's train split (iid, Dirichlet on labels or on an instruction
    task's few answers, or natural)."""
    train = data_split(task, "train", cfg.data)
    if cfg.partitioning == "natural":
        return train.select(natural_partition(train["client"], num_partitions, partition_id, cfg.data.client_column))
    if task.kind == "classification":
        labels = train["label"]
    elif cfg.partitioning == "dirichlet":
        labels = response_classes(train["response"])
    else:
        labels = [0] * len(train)
    indices = partition_indices(labels, num_partitions, partition_id, cfg.partitioning, cfg.dirichlet_alpha, cfg.seed)
    return train.select(indices)


# --------------------------------------------------------------------------- encoding for the LM head

# what encode_instructions adds for evaluation, which a batch does not pass to the model
NOT_INPUTS = ("prompt_length", "truncated")
IGNORE = -100  # labels of the tokens no loss is computed on (prompt, padding): PyTorch's and transformers' value


def encode(
    dataset: datasets.Dataset,
    tokenizer: "PreTrainedTokenizerBase",
    task: TaskSpec,
    max_length: int,
    head_kind: str = "classifier",
    long_responses: str = "truncate",
) -> dict[str, torch.Tensor]:
    """A split as the model's inputs: a classification head's (`tokenize`), a label-word prompt's
    (`encode_prompts`) or an instruction's (`encode_instructions`)."""
    if task.kind == "instruction":
        return encode_instructions(dataset, tokenizer, max_length, long_responses)
    if head_kind == "lm":
        return encode_prompts(dataset, tokenizer, task, max_length)
    return tokenize(dataset, tokenizer, task, max_length)


def encode_prompts(
    dataset: datasets.Dataset, tokenizer: "PreTrainedTokenizerBase", task: TaskSpec, max_length: int
) -> dict[str, torch.Tensor]:
    """Each example as `task.template` filled in (its label words scored at the prompt's last token); a prompt
    over max_length loses its beginning, not the question at its end."""
    if len(dataset) == 0:
        raise ValueError(f"{task.name}: cannot encode an empty dataset")
    choices = " or ".join(w.strip() for w in task.lm_words)
    pairs = dataset["text_pair"] if task.is_pair else [""] * len(dataset)
    texts = [
        task.template.format(text=t, text_pair=p, choices=choices) for t, p in zip(dataset["text"], pairs, strict=True)
    ]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
                        return_token_type_ids=False)  # fmt: skip
    finally:
        tokenizer.truncation_side = side
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long),
    }


PLAIN_ROLES = {"system": "{}\n\n", "user": "### Instruction:\n{}\n\n", "assistant": "### Response:\n{}\n\n"}


def render_prompt(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> str:
    """The conversation up to the answer as the model reads it: the tokenizer's chat template with its
    generation prompt where it has one, else a plain Alpaca-style layout ending in "### Response:\\n"."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_ROLES[m["role"]].format(m["content"]) for m in messages) + "### Response:\n"


def end_token(tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The token that ends an answer (eos; a BERT-style tokenizer's [SEP])."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def encode_instructions(
    dataset: datasets.Dataset, tokenizer: "PreTrainedTokenizerBase", max_length: int, long_responses: str = "truncate"
) -> dict[str, torch.Tensor]:
    """prompt + response + end token, with labels IGNORE on the prompt and the padding: the loss is on the
    response tokens only. The prompt and the response are tokenized apart, so the boundary is the one a
    generation starts from. A prompt that leaves no room for one response token is refused (naming its row);
    a longer response is cut at max_length and counted (`truncated`), or refused with data.long-responses =
    "refuse"."""
    if len(dataset) == 0:
        raise ValueError("cannot encode an empty dataset")
    end = end_token(tokenizer)
    rows, prompt_lengths, truncated = [], [], []
    for messages, response, where in zip(dataset["messages"], dataset["response"], dataset["where"], strict=True):
        prompt = tokenizer(render_prompt(tokenizer, json.loads(messages)), add_special_tokens=True)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
        if len(prompt) >= max_length:
            raise ValueError(
                f"{where}: the prompt is {len(prompt)} tokens, train.max-length is {max_length}: no room for the "
                "response. Raise train.max-length or shorten the prompt"
            )
        cut = len(prompt) + len(answer) > max_length
        if cut and long_responses == "refuse":
            raise ValueError(
                f"{where}: prompt + response are {len(prompt) + len(answer)} tokens, over train.max-length = "
                f"{max_length}: raise it, shorten the response, or set data.long-responses = 'truncate'"
            )
        ids = (prompt + answer)[:max_length]
        rows.append((ids, len(prompt)))
        prompt_lengths.append(len(prompt))
        truncated.append(cut)
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, p) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, p : len(ids)] = torch.as_tensor(ids[p:])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_length": torch.as_tensor(prompt_lengths, dtype=torch.long),
        "truncated": torch.as_tensor(truncated, dtype=torch.bool),
    }
