"""FedSPZO and FedKSeed protocol: the server strategies and real clients over rounds with dropped, late and
wiped nodes, and malformed replies. Messages are Flower's own, handed from configure_train to the client
function and back, as the runtime does."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from flwr.app import Array, Message, RecordDict

from common.config import parse_run_config
from common.nodestore import STATE_DIR_ENV, NodeStore, state_dir
from common.records import RunRecorder
from common.zeroorder import fingerprint
from harness.fakes import NodeList, client_reply
from methods.fedkseed import client as kseed_client
from methods.fedkseed import kseed
from methods.fedkseed.server import FedKSeed
from methods.fedspzo import client as spzo_client
from methods.fedspzo import spzo
from methods.fedspzo.server import FedSPZO

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]

METHODS = {
    "fedspzo": (spzo.build, FedSPZO, spzo_client.train),
    "fedkseed": (kseed.build, FedKSeed, kseed_client.train),
}
PARTITION = {101: 0, 102: 1, 103: 2, 104: 3}


def make(method, tiny_bert, glue_dir, tmp_path):
    cfg = parse_run_config(
        {
            "method": method, "model": tiny_bert, "task": "rte", "data-dir": glue_dir,
            "results-dir": str(tmp_path / "results"), "run-name": method, "train.local-steps": 3,
            "train.batch-size": 4, "train.max-length": 32, "zo.lr": 1e-2, "zo.eps": 1e-2,
            "spzo.split-layer": 1, "spzo.p1": 0, "spzo.p2": 2, "kseed.k": 64, "kseed.perturbations": 2, "min-clients": 1,
        }
    )  # fmt: skip
    build, strategy_cls, _ = METHODS[method]
    model = build(cfg)
    return cfg, model, strategy_cls(cfg, model, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))


def client_round(cfg, msg):
    return client_reply(METHODS[cfg.method][2], cfg, msg, PARTITION)


def run_round(strategy, cfg, rnd, nodes, skip=()):
    msgs = list(strategy.configure_train(rnd, None, None, NodeList(nodes)))
    strategy.aggregate_train(rnd, [client_round(cfg, m) for m in msgs if m.metadata.dst_node_id not in skip])
    return strategy.recorder.end_round(rnd, None)


def stored(cfg, node):
    model = METHODS[cfg.method][0](cfg)
    store = NodeStore(state_dir({}, 1, node), f"{cfg.method}-state", fingerprint(cfg, cfg.method))
    return store.load(model.params), model.params


def assert_same(a, b):
    for name, p in a.items():
        torch.testing.assert_close(p, b[name], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["fedspzo", "fedkseed"])
def test_server_and_clients_agree_after_dropped_late_and_wiped_nodes(
    method, tiny_bert, glue_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg, model, strategy = make(method, tiny_bert, glue_dir, tmp_path)
    pretrained = {n: p.clone() for n, p in model.params.items()}
    first = run_round(strategy, cfg, 1, [101, 102, 103])
    assert first["clients"] == 3
    run_round(strategy, cfg, 2, [101, 102, 103], skip={102})  # 102 drops out (its reply never comes)
    os.remove(NodeStore(state_dir({}, 1, 103), f"{method}-state", fingerprint(cfg, method)).path)  # 103's disk wiped
    third = run_round(strategy, cfg, 3, [101, 102, 103, 104])  # 104 joins late
    assert third["clients"] == 3  # 103 answered sync-only: it holds round 0 and gets the whole log next time
    assert strategy.node_round[103] == 0 and strategy.node_round[104] == 2
    assert any(not torch.equal(p, pretrained[n]) for n, p in model.params.items())
    run_round(strategy, cfg, 4, [101, 102, 103, 104])
    for node in (101, 102, 103, 104):  # every node catches up to round 3 and trains from there
        reached, params = stored(cfg, node)
        assert reached == 3
        if node != 103:  # 103 replied in round 4 from round 3 too; all hold exactly the server's round-3 model
            assert strategy.node_round[node] == 3
    # The server has since applied round 4; the nodes hold round 3. Replaying round 4 on a node's copy
    # must give the server's model: check by catching one node up in round 5.
    run_round(strategy, cfg, 5, [101])
    reached, params = stored(cfg, 101)
    assert reached == 4
    server_at_4 = METHODS[method][0](cfg)
    for entry in strategy.log[:4]:
        if method == "fedspzo":
            spzo.replay(server_at_4, entry)
        else:
            kseed.replay(server_at_4, entry, cfg.kseed.perturbations)
    assert_same(params, server_at_4.params)
    # The up-link carries scalars only, the size the wire format states.
    per_client = first["bytes_up"] / 3
    if method == "fedspzo":
        assert per_client < 4 * 3 * (1 + 2) + 600  # S (P1 + P2) float32 + record keys and metrics
    else:
        assert per_client < 8 * 3 * 2 + 600  # at most S P (index, scalar) pairs


def _corrupt_spzo(content: RecordDict, how: str) -> RecordDict:
    rec = content["scalars"]
    g2 = rec["g2"].numpy()
    if how == "nan":
        bad = g2.copy()
        bad[0, 0] = np.nan
        rec["g2"] = Array(bad)
    elif how == "short":
        rec["g2"] = Array(np.ascontiguousarray(g2[:-1]))
    elif how == "width":
        rec["g1"] = Array(np.zeros((3, 5), np.float32))
    elif how == "dtype":
        rec["g2"] = Array(g2.astype(np.float64))
    elif how == "extra":
        rec["g3"] = Array(g2)
    elif how == "round":
        content["metrics"]["model-round"] = 7
    return content


def _corrupt_kseed(content: RecordDict, how: str) -> RecordDict:
    rec = content["scalars"]
    values = rec["scalars"].numpy()
    if how == "nan":
        bad = values.copy()
        bad[0] = np.inf
        rec["scalars"] = Array(bad)
    elif how == "short":
        rec["scalars"] = Array(np.ascontiguousarray(values[:-1]))
    elif how == "range":
        rec["index"] = Array(np.array([63, 64][: len(values)] + [65] * max(0, len(values) - 2), np.int32))
    elif how == "dtype":
        rec["index"] = Array(rec["index"].numpy().astype(np.int64))
    elif how == "extra":
        rec["more"] = Array(values)
    elif how == "round":
        content["metrics"]["num-examples"] = 0
    return content


@pytest.mark.parametrize("method", ["fedspzo", "fedkseed"])
def test_malformed_scalar_replies_are_rejected_and_the_round_goes_on(
    method, tiny_bert, glue_dir, tmp_path, monkeypatch
):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg, model, strategy = make(method, tiny_bert, glue_dir, tmp_path)
    msgs = list(strategy.configure_train(1, None, None, NodeList([101, 102])))
    good = client_round(cfg, msgs[0])
    corrupt = _corrupt_spzo if method == "fedspzo" else _corrupt_kseed
    kinds = ["nan", "short", "width" if method == "fedspzo" else "range", "dtype", "extra", "round"]
    bad = []
    for how in kinds:
        reply = client_round(cfg, msgs[1])
        bad.append(Message(corrupt(reply.content, how), reply_to=msgs[1]))
    before = {n: p.clone() for n, p in model.params.items()}
    strategy.aggregate_train(1, [*bad, good])
    rec = strategy.recorder.end_round(1, None)
    assert rec["clients"] == 1 and rec["rejected"] == len(kinds)
    assert all(torch.isfinite(p).all() for p in model.params.values())
    assert any(not torch.equal(p, before[n]) for n, p in model.params.items())  # the good reply was applied
    # The log holds exactly the good client's scalars: replaying it on a fresh model gives the server's.
    fresh = METHODS[method][0](cfg)
    if method == "fedspzo":
        np.testing.assert_array_equal(strategy.log[0].g2, good.content["scalars"]["g2"].numpy())
        spzo.replay(fresh, strategy.log[0])
    else:
        kseed.replay(fresh, strategy.log[0], cfg.kseed.perturbations)
    assert_same(fresh.params, model.params)
