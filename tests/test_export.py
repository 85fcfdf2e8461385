"""`fedsubspace export` and `fedsubspace generate` (server_app/export.py, common/export.py): the exported folder, loaded by plain
transformers in a process that cannot import this project, answers as the server's global model does (logits to
1e-5), for every method; a corrupted export is caught; bad input is refused with exit code 2 and what to fix.

Runs are driven in this process as tests/test_checkpoint.py drives them: server_app.app.run with a grid that
hands each message to the method's real client function (harness/fakes.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from common import cli
from common.config import parse_run_config
from common.export import (
    PROBES,
    ExportError,
    check_export,
    find_peft,
    output_difference,
    outputs_of,
    unwrap,
    write_pretrained,
)
from common.methods import METHODS
from common.nodestore import STATE_DIR_ENV
from common.records import RunRecorder
from harness.fakes import InProcessGrid
from server_app import checkpoint
from server_app.app import build_setup, resume, run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NODES = {101: 0, 102: 1, 103: 2}
ROUNDS = 2

# The child: plain transformers (and peft for the adapter) from the interpreter's site-packages, without
# site's .pth files (the editable install's path to this checkout) and without this folder on sys.path.
CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path.append(sys.argv[1])
    try:
        import common  # noqa: F401
    except ImportError:
        pass
    else:
        raise SystemExit("the child process can import this project: the check would not be independent")
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    folder, kind, out, texts = sys.argv[2], sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    if kind == "adapter":  # the peft adapter on the base it names
        from peft import PeftModel

        base = json.load(open(folder + "/adapter_config.json"))["base_model_name_or_path"]
        model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=int(sys.argv[6]))
        model = PeftModel.from_pretrained(model, folder)
        tok = AutoTokenizer.from_pretrained(base)
    else:  # a causal LM (an LM-head run on a decoder) or a classifier, as its config.json says
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        causal = any(a.endswith("ForCausalLM") for a in config.architectures or [])
        auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
        model = auto.from_pretrained(folder, trust_remote_code=True)
        tok = AutoTokenizer.from_pretrained(folder)
    model.eval()
    with torch.no_grad():
        got = model(**tok(texts, padding=True, return_tensors="pt"), output_hidden_states=True)
    save_file({"logits": got.logits.float().contiguous(), "hidden": got.hidden_states[-1].float().contiguous()}, out)
    """
)


def child_outputs(folder: str, tmp_path, kind: str = "model", num_labels: int = 2) -> dict[str, torch.Tensor]:
    """The logits and last hidden states on PROBES of the export in `folder`, computed in a fresh interpreter
    that cannot import this project."""
    script, out = tmp_path / "child.py", tmp_path / f"logits-{kind}.safetensors"
    script.write_text(CHILD)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(home / "hf"),  # the remote-code module cache too (HF_HOME/modules)
    }
    args = [sysconfig.get_paths()["purelib"], folder, kind, str(out), json.dumps(list(PROBES)), str(num_labels)]
    proc = subprocess.run(
        [sys.executable, "-I", "-S", str(script), *args], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return load_file(str(out))


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_no_dropout):
    """This module's tiny BERT is conftest's without dropout: its rounds are deterministic."""
    return tiny_bert_no_dropout


def make_cfg(method, model, glue_dir, results, **extra):
    return parse_run_config(
        {
            "method": method, "task": "rte", "model": model, "data-dir": glue_dir, "seed": 1,
            "results-dir": str(results), "train.local-steps": 2, "train.batch-size": 4, "train.max-length": 32,
            "train.lr": 1e-2, "eval.max-examples": 16, "eval.batch-size": 16, "fraction-train": 0.6,
            "min-clients": 2, "krso.k": 2, "krso.rank": 4, "krso.intervals": 2, "zo.lr": 1e-2, "zo.eps": 1e-2,
            "spzo.split-layer": 1, "spzo.p1": 1, "spzo.p2": 2, "zo.params": "all", "kseed.k": 64,
            "tt.bottleneck": 8, "tt.rank": 3, "lora.rank": 2, "lora.dropout": 0.0, "num-server-rounds": ROUNDS,
            **extra,
        }
    )  # fmt: skip


@pytest.fixture(scope="module")
def runs(tiny_bert, glue_dir, tmp_path_factory):
    """method -> the records folder of a finished tiny run of ROUNDS rounds (each run once per module)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    base = tmp_path_factory.mktemp("runs")
    done: dict[str, str] = {}

    def get(method: str, rounds: int = ROUNDS, model: str = tiny_bert, **extra) -> str:
        name = f"{method}-{rounds}" + "".join(f"-{k}-{v}" for k, v in extra.items())
        name += "" if model == tiny_bert else f"-{os.path.basename(model.rstrip(os.sep))}"
        if name not in done:
            saved = os.environ.get(STATE_DIR_ENV)
            os.environ[STATE_DIR_ENV] = str(base / "nodes" / name)
            try:
                cfg = make_cfg(method, model, glue_dir, base / "results", **{"run-name": name, "num-server-rounds": rounds, **extra})  # fmt: skip
                run(InProcessGrid(cfg, 1, NODES), cfg, 1)
            finally:
                if saved is None:
                    os.environ.pop(STATE_DIR_ENV, None)
                else:
                    os.environ[STATE_DIR_ENV] = saved
            done[name] = os.path.join(cfg.results_dir, name)
        return done[name]

    return get


def server_reference(run_dir: str, tmp_path) -> tuple[nn.Module, object]:
    """The server's global model of the run's checkpoint, rebuilt as a resumed run rebuilds it (peft's model
    itself for FedAvg-LoRA, adapters unmerged), and the run's config."""
    saved = checkpoint.read(run_dir)
    cfg = parse_run_config(saved.config)
    setup = build_setup(cfg, RunRecorder(str(tmp_path / "reference"), "reference", cfg.to_flat()))
    resume(setup, saved, saved.run_id)
    return find_peft(setup.model) or unwrap(setup.model), cfg, setup


def reference_outputs(net: nn.Module, cfg) -> dict[str, torch.Tensor]:
    from common.modeling import load_tokenizer

    return outputs_of(net, load_tokenizer(cfg.model))


def assert_same(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-5, msg=key)


def export(*args: str) -> int:
    return cli.main(["export", *args])


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_the_export_answers_as_the_server_model_in_plain_transformers(method, runs, tmp_path, capsys):
    run_dir = runs(method)
    out = str(tmp_path / "exported")
    assert export(run_dir, out) == 0, capsys.readouterr().err
    assert f"{method} round {ROUNDS} of {ROUNDS}" in capsys.readouterr().out
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "fedsubspace-export.json", "tokenizer_config.json"} <= files
    reference, cfg, setup = server_reference(run_dir, tmp_path)
    expected = reference_outputs(reference, cfg)
    assert_same(child_outputs(out, tmp_path), expected)
    info = json.loads(Path(out, "fedsubspace-export.json").read_text())
    assert info["round"] == ROUNDS and info["method"] == method and info["max_output_difference"] <= 1e-5
    if method.startswith("fedtt"):
        config = json.loads(Path(out, "config.json").read_text())
        assert "modeling_fedsubspace.py" in files and config["auto_map"]
        assert len(config["fedsubspace"]["adapters"]["sites"]) == len(setup.strategy.tm.adapters.sites)
    if method == "fedavg-lora":
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(os.listdir(os.path.join(out, "adapter")))
        assert_same(child_outputs(os.path.join(out, "adapter"), tmp_path, kind="adapter"), expected)
    assert os.listdir(run_dir) == os.listdir(runs(method))  # nothing written beside the run's records


@pytest.mark.integration
@pytest.mark.parametrize(
    ("method", "model", "extra"),
    [("fedtt", "llama", {}), ("fedkrso", "bert", {"head.pooling": "mean"})],
    ids=["fedtt-llama", "fedkrso-mean-pooling"],
)
def test_decoders_and_mean_pooling_export_too(method, model, extra, runs, tiny_bert, tiny_llama, tmp_path, capsys):
    """A decoder's TT adapters (sites o_proj, down_proj), and an encoder whose pooler the run replaced by the
    mean of the hidden states (head.pooling = mean, the embedded MiniLM's default): the folder's own modeling
    file rebuilds both."""
    run_dir = runs(method, model=tiny_llama if model == "llama" else tiny_bert, **extra)
    out = str(tmp_path / "exported")
    assert export(run_dir, out) == 0, capsys.readouterr().err
    config = json.loads(Path(out, "config.json").read_text())
    assert set(config["fedsubspace"]) == ({"adapters"} if method == "fedtt" else {"pooling"})
    reference, cfg, _ = server_reference(run_dir, tmp_path)
    assert_same(child_outputs(out, tmp_path), reference_outputs(reference, cfg))


@pytest.mark.integration
def test_a_corrupted_adapter_or_missing_hooks_give_other_logits(runs, tmp_path, capsys):
    run_dir = runs("fedtt")
    out = str(tmp_path / "exported")
    assert export(run_dir, out) == 0, capsys.readouterr().err
    reference, cfg, _ = server_reference(run_dir, tmp_path)
    expected = reference_outputs(reference, cfg)

    corrupted = str(tmp_path / "corrupted")
    shutil.copytree(out, corrupted)
    tensors = load_file(os.path.join(corrupted, "model.safetensors"))
    last = max(int(k.split(".")[1]) for k in tensors if k.startswith("fedsubspace_adapters."))
    up = tensors[f"fedsubspace_adapters.{last}.up"]
    assert up.abs().max() > 0  # trained: W_up starts at 0
    up[0, 0] += 0.1  # one number of one contracted tensor train (its entries are about 0.05)
    save_file(tensors, os.path.join(corrupted, "model.safetensors"), metadata={"format": "pt"})
    assert output_difference(child_outputs(corrupted, tmp_path), expected) > 1e-5
    with pytest.raises(ExportError, match="outputs differ from the server's"):
        check_export(reference, corrupted)

    # without its modeling file the folder is the base model alone: the adapters' effect is measurable
    plain = str(tmp_path / "plain")
    shutil.copytree(out, plain)
    os.remove(os.path.join(plain, "modeling_fedsubspace.py"))
    config = json.loads(Path(plain, "config.json").read_text())
    del config["auto_map"], config["fedsubspace"]
    Path(plain, "config.json").write_text(json.dumps(config))
    assert output_difference(child_outputs(plain, tmp_path), expected) > 1e-5


@pytest.mark.integration
def test_bad_input_is_refused_with_what_to_fix(runs, tmp_path, capsys):
    empty = tmp_path / "no-run"
    empty.mkdir()
    assert export(str(empty), str(tmp_path / "x")) == 2
    assert "holds no checkpoint.safetensors" in capsys.readouterr().err

    run_dir = runs("fedavg")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert export(run_dir, str(busy)) == 2
    assert "exists and is not empty: give a new folder, or --force" in capsys.readouterr().err
    assert export(run_dir, str(busy), "--force") == 2  # --force replaces only a previous export
    assert "holds no fedsubspace-export.json (not an export)" in capsys.readouterr().err
    assert (busy / "notes.txt").read_text() == "mine"

    for where in (run_dir, os.path.dirname(run_dir), os.path.join(run_dir, "model")):  # never into a run folder
        assert export(run_dir, where, "--force") == 2
        assert "the run folder is never written to" in capsys.readouterr().err
    other = runs("fedkrso")
    assert export(run_dir, other, "--force") == 2
    assert "holds a run's records" in capsys.readouterr().err

    assert export(run_dir, str(tmp_path / "fedavg"), "--round", "1") == 2
    assert (
        f"fedavg keeps only the last round's global model: round {ROUNDS} is the only one exportable"
        in capsys.readouterr().err
    )
    assert export(other, str(tmp_path / "fedkrso"), "--round", "1") == 2
    assert f"holds the head of the last round only: round {ROUNDS} is the only one exportable" in (
        capsys.readouterr().err
    )
    assert export(run_dir, str(tmp_path / "late"), "--round", str(ROUNDS + 1)) == 2
    assert f"the run's last completed round is {ROUNDS}; give a round in 0..{ROUNDS}" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "fedavg") and not os.path.exists(tmp_path / "late")

    out = str(tmp_path / "again")
    assert export(run_dir, out) == 0
    assert export(run_dir, out) == 2  # a previous export: only with --force
    capsys.readouterr()
    assert export(run_dir, out, "--force") == 0


@pytest.mark.integration
def test_an_update_log_method_exports_an_earlier_round(runs, tmp_path, capsys):
    """FedSPZO's round 1 of a 2-round run is its update log replayed to round 1: the model a 1-round run
    of the same configuration ends with."""
    out = str(tmp_path / "round1")
    assert export(runs("fedspzo"), out, "--round", "1") == 0, capsys.readouterr().err
    assert "fedspzo round 1 of 2" in capsys.readouterr().out
    reference, cfg, _ = server_reference(runs("fedspzo", rounds=1), tmp_path)
    assert_same(child_outputs(out, tmp_path), reference_outputs(reference, cfg))


class LabelWordWrapper(nn.Module):
    """A classifier that scores label words with a causal LM held as `.lm` (the shape unwrap handles)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm


@pytest.mark.integration
def test_generate_answers_from_an_exported_causal_lm(tiny_llama, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    from common.modeling import load_tokenizer

    torch.manual_seed(0)
    lm = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_llama)).eval()
    folder = str(tmp_path / "llama")
    write_pretrained(unwrap(LabelWordWrapper(lm)), load_tokenizer(tiny_llama), folder)
    assert "generation_config.json" in os.listdir(folder)

    def generate(*extra: str, stdin: str = "") -> str:
        proc = subprocess.run(
            [sys.executable, "-m", "common.cli", "generate", folder, *extra, "--max-new-tokens", "8"],
            cwd=ROOT, capture_output=True, text=True, input=stdin, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    first = generate("the weather today is")
    assert first.strip() and generate("the weather today is") == first  # greedy: the same answer each time
    chat = generate("--chat", stdin="hello there\nand then?\n")
    assert len([line for line in chat.splitlines() if line.strip()]) >= 2
