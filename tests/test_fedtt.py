"""FedTT / FedTT+ and FedAvg-LoRA: TT maths, identity at initialisation, aggregation, the FedTT+ wire and rule,
malformed replies, and a LoRA round, with the tiny models of conftest.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import ConfigError, parse_run_config
from common.methods import get_method
from common.records import RunRecorder
from common.runmodel import load_run_model
from common.wire import content_bytes
from harness.fakes import NodeList, client_reply
from methods.fedtt import client as tc
from methods.fedtt.model import build
from methods.fedtt.server import FedTT
from methods.fedtt.tt import (
    aggregate,
    core_shapes,
    init_cores,
    mode_sizes,
    plus_selection,
    tt_to_matrix,
)
from methods.fedtt.wire import unpack_instruction

pytestmark = pytest.mark.usefixtures("task_identity")


NODES = {101: 0, 102: 1, 103: 2}


def make_cfg(model, glue_dir, tmp_path, method="fedtt-plus", **extra):
    return parse_run_config(
        {
            "method": method, "model": model, "task": "rte", "data-dir": glue_dir,
            "results-dir": str(tmp_path / "results"), "run-name": method, "train.local-steps": 3,
            "train.batch-size": 4, "train.max-length": 32, "train.lr": 5e-2, "tt.bottleneck": 8, "tt.rank": 3,
            **extra,
        }
    )  # fmt: skip


def client_round(cfg, msg):
    return client_reply(tc.train, cfg, msg, NODES)


def strategy_for(cfg):
    tm = build(cfg)
    return tm, FedTT(
        cfg, tm, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()), plus=get_method(cfg.method).options["plus"]
    )


# ---- mathematics ----------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("d", [384, 576, 768, 1024, 4096])
def test_mode_sizes_factor_hidden_size_times_bottleneck(d):
    for max_mode in (4, 8):
        modes = mode_sizes(d, 64, max_mode)
        assert math.prod(modes) == d * 64 and max(modes) <= 3 * max_mode
        shapes = core_shapes(modes, 5)
        assert shapes[0][0] == shapes[-1][2] == 1
        assert all(a[2] == b[0] for a, b in zip(shapes, shapes[1:], strict=False))


@pytest.mark.unit
def test_tt_contraction_equals_the_dense_matrix():
    gen = torch.Generator().manual_seed(0)
    rows, cols = 24, 8
    modes = mode_sizes(rows, cols)  # [6, 4] + [4, 2]
    cores = init_cores(core_shapes(modes, 3), 1.0, gen)
    dense = tt_to_matrix(cores, rows, cols)
    # Independently: W[i_1..i_L] = G_1[:, i_1, :] ... G_L[:, i_L, :] for every multi-index, row-major.
    ref = torch.zeros(modes)
    for idx in np.ndindex(*modes):
        prod = torch.eye(1)
        for g, i in zip(cores, idx, strict=True):
            prod = prod @ g[:, i, :]
        ref[idx] = prod.squeeze()
    torch.testing.assert_close(dense, ref.reshape(rows, cols))
    tl = pytest.importorskip("tensorly")  # the well-kept library agrees as well (where installed)
    tl.set_backend("pytorch")
    torch.testing.assert_close(tl.tt_to_tensor(cores).reshape(rows, cols), dense)


@pytest.mark.unit
def test_init_variance_and_zero_up():
    # One draw's entry variance swings by 2x either way (each core holds a few dozen numbers and scales the whole
    # matrix), so the law is checked on the mean over 20 draws: E[var W] = 1/384.
    variances = [
        float(tt_to_matrix(init_cores(core_shapes(mode_sizes(384, 64), 4), 1.0 / 384, torch.Generator().manual_seed(s)), 384, 64).var())
        for s in range(20)
    ]  # fmt: skip
    assert 0.5 / 384 < sum(variances) / len(variances) < 2.0 / 384


@pytest.mark.unit
def test_aggregation_is_the_weighted_mean_and_exact_for_one_core_per_matrix():
    gen = torch.Generator().manual_seed(2)
    shared = init_cores(core_shapes(mode_sizes(12, 4), 2), 1.0, gen)
    clients = [(1.0, torch.randn(shared[1].shape, generator=gen)), (3.0, torch.randn(shared[1].shape, generator=gen))]
    mean = aggregate([(w, {(0, "down", 1): c}) for w, c in clients])[(0, "down", 1)]
    torch.testing.assert_close(mean, (1.0 * clients[0][1] + 3.0 * clients[1][1]) / 4)
    # Only core 1 differs between the clients: the dense matrix is linear in it, so the mean of the cores
    # gives exactly the mean of the clients' dense matrices (FedTT+'s exact aggregation).
    dense = [tt_to_matrix([shared[0], c, *shared[2:]], 12, 4) for _, c in clients]
    torch.testing.assert_close(tt_to_matrix([shared[0], mean, *shared[2:]], 12, 4), (dense[0] + 3 * dense[1]) / 4)
    # Two cores differing at once: the mean of the cores is NOT the mean of the matrices (why FedTT+ trains one).
    a, b = [torch.randn(shared[0].shape, generator=gen) for _ in range(2)]
    avg = aggregate([(1.0, {0: a, 1: clients[0][1]}), (1.0, {0: b, 1: clients[1][1]})])
    mixed = tt_to_matrix([avg[0], avg[1], *shared[2:]], 12, 4)
    both = (
        tt_to_matrix([a, clients[0][1], *shared[2:]], 12, 4) + tt_to_matrix([b, clients[1][1], *shared[2:]], 12, 4)
    ) / 2
    assert not torch.allclose(mixed, both, atol=1e-4)


@pytest.mark.integration
@pytest.mark.parametrize("which", ["tiny_bert", "tiny_llama"])
def test_adapters_start_as_identity_and_sit_after_attention_and_ffn_outputs(which, request, glue_dir, tmp_path):
    model = request.getfixturevalue(which)
    cfg = make_cfg(model, glue_dir, tmp_path)
    tm = build(cfg)
    plain = load_run_model(cfg).model  # the same model and head (the LM head scoring label words on tiny_llama)
    enc = tm.loaded.tokenizer(["a fine film", "not good at all, no"], return_tensors="pt", padding=True)
    enc.pop("token_type_ids", None)
    with torch.no_grad():
        torch.testing.assert_close(tm.loaded.model(**enc).logits, plain(**enc).logits, rtol=0, atol=0)
    suffixes = {"attention.output.dense", "output.dense"} if which == "tiny_bert" else {"o_proj", "down_proj"}
    assert len(tm.adapters.sites) == 4 and {s.split(".")[-1] for s in tm.adapters.sites} <= {"dense", *suffixes}
    assert all(any(s.endswith(x) for x in suffixes) for s in tm.adapters.sites)
    with torch.no_grad():  # the hooks are live: a nonzero W_up changes the output
        tm.adapters.core((0, "up", tm.adapters.num_cores(0, "up") - 1)).fill_(0.5)
        assert not torch.allclose(tm.loaded.model(**enc).logits, plain(**enc).logits)


# ---- FedTT+ rule, wire and protocol -----------------------------------------------------------------------


@pytest.mark.integration
def test_fedtt_plus_trains_only_the_selected_cores_which_alone_travel_up(tiny_bert, glue_dir, tmp_path):
    cfg = make_cfg(tiny_bert, glue_dir, tmp_path)
    tm, strategy = strategy_for(cfg)
    start = tm.adapters.state()
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(NODES)))
    selected = strategy.selected[1]
    # Round 1: each W_up trains its last (zero) core, W_down nothing.
    assert selected == [(i, "up", tm.adapters.num_cores(i, "up") - 1) for i in range(4)]
    replies = [client_round(cfg, m) for m in msgs]
    for r in replies:
        assert sorted(r.content["cores"].keys()) == [f"{i}.up" for i in range(4)]
        assert all(
            r.content["cores"][f"{i}.up"].shape
            == (math.prod(tm.adapters.shapes()[(i, "up", tm.adapters.num_cores(i, "up") - 1)]),)
            for i in range(4)
        )
    strategy.aggregate_train(1, replies)
    assert strategy.recorder.end_round(1, None)["clients"] == 3
    after = tm.adapters.state()
    for k in tm.adapters.core_keys():
        assert torch.equal(after[k], start[k]) == (k not in selected), k  # frozen cores untouched
    # Round 2: the clients' gradient scores choose one core per matrix, W_down included now that W_up != 0.
    msgs = list(strategy.configure_train(2, ArrayRecord(), ConfigRecord(), NodeList(NODES)))
    sel2 = strategy.selected[2]
    assert {m for _, m, _ in sel2} == {"down", "up"} and len(sel2) <= 8
    best = {
        (i, m): max(range(tm.adapters.num_cores(i, m)), key=lambda j, i=i, m=m: strategy.scores[(i, m, j)])
        for i in range(4)
        for m in ("down", "up")
    }
    assert all(best[(i, m)] == j for i, m, j in sel2)
    instr = unpack_instruction(msgs[0].content, tm.adapters.shapes(), tm.head_shapes)
    assert instr.selected == sel2 and instr.want_scores
    strategy.aggregate_train(2, [client_round(cfg, m) for m in msgs])
    rec = strategy.recorder.end_round(2, None)
    # FedTT sends every core up: more bytes than FedTT+.
    full_cfg = make_cfg(tiny_bert, glue_dir, tmp_path, method="fedtt")
    _, full = strategy_for(full_cfg)
    full_msgs = list(full.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(NODES)))
    full.aggregate_train(1, [client_round(full_cfg, m) for m in full_msgs])
    assert full.recorder.end_round(1, None)["bytes_up"] > rec["bytes_up"]


@pytest.mark.unit
def test_cyclic_rule_sweeps_from_the_last_core():
    class Two:
        adapters = [None]

        def num_cores(self, i, m):
            return 3

    assert plus_selection(Two(), 1, "cyclic", 1, None) == [(0, "up", 2)]
    assert plus_selection(Two(), 2, "cyclic", 1, None) == [(0, "down", 1), (0, "up", 1)]
    assert plus_selection(Two(), 4, "cyclic", 1, None) == [(0, "down", 2), (0, "up", 2)]
    scores = {(0, "down", 0): 0.0, (0, "down", 1): 0.0, (0, "down", 2): 0.0, (0, "up", 0): 3.0, (0, "up", 1): 5.0}
    assert plus_selection(Two(), 2, "gradient", 2, scores) == [(0, "up", 0), (0, "up", 1)]


def _corrupt(content: RecordDict, how: str) -> RecordDict:
    cores = content["cores"]
    key = next(iter(cores.keys()))
    good = cores[key].numpy()
    if how == "nan":
        bad = good.copy()
        bad[0] = np.nan
        cores[key] = Array(bad)
    elif how == "shape":
        cores[key] = Array(np.zeros(good.shape[0] + 1, np.float32))
    elif how == "dtype":
        cores[key] = Array(good.astype(np.float64))
    elif how == "frozen":  # a core that was not trainable this round
        cores["0.down"] = Array(np.zeros(7, np.float32))
    elif how == "missing":
        del cores[key]
    elif how == "scores":
        content["scores"] = ArrayRecord({"scores": Array(np.full(3, -1.0, np.float32))})
    elif how == "round":
        content["metrics"]["model-round"] = 7
    elif how == "examples":
        content["metrics"]["num-examples"] = 0
    return content


@pytest.mark.integration
def test_malformed_core_replies_are_rejected_and_the_round_goes_on(tiny_bert, glue_dir, tmp_path):
    cfg = make_cfg(tiny_bert, glue_dir, tmp_path)
    tm, strategy = strategy_for(cfg)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(NODES)))
    good = client_round(cfg, msgs[0])
    kinds = ["nan", "shape", "dtype", "frozen", "missing", "scores", "round", "examples"]
    bad = []
    for how in kinds:
        reply = client_round(cfg, msgs[1])
        bad.append(Message(_corrupt(reply.content, how), reply_to=msgs[1]))
    before = tm.adapters.state()
    strategy.aggregate_train(
        1, [good, *bad, Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=msgs[2])]
    )
    rec = strategy.recorder.end_round(1, None)
    assert rec["clients"] == 1 and rec["rejected"] == len(kinds) + 1
    after = tm.adapters.state()
    assert all(torch.isfinite(v).all() for v in after.values())
    assert any(not torch.equal(after[k], before[k]) for k in strategy.selected[1])  # the good reply applied


# ---- FedAvg-LoRA --------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_fedavg_lora_round_and_bytes_against_fedtt(tiny_bert, tiny_llama, glue_dir, tmp_path):
    from methods.fedavg_lora import client as lc
    from methods.fedavg_lora.model import build as build_lora
    from server_app.app import build_setup

    cfg = make_cfg(tiny_bert, glue_dir, tmp_path, method="fedavg-lora")
    rec = RunRecorder(cfg.results_dir, "lora", cfg.to_flat())
    setup = build_setup(cfg, rec)
    net, params = build_lora(cfg)
    assert {n.split(".")[-3] for n in params if "lora_" in n} == {"lora_A", "lora_B"}
    assert any("classifier" in n for n in params) and len(params) == 2 * 2 * 2 + 2  # 2 layers x q,v x A,B + head
    before = {n: p.detach().clone() for n, p in setup.strategy.params.items()}
    msgs = list(setup.strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(NODES)))
    replies = [
        Message(
            lc.train(m.content, cfg, {"partition-id": NODES[m.metadata.dst_node_id], "num-partitions": 3}, 1, 1),
            reply_to=m,
        )
        for m in msgs
    ]
    setup.strategy.aggregate_train(1, replies)
    assert rec.end_round(1, None)["clients"] == 3
    trained = {n.removeprefix("base_model.model."): p for n, p in setup.model.named_parameters()}
    assert any(not torch.equal(trained[n], before[n]) for n in before)  # the strategy trains the server's model
    assert all(content_bytes(r.content) > 0 for r in replies)
    with pytest.raises(ValueError, match="q_proj,v_proj"):
        build_lora(make_cfg(tiny_llama, glue_dir, tmp_path, method="fedavg-lora", **{"lora.targets": "qv"}))
    # the default "query,value" names the same projections on a decoder: q_proj and v_proj
    _, default = build_lora(make_cfg(tiny_llama, glue_dir, tmp_path, method="fedavg-lora"))
    _, llama_params = build_lora(
        make_cfg(tiny_llama, glue_dir, tmp_path, method="fedavg-lora", **{"lora.targets": "q_proj,v_proj"})
    )
    assert sorted(default) == sorted(llama_params) and {n.split(".")[-4] for n in default} == {"q_proj", "v_proj"}
    assert len(default) == 2 * 2 * 2  # the LM head scores the label words: no new head to train and send


@pytest.mark.unit
def test_tt_and_lora_config_errors_name_the_key():
    for key, value, match in [
        ("tt.rank", 0, "tt.rank"),
        ("tt.plus-rule", "best", "tt.plus-rule"),
        ("tt.plus-cores", 0, "tt.plus-cores"),
        ("lora.dropout", 1.0, "lora.dropout"),
        ("lora.targets", " ", "lora.targets"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_run_config({"method": "fedtt-plus", key: value})
