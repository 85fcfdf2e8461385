"""The head's input (head.pooling) and start (head.init): mean pooling and the label-word head."""

from __future__ import annotations

import pytest
import torch

from common.config import ConfigError, parse_run_config
from common.heads import MeanPooler, declared_pooling, label_word_head
from common.modeling import ModelError, load_model
from common.runmodel import head_settings, load_run_model


@pytest.mark.unit
def test_mean_pooler_ignores_padding():
    h = torch.arange(2 * 3 * 4, dtype=torch.float32).view(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    pooler = MeanPooler()
    pooler.mask = mask
    out = pooler(h)
    assert torch.allclose(out[0], h[0, :2].mean(dim=0))
    assert torch.allclose(out[1], h[1].mean(dim=0))


@pytest.mark.integration
def test_mean_pooling_is_what_the_model_feeds_its_head(tiny_bert):
    cfg = parse_run_config({"method": "fedavg", "model": tiny_bert, "head.pooling": "mean"})
    loaded = load_run_model(cfg)
    net = loaded.model
    enc = loaded.tokenizer(["a short one", "a somewhat longer sentence than that"], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = net.base_model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        expected = net.classifier((hidden * m).sum(1) / m.sum(1))
        logits = net(**enc).logits
    assert torch.allclose(logits, expected, atol=1e-6)
    assert not any("pooler" in n for n, _ in net.named_parameters())  # the unused pooler's weights are gone


@pytest.mark.integration
def test_label_word_head_classifies_its_own_label_texts(tiny_bert):
    loaded = load_model(tiny_bert, 3, 0)
    words = ("It was bad.", "It was good.", "It was fine.")
    before = {n: p.clone() for n, p in loaded.model.named_parameters() if not n.startswith("classifier")}
    label_word_head(loaded, words)  # computed in float64 (the same on every CPU), the model given back as it was
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters() if n in before)
    enc = loaded.tokenizer(list(words), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = loaded.model(**enc).logits
    assert logits.argmax(dim=-1).tolist() == [0, 1, 2]
    assert torch.count_nonzero(loaded.model.classifier.bias) == 0


@pytest.mark.integration
def test_label_word_head_is_the_same_on_every_node(tiny_bert):
    cfg = parse_run_config({"method": "fedspzo", "model": tiny_bert})
    a, b = load_run_model(cfg).model, load_run_model(cfg).model
    assert torch.equal(a.classifier.weight, b.classifier.weight)
    random_head = load_model(tiny_bert, 2, cfg.seed).model.classifier.weight
    assert not torch.equal(a.classifier.weight, random_head)


@pytest.mark.integration
def test_auto_settings(tiny_bert):
    assert declared_pooling("") == "mean"  # all-MiniLM-L6-v2 declares sentence-transformers mean pooling
    assert declared_pooling(tiny_bert) == "model"
    assert head_settings(parse_run_config({"method": "fedkseed"})) == ("mean", "label-words")
    assert head_settings(parse_run_config({"method": "fedkrso", "model": tiny_bert})) == ("model", "random")


@pytest.mark.integration
def test_refusals(tiny_llama):
    with pytest.raises(ConfigError, match="head.pooling"):
        parse_run_config({"head.pooling": "max"})
    with pytest.raises(ConfigError, match="head.init"):
        parse_run_config({"head.init": "zeros"})
    with pytest.raises(ModelError, match="pooler"):
        load_run_model(
            parse_run_config(
                {"method": "fedavg", "model": tiny_llama, "head.pooling": "mean", "head.kind": "classifier"}
            )
        )
    with pytest.raises(ModelError, match="head.pooling = 'mean' sets how a new classification head"):
        load_run_model(parse_run_config({"method": "fedavg", "model": tiny_llama, "head.pooling": "mean"}))
    with pytest.raises(ModelError, match="needs a decoder LM"):
        load_run_model(parse_run_config({"method": "fedavg", "head.kind": "lm"}))
