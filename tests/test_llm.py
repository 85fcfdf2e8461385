"""Decoders as LLMs: the causal-LM objective on the response tokens only, classification by the LM head's
label words, and every method instruction-tuning (and LM-head classifying) a tiny decoder on a user's own file,
through the real server and client code in this process."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch.nn import functional as F

from common.config import parse_run_config
from common.data import data_split, task_of
from common.encoding import IGNORE, encode_instructions, render_prompt
from common.heads import LabelWordLM, label_word_ids
from common.methods import METHODS
from common.modeling import load_model, load_tokenizer
from common.runmodel import load_run_model
from common.training import batch, client_data, dev_encoded

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def own_files(tmp_path_factory):
    """A user's own instruction JSONL and classification CSV (synthetic: numbers and words)."""
    root = tmp_path_factory.mktemp("own")
    inst = root / "mine.jsonl"
    inst.write_text(
        "".join(json.dumps({"prompt": f"What comes after {i}?", "response": f"{i + 1}"}) + "\n" for i in range(40))
    )
    cls = root / "reviews.csv"
    cls.write_text(
        "text,label\n"
        + "".join(
            f'"a {("dull", "lovely")[i % 2]} film, number {i}",{("negative", "positive")[i % 2]}\n' for i in range(40)
        )
    )
    return str(inst), str(cls)


def cfg_for(task, model, tmp_path, **keys):
    return parse_run_config(
        {
            "task": task, "model": model, "results-dir": str(tmp_path), "num-server-rounds": 1,
            "train.local-steps": 2, "krso.intervals": 2, "train.batch-size": 4, "train.max-length": 32,
            "eval.generate": 2, "eval.max-new-tokens": 3, **keys,
        }
    )  # fmt: skip


def test_the_loss_is_on_the_response_tokens_only(own_files, tiny_llama, tmp_path):
    cfg = cfg_for(own_files[0], tiny_llama, tmp_path)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    tok = load_tokenizer(tiny_llama)
    # labels: the prompt and the padding are IGNORE, the response and its end token are the input ids
    for i in range(4):
        p, n = int(encoded["prompt_length"][i]), int(encoded["attention_mask"][i].sum())
        assert (encoded["labels"][i, :p] == IGNORE).all() and (encoded["labels"][i, n:] == IGNORE).all()
        assert torch.equal(encoded["labels"][i, p:n], encoded["input_ids"][i, p:n]) and n > p
        assert int(encoded["input_ids"][i, n - 1]) == tok.sep_token_id  # the end token (BERT-style tokenizer: SEP)
    net = load_run_model(cfg).model
    b = batch(encoded, [0, 1, 2, 3])
    logits = net(**{k: v for k, v in b.items() if k != "labels"}).logits
    # the model's loss is the cross-entropy of the response tokens, each predicted from the one before it
    targets = b["labels"][:, 1:]
    chosen = targets != IGNORE
    manual = F.cross_entropy(logits[:, :-1][chosen], targets[chosen])
    loss = net(**b).loss
    torch.testing.assert_close(loss, manual)
    # no prompt token moves it: a different prompt-token target changes nothing (only the inputs matter there)
    changed = {**b, "labels": b["labels"].clone()}
    changed["labels"][:, 0] = IGNORE
    torch.testing.assert_close(net(**changed).loss, loss)
    # and the zero-order estimates read the same objective (FedSPZO's block 2 on the cached h0 included)
    from common.split import SplitModel
    from common.zeroorder import zo_parameters

    split = SplitModel(net, 1, zo_parameters(net, False, "bitfit"))
    assert split.loss(b) == pytest.approx(float(loss), abs=1e-6)
    assert split.loss_block2(b, split.hidden(b)) == pytest.approx(float(loss), abs=1e-5)


def test_long_responses_are_truncated_and_counted_or_refused(own_files, tiny_llama, tmp_path):
    cfg = cfg_for(own_files[0], tiny_llama, tmp_path)
    ds = data_split(task_of(cfg), "train", cfg.data)
    tok = load_tokenizer(tiny_llama)
    prompt = len(tok(render_prompt(tok, json.loads(ds[0]["messages"])))["input_ids"])
    enc = encode_instructions(ds, tok, prompt + 1)
    assert enc["truncated"].all() and enc["input_ids"].shape[1] <= prompt + 2
    with pytest.raises(ValueError, match=r"mine.jsonl:\d+: prompt \+ response are \d+ tokens, over train.max-length"):
        encode_instructions(ds, tok, prompt + 1, "refuse")
    with pytest.raises(ValueError, match=r"mine.jsonl:\d+: the prompt is \d+ tokens, train.max-length is 8"):
        encode_instructions(ds, tok, 8)


def test_label_words_are_the_lm_heads_own_logits_at_the_last_token(tiny_llama):
    loaded = load_model(tiny_llama, 0, 0, "lm")
    ids = label_word_ids(loaded.tokenizer, (" negative", " positive"))
    clf = LabelWordLM(loaded.model, ids)
    enc = loaded.tokenizer(["a fine film", "not good at all, no"], padding=True, return_tensors="pt")
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        full = loaded.model(**enc).logits
        last = enc["attention_mask"].sum(1) - 1
        want = full[torch.arange(2), last][:, ids]
        torch.testing.assert_close(clf(**enc).logits, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="start with the same token"):
        label_word_ids(loaded.tokenizer, (" good", " good"))


def read_rounds(folder):
    with open(os.path.join(folder, "rounds.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_instruction_tunes_a_decoder_on_a_users_jsonl_and_classifies_a_csv(
    method, own_files, tiny_llama, tmp_path, task_identity
):
    from harness.fakes import InProcessGrid
    from server_app.app import run

    for task, kind in zip(own_files, ("instruction", "classification"), strict=True):
        cfg = cfg_for(task, tiny_llama, tmp_path, method=method, **{"run-name": f"{method}-{kind}"})
        assert task_of(cfg).kind == kind
        run(InProcessGrid(cfg, 1, {1: 0, 2: 1}), cfg, 1)
        rows = read_rounds(os.path.join(str(tmp_path), f"{method}-{kind}"))
        assert [r["round"] for r in rows] == [0, 1] and rows[1]["clients"] == 2 and rows[1]["bytes_up"] > 0
        assert all(r["loss"] is not None and r["accuracy"] is not None for r in rows)
        if kind == "instruction":  # held-out response loss, its perplexity, and generated answers
            assert rows[1]["perplexity"] == pytest.approx(torch.tensor(rows[1]["loss"]).exp().item(), rel=1e-6)
            assert rows[1]["generated"] == 2
        dev = dev_encoded(cfg)
        assert len(dev["labels"]) == 4  # the held-out tenth of 40 rows, the same for every method


def test_a_fleet_node_reads_its_own_file_and_not_the_servers(own_files, tiny_llama, tmp_path):
    own = tmp_path / "node-7.jsonl"
    own.write_text("".join(json.dumps({"prompt": f"Say {w}.", "response": w}) + "\n" for w in ("a", "b", "c")))
    absent = str(tmp_path / "only-on-the-server.jsonl")  # the server's task file, which this node does not have
    cfg = cfg_for(absent, tiny_llama, tmp_path)
    encoded, key = client_data(cfg, {"data-file": str(own), "partition-id": 0, "num-partitions": 2})
    assert len(encoded["labels"]) == 3 and key == f"file:{own}"  # all of its own file, no held-out part
    # a built-in task's run ignores data-file: the same node config serves both kinds of run
    builtin = cfg_for(
        "rte", tiny_llama, tmp_path, **{"data-dir": os.path.join(os.path.dirname(__file__), "fixtures", "glue")}
    )
    assert client_data(builtin, {"data-file": str(own), "partition-id": 0, "num-partitions": 2})[1] == "part:0/2"
    # a classification node must be told the label order: its own file may not hold every label
    mine = tmp_path / "node-7.csv"
    mine.write_text("text,label\nfine,positive\nnice,positive\n")
    with pytest.raises(ValueError, match="set data.labels"):
        client_data(cfg_for(str(tmp_path / "server.csv"), tiny_llama, tmp_path), {"data-file": str(mine)})
    labelled = cfg_for(str(tmp_path / "server.csv"), tiny_llama, tmp_path, **{"data.labels": "negative,positive"})
    encoded, _ = client_data(labelled, {"data-file": str(mine)})
    assert encoded["labels"].tolist() == [1, 1]


@pytest.mark.parametrize("method", ["fedkrso", "fedtt"])
def test_an_instruction_tuned_decoder_exports_loads_in_plain_transformers_and_answers(
    method, own_files, tiny_llama, tmp_path, task_identity
):
    import subprocess
    import sys

    from common import cli
    from harness.fakes import InProcessGrid
    from server_app.app import run
    from tests.test_export import ROOT, child_outputs, reference_outputs, server_reference

    cfg = cfg_for(own_files[0], tiny_llama, tmp_path, method=method, **{"run-name": method, "train.lr": 1e-2})
    run(InProcessGrid(cfg, 1, {1: 0, 2: 1}), cfg, 1)
    run_dir, out = os.path.join(str(tmp_path), method), str(tmp_path / "exported")
    assert cli.main(["export", run_dir, out]) == 0
    reference, ref_cfg, _ = server_reference(run_dir, tmp_path)
    got, want = child_outputs(out, tmp_path), reference_outputs(reference, ref_cfg)  # a process without us
    assert got["logits"].shape[-1] == reference.config.vocab_size  # the causal LM itself, not a classifier
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-5)
    proc = subprocess.run(
        [sys.executable, "-m", "common.cli", "generate", out, "What comes after 3?", "--max-new-tokens", "4"],
        cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-2000:]
