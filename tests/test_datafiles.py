"""Tasks from the user's own files (common/datafiles.py, common/data.py): formats, kinds, labels, the held-out
split, natural partitions, and an error naming the file, the line and the column for every kind of bad data."""

from __future__ import annotations

import dataclasses
import json

import pytest

from common.config import ConfigError, DataConfig, parse_run_config
from common.data import data_split, task_of
from common.datafiles import DataError, read_rows
from common.partition import data_partition, natural_partition, response_classes

pytestmark = pytest.mark.unit


def jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def cfg_for(task: str, **keys):
    return parse_run_config({"task": task, **keys})


def instructions(n: int) -> list[dict]:
    return [{"prompt": f"Add one to {i}.", "response": str(i + 1)} for i in range(n)]


def test_an_instruction_file_is_inferred_and_split_the_same_way_every_time(tmp_path):
    path = jsonl(tmp_path / "mine.jsonl", instructions(50))
    cfg = cfg_for(path)
    task = task_of(cfg)
    assert (task.kind, task.name, task.source) == ("instruction", "mine", path)
    train, dev = data_split(task, "train", cfg.data), data_split(task, "dev", cfg.data)
    assert (len(train), len(dev)) == (45, 5)  # data.eval-fraction = 0.1
    assert not set(train["response"]) & set(dev["response"])
    # the cut depends on the file only (seed 0), not on the run's seed or method
    other = cfg_for(path, seed=7, method="fedavg")
    assert data_split(task_of(other), "dev", other.data)["response"] == dev["response"]
    assert json.loads(train["messages"][0]) == [{"role": "user", "content": "Add one to 0."}]


def test_alpaca_columns_system_messages_and_chats(tmp_path):
    alpaca = jsonl(
        tmp_path / "alpaca.jsonl",
        [{"instruction": "Translate.", "input": "chat", "output": "cat", "system": "Be brief."}] * 4,
    )
    cfg = cfg_for(alpaca, **{"data.prompt-column": "instruction", "data.response-column": "output"})
    row = data_split(task_of(cfg), "train", cfg.data)[0]
    assert json.loads(row["messages"]) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate.\n\nchat"},
    ]
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    path = jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 4)
    cfg = cfg_for(path)
    row = data_split(task_of(cfg), "train", cfg.data)[0]
    assert (json.loads(row["messages"]), row["response"]) == (chat[:1], "Hello")


def test_a_csv_of_texts_and_labels_gets_its_label_set_and_words(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\n" + "".join(f'"review {i}, fine",{("good", "bad")[i % 2]}\n' for i in range(20)))
    cfg = cfg_for(str(path))
    task = task_of(cfg)
    assert (task.kind, task.label_names, task.lm_words, task.num_labels) == (
        "classification", ("bad", "good"), (" bad", " good"), 2,
    )  # fmt: skip
    train = data_split(task, "train", cfg.data)
    assert train[0]["text"].startswith("review") and set(train["label"]) == {0, 1}
    given = cfg_for(str(path), **{"data.labels": "good,bad", "data.label-words": "great,terrible"})
    assert task_of(given).label_names == ("good", "bad") and task_of(given).lm_words == (" great", " terrible")


def test_integer_labels_sort_as_numbers_and_need_words_only_for_the_lm_head(tmp_path):
    path = jsonl(tmp_path / "n.jsonl", [{"text": f"t{i}", "label": i % 11} for i in range(44)])
    task = task_of(cfg_for(path))
    assert task.label_names == tuple(str(i) for i in range(11))  # 2 before 10


def test_parquet_files_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "response": ["x", "y", "z"]}), tmp_path / "p.parquet")
    assert [r.values["response"] for r in read_rows(str(tmp_path / "p.parquet"))] == ["x", "y", "z"]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(DataError, match="bad.parquet: cannot read it as Parquet"):
        read_rows(str(bad))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("bad.jsonl", b"", r"holds no examples: it is empty"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "c" "response": "d"}\n', r"bad.jsonl:2: not valid JSON"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n[1, 2]\n', r"bad.jsonl:2: a JSONL line must be one JSON object"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n\n{"prompt": "\xff", "response": "b"}\n', r"bad.jsonl:3: not UTF-8"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n', r"bad.jsonl:2: no column 'response'"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": 3, "response": "b"}\n', r"bad.jsonl:2: column 'prompt' must be text"),
        ("bad.jsonl", b'{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "  "}\n', r"bad.jsonl:2: the response is empty"),
        ("bad.jsonl", b'{"question": "a", "answer": "b"}\n', r"bad.jsonl:1: cannot tell the task kind from the columns"),
        ("bad.csv", b"text,label\nfine,good\nbad one,bad,extra\n", r"bad.csv:3: 3 fields, but the header names 2"),
        ("bad.csv", b"text,label\nfine,good\n\xe9t\xe9,bad\n", r"bad.csv:3: not UTF-8"),
        ("bad.csv", b"text,label\nfine,good\nmeh,neutral\n", r"bad.csv:3: column 'label': unknown label 'neutral'"),
        ("bad.csv", b"sentence,label\nfine,good\n", r"bad.csv:2: no column 'text' \(the text"),
    ],
)  # fmt: skip
def test_bad_files_name_the_file_line_and_column(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    classification = {"data.labels": "bad,good", "task-kind": "classification"} if name.endswith(".csv") else {}
    with pytest.raises(DataError, match=message):
        cfg = cfg_for(str(path), **{"data.eval-file": str(path)}, **classification)
        data_split(task_of(cfg), "train", cfg.data)


def test_missing_files_and_impossible_settings_say_what_to_fix(tmp_path):
    with pytest.raises(DataError, match=r"data file '.*nowhere.jsonl' not found"):
        task_of(cfg_for(str(tmp_path / "nowhere.jsonl")))
    with pytest.raises(ConfigError, match=r"task 'sst3' is unknown; .*\.jsonl, \.csv, \.parquet file, or hf:org/name"):
        cfg_for("sst3")
    with pytest.raises(ConfigError, match=r"data.eval-fraction must be in \(0, 0.5\]"):
        cfg_for("x.jsonl", **{"data.eval-fraction": 0.9})
    with pytest.raises(ConfigError, match="partitioning = 'natural' needs data.client-column"):
        cfg_for("x.jsonl", partitioning="natural")
    with pytest.raises(ConfigError, match="the built-in task 'sst2' is a classification task"):
        cfg_for("sst2", **{"task-kind": "instruction"})
    path = jsonl(tmp_path / "one.jsonl", instructions(1))
    with pytest.raises(DataError, match="too few to hold out"):
        cfg = cfg_for(path)
        data_split(task_of(cfg), "train", cfg.data)
    labels = jsonl(tmp_path / "l.jsonl", [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}])
    with pytest.raises(DataError, match="data.label-words gives 1 words for 2 labels"):
        task_of(cfg_for(labels, **{"data.label-words": "only"}))
    with pytest.raises(ValueError, match=r"unknown field \{sentence\}"):
        task_of(cfg_for(labels, **{"data.template": "{sentence} ->"}))


def test_natural_partitions_keep_each_clients_rows_together():
    clients = ["b", "a", "c", "a", "b", "d", "c"]
    parts = [natural_partition(clients, 3, p, "user") for p in range(3)]
    assert sorted(i for p in parts for i in p) == list(range(len(clients)))
    assert [{clients[i] for i in p} for p in parts] == [{"a", "d"}, {"b"}, {"c"}]
    with pytest.raises(ValueError, match="names 4 clients, fewer than the 5 simulated nodes"):
        natural_partition(clients, 5, 0, "user")


def test_a_config_written_before_the_data_keys_existed_is_the_same_configuration():
    from common.config import check_resume

    cfg = parse_run_config({"num-server-rounds": 5})
    old = {k: v for k, v in cfg.to_flat().items() if not k.startswith("data.") and k not in ("task-kind", "head.kind")}
    check_resume(cfg, old, 3)  # no refusal: the keys added later read as their defaults
    changed = parse_run_config({"num-server-rounds": 5, "data.eval-fraction": 0.2})
    with pytest.raises(ConfigError, match="data.eval-fraction"):
        check_resume(changed, old, 3)
    assert dataclasses.asdict(DataConfig())["eval_fraction"] == 0.1


def test_a_hub_dataset_uses_its_own_validation_split(monkeypatch):
    # the Hub cannot be reached here: datasets.load_dataset is given a DatasetDict as the Hub would return it
    import datasets

    splits = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"prompt": ["a", "b", "c"], "response": ["x", "y", "z"]}),
        validation=datasets.Dataset.from_dict({"prompt": ["d"], "response": ["w"]}),
    )
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name, config=None: asked.append((name, config)) or splits)
    cfg = cfg_for("hf:someone/pairs:v2")
    task = task_of(cfg)
    assert (task.kind, task.name) == ("instruction", "someone-pairs-v2") and asked[0] == ("someone/pairs", "v2")
    assert data_split(task, "train", cfg.data)["response"] == ["x", "y", "z"]
    assert data_split(task, "dev", cfg.data)["response"] == ["w"]
    with pytest.raises(DataError, match="a Hugging Face dataset is 'hf:org/name'"):
        task_of(cfg_for("hf:bad name!"))


def test_dirichlet_skews_an_instruction_task_by_its_few_answers(tmp_path):
    rows = [{"prompt": f"Review {i}", "response": "positive" if i % 3 else "Negative "} for i in range(300)]
    cfg = cfg_for(jsonl(tmp_path / "words.jsonl", rows), partitioning="dirichlet", **{"dirichlet-alpha": 0.1})
    task = task_of(cfg)
    parts = [data_partition(cfg, task, 4, p) for p in range(4)]
    assert sum(len(p) for p in parts) == len(data_split(task, "train", cfg.data))  # disjoint and covering
    shares = [sum(r == "positive" for r in p["response"]) / len(p) for p in parts]
    assert max(shares) - min(shares) > 0.3  # alpha 0.1 skews the answers across the clients
    assert response_classes(["b", " A", "a", "B "]) == [1, 0, 0, 1]  # stripped and case-folded, sorted


def test_dirichlet_refuses_free_text_responses(tmp_path):
    cfg = cfg_for(jsonl(tmp_path / "free.jsonl", instructions(120)), partitioning="dirichlet")
    with pytest.raises(ValueError, match="108 distinct responses"):
        data_partition(cfg, task_of(cfg), 2, 0)
