"""Tests of the task registry, metrics, data loading and partitioning.

Loading tests read the synthetic fixture (tests/fixtures/glue) always, and the real GLUE / SuperGLUE
folder as well when ``GLUE_DIR`` names one: each is checked against its own row counts and first rows.
"""

import json
import os
from collections import Counter

import datasets
import numpy as np
import pytest

from common import data
from common.data import load_split
from common.encoding import tokenize
from common.partition import batch_indices, load_partition, partition_indices
from common.tasks import TASKS, compute_metrics, get_task
from tests.conftest import FIXTURE_GLUE, given_glue
from tests.fixtures import make_glue

# The folders the loading tests read: the fixture always, the real files too when GLUE_DIR is given.
SOURCES = {"fixture": FIXTURE_GLUE, **({"glue": given_glue()} if given_glue() else {})}

# (train rows, dev rows) of each source; BoolQ's one file is cut 80/20 by the loader.
_BOOLQ = make_glue.ROWS["boolq"][0]
EXPECTED_ROWS = {
    "glue": {  # as documented in the folder's SOURCES.md
        "sst2": (67_349, 872),
        "rte": (2_490, 277),
        "mrpc": (3_668, 408),
        "cola": (8_551, 1_043),
        "wic": (5_428, 638),
        "cb": (250, 56),
        "boolq": (2_616, 654),
    },
    "fixture": {
        **{name: rows for name, rows in make_glue.ROWS.items() if name != "boolq"},
        "boolq": (round(0.8 * _BOOLQ), _BOOLQ - round(0.8 * _BOOLQ)),
    },
}

# The first train row of each file, as the loader must map it (text, text_pair, label).
FIRST_ROWS = {
    "glue": {
        "sst2": ("hide new secretions", None, 0),
        "rte": ("No Weapons of Mass Destruction", None, 1),  # not_entailment
        "mrpc": ("Amrozi accused his brother", "Referring to him", 1),
        "cola": ("Our friends won't buy", None, 1),
        "wic": ("place: Do you want to come over to my place later?", None, 0),
        "cb": (None, "the language was peeled down", 0),
    },
    "fixture": {
        "sst2": ("i found the cast moving", None, 1),
        "rte": ("Luca bought a small boat", "Luca did not buy a small boat .", 1),  # not_entailment
        "mrpc": ("Farid bought a painting", "On Tuesday , Farid purchased", 1),
        "cola": ("The dog follows the grey fox .", None, 1),
        "wic": ("bat: The cricket bat was made of willow .", "He swung the bat at the ball .", 1),
        "cb": ("I think Kira sold the old house", "Kira likes Perth more than Quebec", 2),  # neutral
    },
}


@pytest.fixture(params=sorted(SOURCES))
def source(request) -> tuple[str, str]:
    """(source name, folder) of each task-data folder the loading tests read."""
    return request.param, SOURCES[request.param]


# --- registry and metrics -------------------------------------------------------


@pytest.mark.unit
def test_registry_names_and_fields():
    assert set(TASKS) == {"sst2", "rte", "mrpc", "cola", "wic", "boolq", "cb"}
    for name, task in TASKS.items():
        assert task.name == name
        assert task.text_fields in (("text",), ("text", "text_pair"))
        assert "accuracy" in task.metrics
    assert TASKS["cola"].metrics == ("accuracy", "mcc")
    assert TASKS["mrpc"].metrics == ("accuracy", "f1")
    assert TASKS["cb"].num_labels == 3
    assert TASKS["sst2"].hub == ("nyu-mll/glue", "sst2")
    assert TASKS["wic"].hub == ("aps/super_glue", "wic")


@pytest.mark.unit
def test_get_task_unknown_lists_known_names():
    assert get_task("rte") is TASKS["rte"]
    with pytest.raises(ValueError, match="Unknown task 'qnli'") as err:
        get_task("qnli")
    for name in TASKS:
        assert name in str(err.value)


@pytest.mark.unit
def test_accuracy():
    assert compute_metrics(TASKS["sst2"], [1, 0, 1, 1], [1, 1, 1, 0]) == {"accuracy": 0.5}
    assert compute_metrics(TASKS["cb"], [0, 1, 2], [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}


@pytest.mark.unit
def test_mcc_hand_computed():
    # tp=2 tn=1 fp=1 fn=1 -> (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    m = compute_metrics(TASKS["cola"], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1])
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["mcc"] == pytest.approx(1 / 6)
    assert compute_metrics(TASKS["cola"], [1, 0], [1, 0])["mcc"] == 1.0
    assert compute_metrics(TASKS["cola"], [0, 1], [1, 0])["mcc"] == -1.0
    # Constant predictions: MCC undefined -> 0.0
    assert compute_metrics(TASKS["cola"], [1, 1, 1], [1, 0, 1])["mcc"] == 0.0
    assert compute_metrics(TASKS["cola"], [0, 0], [0, 0])["mcc"] == 0.0


@pytest.mark.unit
def test_f1_hand_computed():
    # tp=2 fp=1 fn=1 -> 2*2 / (4 + 1 + 1) = 2/3
    m = compute_metrics(TASKS["mrpc"], [1, 1, 0, 1, 0], [1, 1, 0, 0, 1])
    assert set(m) == {"accuracy", "f1"}
    assert m["f1"] == pytest.approx(2 / 3)
    # No positive prediction or label: 0.0, not NaN
    assert compute_metrics(TASKS["mrpc"], [0, 0], [0, 0])["f1"] == 0.0
    assert compute_metrics(TASKS["mrpc"], [0, 0], [1, 1])["f1"] == 0.0
    assert compute_metrics(TASKS["mrpc"], [1, 1], [1, 1])["f1"] == 1.0


@pytest.mark.unit
def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="predictions"):
        compute_metrics(TASKS["sst2"], [1, 0], [1])
    with pytest.raises(ValueError, match="zero examples"):
        compute_metrics(TASKS["sst2"], [], [])
    with pytest.raises(ValueError, match="label values"):
        compute_metrics(TASKS["sst2"], [1], [2])


# --- loading the task files ----------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(TASKS))
def test_row_counts_and_labels(name, source):
    kind, folder = source
    task = TASKS[name]
    for split, expected in zip(("train", "dev"), EXPECTED_ROWS[kind][name], strict=True):
        ds = load_split(task, split, folder)
        assert len(ds) == expected, (name, split)
        assert ds.column_names == ["text", *task.text_fields[1:], "label"]
        counts = Counter(np.asarray(ds["label"]).tolist())
        assert set(counts) == set(range(task.num_labels)), (name, split, counts)
        assert all(isinstance(t, str) and t for t in ds["text"][:50])


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(FIRST_ROWS["fixture"]))
def test_field_mapping_first_rows(name, source):
    kind, folder = source
    text, pair, label = FIRST_ROWS[kind][name]
    row = load_split(TASKS[name], "train", folder)[0]
    # the expected texts are prefixes (WiC's whole text, since its "word: " prefix is the point)
    if text is not None:
        assert row["text"].startswith(text) and (name != "wic" or row["text"] == text), row
    if pair is not None:
        assert row["text_pair"].startswith(pair), row
    assert row["label"] == label, row


@pytest.mark.integration
def test_rte_row_with_unbalanced_quote_is_one_row(source):
    rte = load_split(TASKS["rte"], "train", source[1])
    assert sum(t.startswith('"') for t in rte["text"]) >= 1
    assert all("\t" not in t and "\n" not in t for t in rte["text"])


@pytest.mark.integration
def test_boolq_split_is_deterministic_and_disjoint(monkeypatch, source):
    d = source[1]
    train = load_split(TASKS["boolq"], "train", d)
    dev = load_split(TASKS["boolq"], "dev", d)
    assert load_split(TASKS["boolq"], "train", d) is train  # cached
    monkeypatch.setattr(data, "_SPLIT_CACHE", {})
    assert load_split(TASKS["boolq"], "train", d)["text"] == train["text"]
    with open(os.path.join(d, "BoolQ", "val.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    in_file = Counter((r["question"], r["passage"], int(r["label"])) for r in records)

    def rows(ds):
        return Counter(zip(ds["text"], ds["text_pair"], ds["label"], strict=True))

    assert rows(train) + rows(dev) == in_file  # an exact split of the one file


@pytest.mark.unit
def test_missing_folder_names_expected_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as err:
        load_split(TASKS["rte"], "train", str(missing))
    msg = str(err.value)
    assert str(missing / "RTE" / "train.tsv") in msg
    assert "data-dir" in msg and "Hugging Face Hub" in msg
    tmp_path.joinpath("WiC").mkdir()
    with pytest.raises(FileNotFoundError, match=r"WiC/val\.jsonl"):
        load_split(TASKS["wic"], "dev", str(tmp_path))


@pytest.mark.unit
def test_unknown_split():
    with pytest.raises(ValueError, match="Unknown split"):
        load_split(TASKS["rte"], "test", "/nonexistent")


@pytest.mark.unit
def test_malformed_tsv_rows_name_file_and_line(tmp_path):
    folder = tmp_path / "SST-2"
    folder.mkdir()
    path = folder / "train.tsv"
    path.write_text("sentence\tlabel\ngood film\t1\nno label column\n")
    with pytest.raises(ValueError, match=rf"{path}:3: expected 2"):
        load_split(TASKS["sst2"], "train", str(tmp_path))
    path.write_text("sentence\tlabel\ngood film\t1\nbad film\tnegative\n")
    with pytest.raises(ValueError, match=rf"{path}:3: unknown label 'negative'"):
        load_split(TASKS["sst2"], "train", str(tmp_path))
    path.write_text("text\tlabel\ngood film\t1\n")
    with pytest.raises(ValueError, match=rf"{path}:1: header"):
        load_split(TASKS["sst2"], "train", str(tmp_path))


@pytest.mark.unit
def test_malformed_jsonl_rows_name_file_and_line(tmp_path):
    folder = tmp_path / "CB"
    folder.mkdir()
    path = folder / "train.jsonl"
    good = '{"premise": "p", "hypothesis": "h", "label": "neutral"}\n'
    path.write_text(good + '{"premise": "p", "hypothesis": "h", "label": "maybe"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: unknown label 'maybe'"):
        load_split(TASKS["cb"], "train", str(tmp_path))
    path.write_text(good + good + '{"premise": "p", "label": "neutral"}\n')
    with pytest.raises(ValueError, match=rf"{path}:3: malformed"):
        load_split(TASKS["cb"], "train", str(tmp_path))


@pytest.mark.unit
@pytest.mark.parametrize("data_dir", [None, ""])
def test_hub_path_calls_load_dataset_and_maps_columns(monkeypatch, data_dir):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict(
            {
                "word": ["bank", "run"],
                "sentence1": ["A river bank.", "Run fast."],
                "sentence2": ["A savings bank.", "Run a company."],
                "label": [0, 1],
                "idx": [0, 1],
            }
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_SPLIT_CACHE", {})
    ds = load_split(TASKS["wic"], "dev", data_dir)
    assert calls == [("aps/super_glue", "wic", "validation")]
    assert ds.column_names == ["text", "text_pair", "label"]
    assert ds["text"] == ["bank: A river bank.", "run: Run fast."]
    assert ds["text_pair"] == ["A savings bank.", "Run a company."]
    assert list(ds["label"]) == [0, 1]


@pytest.mark.unit
def test_hub_path_single_sentence_task(monkeypatch):
    calls = []

    def fake_load_dataset(path, name, split):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"sentence": ["fine", "awful"], "label": [1, 0], "idx": [0, 1]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    monkeypatch.setattr(data, "_SPLIT_CACHE", {})
    ds = load_split(TASKS["sst2"], "train", None)
    assert calls == [("nyu-mll/glue", "sst2", "train")]
    assert ds.column_names == ["text", "label"]
    assert ds["text"] == ["fine", "awful"] and list(ds["label"]) == [1, 0]


# --- partitioning ---------------------------------------------------------------


@pytest.fixture(scope="module")
def rte_labels(glue_dir):
    return np.asarray(load_split(TASKS["rte"], "train", glue_dir)["label"]).tolist()


def _all(labels, num, scheme, alpha, seed):
    return [partition_indices(labels, num, p, scheme, alpha, seed) for p in range(num)]


@pytest.mark.integration
@pytest.mark.parametrize("scheme", ["iid", "dirichlet"])
def test_partitions_disjoint_covering_deterministic(rte_labels, scheme):
    n = len(rte_labels)
    parts = _all(rte_labels, 5, scheme, 0.5, seed=7)
    flat = [i for p in parts for i in p]
    assert len(flat) == n and sorted(flat) == list(range(n))
    assert all(len(p) >= 10 for p in parts)
    assert parts == _all(rte_labels, 5, scheme, 0.5, seed=7)
    assert parts != _all(rte_labels, 5, scheme, 0.5, seed=8)
    if scheme == "iid":
        assert max(map(len, parts)) - min(map(len, parts)) <= 1


@pytest.mark.integration
def test_dirichlet_small_alpha_is_skewed(rte_labels):
    def majority_share(parts):
        return max(Counter(rte_labels[i] for i in p).most_common(1)[0][1] / len(p) for p in parts)

    iid = majority_share(_all(rte_labels, 4, "iid", 0.1, seed=0))
    skewed = majority_share(_all(rte_labels, 4, "dirichlet", 0.1, seed=0))
    assert iid < 0.65  # RTE is balanced: IID shards stay near 50/50 (on the fixture's 75-example shards 60% is chance)
    assert skewed > 0.8


@pytest.mark.unit
def test_partition_argument_errors():
    labels = [0, 1] * 10
    with pytest.raises(ValueError, match="num_partitions must be >= 1"):
        partition_indices(labels, 0, 0, "iid", 1.0, 0)
    with pytest.raises(ValueError, match=r"partition_id must be in \[0, 4\)"):
        partition_indices(labels, 4, 4, "iid", 1.0, 0)
    with pytest.raises(ValueError, match=r"partition_id must be in"):
        partition_indices(labels, 4, -1, "iid", 1.0, 0)
    with pytest.raises(ValueError, match="Unknown partition scheme 'shards'.*iid"):
        partition_indices(labels, 4, 0, "shards", 1.0, 0)
    with pytest.raises(ValueError, match="alpha must be > 0"):
        partition_indices(labels, 4, 0, "dirichlet", 0.0, 0)
    with pytest.raises(ValueError, match="more partitions than examples"):
        partition_indices(labels, 21, 0, "iid", 1.0, 0)


@pytest.mark.unit
def test_dirichlet_failure_is_a_clear_error():
    labels = [0, 1] * 100
    with pytest.raises(ValueError, match="Use a larger alpha"):
        partition_indices(labels, 20, 0, "dirichlet", 0.01, 0)


@pytest.mark.integration
def test_load_partition_is_train_subset_and_cached(glue_dir):
    d = glue_dir
    train = load_split(TASKS["cb"], "train", d)
    parts = [load_partition(TASKS["cb"], d, 3, p, "iid", 1.0, 0) for p in range(3)]
    assert sum(len(p) for p in parts) == len(train)
    assert load_partition(TASKS["cb"], d, 3, 0, "iid", 1.0, 0) is parts[0]
    idx = partition_indices(np.asarray(train["label"]).tolist(), 3, 1, "iid", 1.0, 0)
    assert parts[1]["text"] == train.select(idx)["text"]


# --- batching and tokenisation --------------------------------------------------


@pytest.mark.unit
def test_batch_indices_deterministic_and_covering():
    batches = batch_indices(10, 4, 5, seed=3)
    assert batches == batch_indices(10, 4, 5, seed=3)
    assert batches != batch_indices(10, 4, 5, seed=4)
    assert all(len(b) == 4 for b in batches)
    flat = [i for b in batches for i in b]
    assert sorted(flat[:10]) == list(range(10))  # first epoch
    assert sorted(flat[10:20]) == list(range(10))  # second epoch, new order
    assert flat[:10] != flat[10:20]
    assert batch_indices(10, 4, 0, seed=3) == []


@pytest.mark.unit
def test_batch_indices_small_set_is_whole_set():
    batches = batch_indices(3, 8, 4, seed=0)
    assert len(batches) == 4
    assert all(sorted(b) == [0, 1, 2] for b in batches)
    with pytest.raises(ValueError, match="n must be >= 1"):
        batch_indices(0, 8, 4, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    """The embedded model's tokenizer, from the installed package wherever the environment lives."""
    from transformers import AutoTokenizer

    from common.modeling import default_model_path

    return AutoTokenizer.from_pretrained(default_model_path(), local_files_only=True)


@pytest.mark.integration
@pytest.mark.parametrize("name", ["rte", "sst2"])
def test_tokenize_shapes_and_max_length(tokenizer, name, glue_dir):
    task = TASKS[name]
    ds = load_split(task, "dev", glue_dir).select(range(16))
    enc = tokenize(ds, tokenizer, task, max_length=32)
    assert set(enc) == {"input_ids", "attention_mask", "labels"}
    assert enc["input_ids"].shape == enc["attention_mask"].shape
    assert enc["input_ids"].shape[0] == enc["labels"].shape[0] == 16
    assert enc["input_ids"].shape[1] <= 32
    assert enc["labels"].tolist() == list(ds["label"])
    # Without a binding limit, padding is to the longest example, not to max_length.
    long = tokenize(ds, tokenizer, task, max_length=512)
    assert long["input_ids"].shape[1] == int(long["attention_mask"].sum(1).max())
    assert long["input_ids"].shape[1] < 512
    if task.is_pair:  # both segments present: two [SEP] tokens per example
        sep = tokenizer.sep_token_id
        assert bool(((enc["input_ids"] == sep).sum(1) == 2).all())
