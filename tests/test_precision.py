"""train.precision and train.gradient-checkpointing (common/precision.py) on a tiny decoder: what each method
keeps in float32 under bfloat16, every method's round in bfloat16 through the real server and client code, the
loss near float32's, and activation checkpointing computing the same gradients."""

from __future__ import annotations

import json
import os

import pytest
import torch

from common.config import ConfigError, parse_run_config
from common.methods import METHODS, get_method
from common.modeling import load_model
from common.training import batch, client_data

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def answers(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("precision") / "answers.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"Is {i} even?", "response": ("yes", "no")[i % 2]}) + "\n" for i in range(40))
    )
    return str(path)


def cfg_for(task, model, tmp_path, **keys):
    return parse_run_config(
        {
            "task": task, "model": model, "results-dir": str(tmp_path), "num-server-rounds": 1,
            "train.local-steps": 2, "krso.intervals": 2, "train.batch-size": 4, "train.max-length": 32,
            "eval.generate": 2, "eval.max-new-tokens": 3, "train.precision": "bfloat16", **keys,
        }
    )  # fmt: skip


def dtypes(params) -> set[torch.dtype]:
    return {p.dtype for p in params}


def test_bfloat16_stores_what_a_method_does_not_train_in_half_and_what_it_trains_in_float32(
    answers, tiny_llama, tmp_path
):
    from common.zeroorder import load_zo_model
    from methods.fedavg import model as fedavg
    from methods.fedavg_lora import model as lora
    from methods.fedkrso import model as krso
    from methods.fedtt import model as tt

    cfg = cfg_for(answers, tiny_llama, tmp_path)
    net, trained = lora.build(cfg)
    assert dtypes(trained.values()) == {torch.float32}
    frozen = [p for p in net.parameters() if not p.requires_grad]
    assert frozen and dtypes(frozen) == {torch.bfloat16}
    km = krso.build(cfg)
    assert dtypes(m.weight for m in km.targets.values()) == {torch.float32}
    assert km.loaded.model.get_input_embeddings().weight.dtype == torch.bfloat16  # not a target: stored in half
    zm = load_zo_model(parse_run_config({**cfg.to_flat(), "method": "fedspzo"}))
    assert dtypes(zm.params.values()) == {torch.float32}
    others = [p for p in zm.loaded.model.parameters() if all(p is not q for q in zm.params.values())]
    assert dtypes(others) == {torch.bfloat16}
    tm = tt.build(cfg)
    assert dtypes(tm.adapters.core(k) for k in tm.adapters.core_keys()) == {torch.float32}
    net, trained = fedavg.build(cfg)
    assert dtypes(net.parameters()) == {torch.float32}  # FedAvg trains everything: autocast saves compute only
    # every forward runs under autocast: bfloat16 activations, a float32 loss
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    out = net(**batch(encoded, range(4)))
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32


def test_the_bfloat16_loss_is_near_float32s(answers, tiny_llama, tmp_path):
    cfg = cfg_for(answers, tiny_llama, tmp_path)
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    b = batch(encoded, range(8))
    with torch.no_grad():
        half = float(load_model(tiny_llama, 0, 0, "lm", "bfloat16").model(**b).loss)
        full = float(load_model(tiny_llama, 0, 0, "lm").model(**b).loss)
    assert half == pytest.approx(full, rel=0.02) and half != full


def test_every_method_trains_a_round_in_bfloat16(answers, tiny_llama, tmp_path, task_identity):
    from harness.fakes import InProcessGrid
    from server_app.app import run

    for method in METHODS:
        cfg = cfg_for(answers, tiny_llama, tmp_path, method=method, **{"run-name": method})
        run(InProcessGrid(cfg, 1, {1: 0, 2: 1}), cfg, 1)
        with open(os.path.join(str(tmp_path), method, "rounds.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        assert rows[1]["clients"] == 2 and rows[1]["rejected"] == 0, method
        assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows), method
        assert get_method(method).label


def test_gradient_checkpointing_computes_the_same_gradients(answers, tiny_llama, tmp_path):
    cfg = cfg_for(answers, tiny_llama, tmp_path, **{"train.precision": "float32"})
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    grads = []
    for checkpointing in (False, True):
        net = load_model(tiny_llama, 0, 0, "lm", checkpointing=checkpointing).model
        net.train()
        net(**batch(encoded, range(8))).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None]))
    assert getattr(net, "is_activation_checkpointing", None) or net.is_gradient_checkpointing
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_an_unknown_precision_is_refused():
    with pytest.raises(ConfigError, match="train.precision must be one of float32, bfloat16"):
        parse_run_config({"train.precision": "float16"})
