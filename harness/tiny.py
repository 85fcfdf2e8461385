"""Tiny real models for the tests, the scale benchmark and the cost scripts: random weights in the real
architectures (a 2-layer BERT, a 2-layer LLaMA) with the embedded encoder's real tokenizer, saved as a
pretrained checkpoint would be, so that every code path that loads a model from a folder runs on them in
seconds."""

from __future__ import annotations

import torch


def save_tiny(path: str, kind: str) -> str:
    """Writes a tiny `kind` ("bert" or "llama") model and its tokenizer into `path`; returns `path`."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    from common.modeling import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    torch.manual_seed(0)
    if kind == "bert":
        model = BertModel(
            BertConfig(
                vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=512,
            )
        )  # fmt: skip
    else:
        model = LlamaModel(
            LlamaConfig(
                vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, intermediate_size=64, pad_token_id=tok.pad_token_id,
            )
        )  # fmt: skip
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path
