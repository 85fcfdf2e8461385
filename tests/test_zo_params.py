"""Which parameters zero-order training perturbs (zo.params)."""

from __future__ import annotations

import pytest

from common.config import ConfigError, parse_run_config
from common.fedspzo import spzo
from common.zeroorder import load_zo_model, zo_parameters


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


def test_fedspzo_splits_bitfit_into_two_blocks(tiny_bert):
    sm = spzo.build(
        parse_run_config({"method": "fedspzo", "model": tiny_bert, "zo.params": "bitfit", "spzo.split-layer": 1})
    )
    assert sm.pert1.params and sm.pert2.params
    assert "classifier.weight" in sm.pert2.params
    assert all(n.endswith(".bias") or "LayerNorm" in n for n in sm.pert1.params)


def test_refused():
    with pytest.raises(ConfigError, match="zo.params"):
        parse_run_config({"zo.params": "lora"})
