"""Which parameters zero-order training perturbs (zo.params)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from common.config import ConfigError, parse_run_config
from common.training import client_data
from common.zeroorder import load_zo_model, zo_parameters
from methods.fedspzo import spzo
from methods.fedspzo.wire import pack_reply, unpack_reply


@pytest.mark.integration
def test_subsets(tiny_bert):
    zm = load_zo_model(parse_run_config({"method": "fedkseed", "model": tiny_bert, "head.init": "random"}))
    net, head = zm.loaded.model, zm.loaded.head
    everything = zo_parameters(net, False, "all", head)
    bitfit = zo_parameters(net, False, "bitfit", head)
    only_head = zo_parameters(net, False, "head", head)
    assert set(only_head) == {"classifier.weight", "classifier.bias"}
    assert set(only_head) < set(bitfit) < set(everything)
    assert all(n.endswith(".bias") or "LayerNorm" in n or n.startswith("classifier") for n in bitfit)
    assert any("LayerNorm.weight" in n for n in bitfit)
    assert not any(n.endswith("query.weight") for n in bitfit)
    with pytest.raises(ValueError, match="zo.params"):
        zo_parameters(net, False, "some", head)


@pytest.mark.integration
def test_fedspzo_splits_bitfit_into_two_blocks(tiny_bert):
    sm = spzo.build(
        parse_run_config({"method": "fedspzo", "model": tiny_bert, "zo.params": "bitfit", "spzo.split-layer": 1})
    )
    assert sm.pert1.params and sm.pert2.params
    assert "classifier.weight" in sm.pert2.params
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in sm.pert1.params)


@pytest.mark.unit
def test_refused():
    with pytest.raises(ConfigError, match="zo.params"):
        parse_run_config({"zo.params": "lora"})


def _head_only(tiny_bert, glue_dir, tmp_path, **extra):
    return parse_run_config(
        {
            "method": "fedspzo", "model": tiny_bert, "task": "rte", "data-dir": glue_dir, "results-dir": str(tmp_path),
            "train.local-steps": 3, "train.batch-size": 4, "train.max-length": 32, "spzo.split-layer": 1,
            "spzo.p2": 3, "zo.eps": 1e-2, "zo.params": "head", "spzo.p1": 0, **extra,
        }
    )  # fmt: skip


@pytest.mark.integration
def test_fedspzo_head_only_needs_p1_zero(tiny_bert, glue_dir, tmp_path):
    with pytest.raises(ValueError, match="set spzo.p1 = 0"):
        spzo.build(_head_only(tiny_bert, glue_dir, tmp_path, **{"spzo.p1": 1}))


@pytest.mark.integration
def test_fedspzo_head_only_trains_the_head_and_replays(tiny_bert, glue_dir, tmp_path):
    """Head-only (zo.params = head, P1 = 0): block 1 frozen, g1 has no columns, the wire carries (S, 0),
    and replaying the scalars rebuilds the client's head; nothing else moves."""
    cfg = _head_only(tiny_bert, glue_dir, tmp_path)
    client, server = spzo.build(cfg), spzo.build(cfg)
    assert client.pert1 is None and set(client.pert2.params) == {"classifier.weight", "classifier.bias"}
    before = {n: p.detach().clone() for n, p in client.zo.loaded.model.named_parameters()}
    encoded, _ = client_data(cfg, {"partition-id": 0, "num-partitions": 2})
    rho = spzo.round_seed(cfg.seed, 1)
    result = spzo.local_update(client, cfg, rho, cfg.zo.lr, encoded, [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]])
    assert result.g1.shape == (3, 0) and result.g2.shape == (3, 3) and np.all(result.g2 != 0)
    assert len(result.losses) == 9 and all(np.isfinite(result.losses))
    assert result.forward_passes == 3 * (1 + 2 * 3)
    moved = {n for n, p in client.zo.loaded.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"classifier.weight", "classifier.bias"}
    reply = unpack_reply(
        pack_reply(result.g1, result.g2, {"num-examples": 12, "model-round": 0, "train-loss": 0.7}),
        1, 0, 3, 3, cfg.zo.eps,
    )  # fmt: skip
    assert reply.g1.shape == (3, 0)
    spzo.replay(server, spzo.LogEntry(1, rho, cfg.zo.lr, reply.g1, reply.g2))
    for n, p in server.params.items():
        torch.testing.assert_close(p, client.params[n], rtol=1e-6, atol=1e-6)
