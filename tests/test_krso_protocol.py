"""FedKRSO protocol: server strategy and real clients over several rounds, with dropped nodes.

The strategy runs unchanged; messages are built with Flower's own Message class and handed from
`configure_train` to the client function and back, which is what the runtime does with them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import parse_run_config
from common.nodestore import STATE_DIR_ENV, NodeStore, state_dir
from common.records import RunRecorder
from harness.fakes import NodeList, client_reply
from methods.fedkrso import client as kc
from methods.fedkrso.model import build, fingerprint
from methods.fedkrso.server import FedKRSO
from methods.fedkrso.wire import unpack_instruction
from tests.test_nodestore import DAMAGE, damage

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]


NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id


def make_cfg(tiny_bert, glue_dir, tmp_path, **extra):
    return parse_run_config(
        {
            "model": tiny_bert, "task": "rte", "data-dir": glue_dir, "results-dir": str(tmp_path / "results"),
            "run-name": "protocol", "train.local-steps": 4, "train.batch-size": 4, "train.max-length": 32,
            "train.lr": 1e-2, "krso.k": 2, "krso.rank": 4, "krso.intervals": 2, **extra,
        }
    )  # fmt: skip


def client_round(cfg, msg, run_id=1):
    return client_reply(kc.train, cfg, msg, NODES, run_id)


def held_weights(cfg, node, run_id=1):
    km = build(cfg)
    store = NodeStore(state_dir({}, run_id, node), "fedkrso-state", fingerprint(cfg))
    return store.load(km.target_weights()), {n: m.weight.detach().clone() for n, m in km.targets.items()}


def test_server_and_clients_agree_after_dropouts_and_catch_up(tiny_bert, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg = make_cfg(tiny_bert, glue_dir, tmp_path)
    km = build(cfg)
    pretrained = {n: m.weight.detach().clone() for n, m in km.targets.items()}
    strategy = FedKRSO(cfg, km, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    grid = NodeList(NODES)
    for rnd in (1, 2, 3):
        msgs = list(strategy.configure_train(rnd, ArrayRecord(), ConfigRecord(), grid))
        replies = [client_round(cfg, m) for m in msgs if not (rnd in (2, 3) and m.metadata.dst_node_id == 102)]
        strategy.aggregate_train(rnd, replies)
        strategy.recorder.end_round(rnd, None)
    assert any(not torch.equal(m.weight, pretrained[n]) for n, m in km.targets.items())
    # Round 4: node 102 trained in round 1 from round 0 (it never keeps its own local training), so it
    # gets rounds 1-3 of the log; the others trained in round 3 from round 2 and get only round 3.
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(4, ArrayRecord(), ConfigRecord(), grid)}
    logs = {n: unpack_instruction(m.content, 2, km.shapes, km.head_shapes, cfg.seed).log for n, m in msgs.items()}
    assert [e.round for e in logs[102]] == [1, 2, 3] and [e.round for e in logs[101]] == [3]
    for node, msg in msgs.items():
        client_round(cfg, msg)  # catches up, saves the global state of round 3, trains
        reached, weights = held_weights(cfg, node)
        assert reached == 3
        for name, mod in km.targets.items():
            torch.testing.assert_close(weights[name], mod.weight.detach(), rtol=0, atol=1e-6)
    rounds = strategy.recorder.rounds
    assert [r["clients"] for r in rounds] == [3, 2, 2]
    assert rounds[1]["bytes_up"] < rounds[0]["bytes_up"]  # two replies instead of three


@pytest.mark.parametrize("how", ["wiped", *DAMAGE])
def test_node_that_lost_its_state_is_resynced_from_the_full_log(how, tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Node 103's state is wiped, or damaged (tests/test_nodestore.py: a flipped bit, the round label off by one,
    a NaN under a recomputed checksum, truncated): it says it holds nothing, gets the whole log, equals the server."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg = make_cfg(tiny_bert, glue_dir, tmp_path)
    km = build(cfg)
    strategy = FedKRSO(cfg, km, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    grid = NodeList(NODES)
    for rnd in (1, 2):
        strategy.aggregate_train(rnd, [client_round(cfg, m) for m in strategy.configure_train(rnd, None, None, grid)])
        strategy.recorder.end_round(rnd, None)
    path = NodeStore(state_dir({}, 1, 103), "fedkrso-state", fingerprint(cfg)).path
    if how == "wiped":
        os.remove(path)
    else:
        damage(path, how)
    replies = [client_round(cfg, m) for m in strategy.configure_train(3, None, None, grid)]
    strategy.aggregate_train(3, replies)
    assert strategy.node_round[103] == 0  # it said it holds nothing: the next log starts at round 1
    assert strategy.recorder.end_round(3, None)["clients"] == 2  # the other two nodes trained as usual
    msg = next(m for m in strategy.configure_train(4, None, None, grid) if m.metadata.dst_node_id == 103)
    assert [e.round for e in unpack_instruction(msg.content, 2, km.shapes, km.head_shapes, cfg.seed).log] == [1, 2, 3]
    client_round(cfg, msg)
    reached, weights = held_weights(cfg, 103)
    assert reached == 3
    for name, mod in km.targets.items():
        torch.testing.assert_close(weights[name], mod.weight.detach(), rtol=0, atol=1e-6)


def _corrupt(content: RecordDict, how: str) -> RecordDict:
    acc = content["accumulators"]
    key = next(iter(acc.keys()))
    good = acc[key].numpy()
    if how == "nan":
        bad = good.copy()
        bad[0, 0] = np.nan
        acc[key] = Array(bad)
    elif how == "shape":
        acc[key] = Array(np.zeros((good.shape[0] + 1, good.shape[1]), np.float32))
    elif how == "dtype":
        acc[key] = Array(good.astype(np.float64))
    elif how == "key":
        acc["9/not.a.target"] = Array(good)
    elif how == "examples":
        content["metrics"]["num-examples"] = -5
    elif how == "head":
        content["head"] = ArrayRecord({"classifier.weight": Array(np.zeros((1, 1), np.float32))})
    return content


def test_malformed_replies_are_rejected_and_the_round_goes_on(tiny_bert, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg = make_cfg(tiny_bert, glue_dir, tmp_path)
    km = build(cfg)
    strategy = FedKRSO(cfg, km, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    msgs = list(strategy.configure_train(1, None, None, NodeList(NODES)))
    good = client_round(cfg, msgs[0])
    bad_kinds = ["nan", "shape", "dtype", "key", "examples", "head"]
    bad = []
    for how in bad_kinds:
        reply = client_round(cfg, msgs[1])
        bad.append(Message(_corrupt(reply.content, how), reply_to=msgs[1]))
    empty = Message(RecordDict({"metrics": MetricRecord({"num-examples": 3})}), reply_to=msgs[2])
    before = {n: m.weight.detach().clone() for n, m in km.targets.items()}
    strategy.aggregate_train(1, [good, *bad, empty])
    rec = strategy.recorder.end_round(1, None)
    assert rec["clients"] == 1 and rec["rejected"] == len(bad_kinds) + 1
    assert torch.isfinite(torch.cat([m.weight.flatten() for m in km.targets.values()])).all()
    assert any(not torch.equal(m.weight, before[n]) for n, m in km.targets.items())  # the good reply applied
    assert len(strategy.log) == 1 and strategy.node_round == {msgs[0].metadata.dst_node_id: 0}


def test_decoder_model_trains_in_subspaces(tiny_llama, glue_dir, tmp_path, monkeypatch):
    """LLaMA-family decoders: q/k/v/o and the MLP projections are targets; the LM head scores the label words
    and is never a target (it is often the embedding table, tied); with head.kind = "classifier", `score`."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    classifier = build(make_cfg(tiny_llama, glue_dir, tmp_path, **{"head.kind": "classifier"}))
    assert set(classifier.head) == {"score.weight"}
    cfg = make_cfg(tiny_llama, glue_dir, tmp_path)
    km = build(cfg)
    assert km.head == {} and km.loaded.lm_head == ("lm.lm_head",) and not any("lm_head" in n for n in km.targets)
    assert any(n.endswith("q_proj") for n in km.targets) and any(n.endswith("down_proj") for n in km.targets)
    strategy = FedKRSO(cfg, km, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    msgs = list(strategy.configure_train(1, None, None, NodeList(NODES)))
    strategy.aggregate_train(1, [client_round(cfg, m) for m in msgs])
    assert strategy.recorder.end_round(1, None)["clients"] == 3


@pytest.mark.parametrize(
    "setting", [{"krso.rank": 8}, {"krso.k": 3}, {"head.pooling": "mean"}, {"head.init": "label-words"}]
)
def test_node_state_fingerprint_covers_what_the_model_depends_on(tiny_bert, glue_dir, tmp_path, setting):
    """A node's stored model built under another head or subspace must be refused, not silently reused."""
    assert fingerprint(make_cfg(tiny_bert, glue_dir, tmp_path)) != fingerprint(
        make_cfg(tiny_bert, glue_dir, tmp_path, **setting)
    )
