"""Shared fixtures: tiny real models (random weights, real tokenizer) and the GLUE folder."""

from __future__ import annotations

import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLUE = os.environ.get("GLUE_DIR") or os.path.join(ROOT, "..", "shared", "data", "glue")


def _save_tiny(path: str, kind: str) -> str:
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


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT saved without a classification head (as a pretrained checkpoint would be)."""
    return _save_tiny(str(tmp_path_factory.mktemp("tiny-bert")), "bert")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer LLaMA-architecture decoder, for the decoder path."""
    return _save_tiny(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def glue_dir() -> str:
    if not os.path.isdir(GLUE):
        pytest.skip(f"GLUE folder not found at {GLUE}: set GLUE_DIR")
    return os.path.abspath(GLUE)


@pytest.fixture
def task_identity():
    """Lets tests build Flower Messages outside a runtime (the runtime normally sets these)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
