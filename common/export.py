"""The trained model out, as a standard Hugging Face folder: what every exporter shares (unwrapping the
server's model, writing config.json, the tokenizer, model.safetensors and generation_config.json, the modeling
file for what plain transformers cannot rebuild, the check that the written folder answers as the server's
model does), the default exporter `full_weights`, and `generate` (a greedy answer from an exported folder):

    fedsubspace generate exported/ "Is this review positive? I loved it." [--max-new-tokens N] [--chat]

The export command itself, which rebuilds a run's global model from its checkpoint, is the server's
(server_app/export.py): this module is on the ground floor and imports nothing of server_app/ or methods/.
Where plain transformers cannot rebuild the model from its own classes (TT adapters on hooks, the mean pooling
of head.pooling = mean), the folder carries its own modeling file (common/export_modeling.py, as
modeling_fedsubspace.py, named by config.json's auto_map): load it with `trust_remote_code=True`.

Before the folder is put in place the export is loaded back with transformers and its logits and last hidden
states compared with the server's model on a few inputs (to 1e-5): an export that would not answer as the server's model does is
refused, whatever the method added to the model.
"""

from __future__ import annotations

import copy
import json
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

MARKER = "fedsubspace-export.json"  # what `--force` may replace: a folder holding one is a previous export
MODELING = "modeling_fedsubspace.py"
REMOTE_CLASS = "FedSubspaceModel"
TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "export_modeling.py")
TOLERANCE = 1e-5  # max |difference| of logits and last hidden states, export against the server's model
PROBES = (
    "The film was a delight from start to finish.",
    "A dull, lifeless script.",
    "Is the sky green? No, it is blue and the grass is green.",
)


class ExportError(ValueError):
    """A run, folder or round that cannot be exported; the message says what to change."""


def unwrap(net: nn.Module, merge: bool = True) -> nn.Module:
    """The transformers model inside the server's module: the module itself when it is a PreTrainedModel; a
    peft model's base with the adapters merged into a copy (`merge`; else the PeftModel itself); the `.lm`
    of a wrapper that classifies by scoring label words with a causal LM."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a declared dependency
        PeftModel = ()  # noqa: N806
    if isinstance(net, PeftModel):
        return unwrap(copy.deepcopy(net).merge_and_unload(), merge) if merge else net
    if isinstance(net, PreTrainedModel):
        return net
    inner = getattr(net, "lm", None)
    if isinstance(inner, nn.Module):
        return unwrap(inner, merge)
    raise ExportError(
        f"the run's model is a {type(net).__name__}, neither a transformers model, a peft model nor a wrapper "
        "holding one as `.lm`: it has no Hugging Face form to export"
    )


def find_peft(net: nn.Module):
    """The peft model of the server's module (itself, or its `.lm`), or None."""
    from peft import PeftModel

    while net is not None:
        if isinstance(net, PeftModel):
            return net
        net = getattr(net, "lm", None)
    return None


def site_names(outer: nn.Module, inner: nn.Module, names: Sequence[str]) -> list[str]:
    """Module names of `outer` (the server's module) as names of `inner` (the unwrapped transformers model
    inside it): the same module objects, whatever prefix the wrapping adds."""
    of_inner = {id(m): n for n, m in inner.named_modules()}
    modules = dict(outer.named_modules())
    missing = [n for n in names if id(modules[n]) not in of_inner]
    if missing:
        raise ExportError(f"modules {missing[:3]} are not inside the exported transformers model")
    return [of_inner[id(modules[n])] for n in names]


def auto_class(net: nn.Module) -> str:
    """The transformers Auto class that loads this model's kind."""
    for cls in type(net).__mro__:  # an export's own class (modeling_fedsubspace) subclasses the architecture's
        for suffix, auto in (
            ("ForCausalLM", "AutoModelForCausalLM"),
            ("ForSequenceClassification", "AutoModelForSequenceClassification"),
        ):
            if cls.__name__.endswith(suffix):
                return auto
    return "AutoModel"


def pooling_of(net: nn.Module) -> str | None:
    """'mean' when the run swapped the encoder's pooler for common.heads' MeanPooler."""
    from common.heads import MeanPooler

    pooler = getattr(getattr(net, "base_model", None), "pooler", None)
    return "mean" if isinstance(pooler, MeanPooler) else None


def is_causal(net: nn.Module) -> bool:
    return auto_class(net) == "AutoModelForCausalLM"


def write_pretrained(
    net: nn.Module,
    tokenizer,
    folder: str,
    extra: Mapping[str, Any] | None = None,
    modules: Mapping[str, nn.Module] | None = None,
) -> None:
    """`net` (a transformers model) and `tokenizer` as a Hugging Face folder: config.json, model.safetensors,
    the tokenizer's files and, for a causal LM, generation_config.json.

    `extra`: what the run added to the architecture (config.json's "fedsubspace" entry: "adapters"; the mean
    pooling is read off `net`); `modules`: their weights, attached to `net` while it is saved (and removed
    after) so they land in model.safetensors under their names. Either makes the folder carry its own modeling
    file (common/export_modeling.py), named by config.json's auto_map."""
    extra = dict(extra or {})
    pooling = pooling_of(net)
    if pooling:
        extra["pooling"] = pooling
    attached = dict(modules or {})
    clash = [n for n in attached if hasattr(net, n)]
    if clash:
        raise ExportError(f"the model already has attributes {clash}")
    for name, module in attached.items():
        net.add_module(name, module)
    try:
        net.save_pretrained(folder, safe_serialization=True)
    finally:
        for name in attached:
            delattr(net, name)
    tokenizer.save_pretrained(folder)
    if is_causal(net) and not os.path.isfile(os.path.join(folder, "generation_config.json")):
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(net.config).save_pretrained(folder)
    if extra:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            config = json.load(f)
        config["fedsubspace"] = extra
        config["auto_map"] = {auto_class(net): f"{MODELING.removesuffix('.py')}.{REMOTE_CLASS}"}
        with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        write_modeling_file(folder, config["architectures"][0])


def write_modeling_file(folder: str, base: str) -> None:
    """common/export_modeling.py with BASE set to `base` (a transformers class name), as modeling_fedsubspace.py."""
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", base):
        raise ExportError(f"config.architectures[0] {base!r} is not a class name")
    with open(TEMPLATE, encoding="utf-8") as f:
        text = f.read()
    text, n = re.subn(r'^BASE = "[A-Za-z0-9_]+"', f'BASE = "{base}"', text, count=1, flags=re.M)
    if n != 1:  # pragma: no cover - the template's own line
        raise ExportError(f"{TEMPLATE} has no BASE line")
    with open(os.path.join(folder, MODELING), "w", encoding="utf-8") as f:
        f.write(text)


def tokenizer_of(cfg):
    from common.modeling import load_tokenizer

    return load_tokenizer(cfg.model)


def full_weights(setup, cfg, folder: str) -> dict[str, Any]:
    """The exporter of the methods that train the model's own weights (FedKRSO, FedAvg, FedSPZO, FedKSeed):
    the global model's every weight, as `save_pretrained` writes them, and the run's tokenizer."""
    write_pretrained(unwrap(setup.model), tokenizer_of(cfg), folder)
    return {"kind": "full weights"}


# ---------------------------------------------------------------- the check: the export answers as the server


def load_export(folder: str, causal: bool | None = None):
    """The exported model, as plain transformers loads it (trust_remote_code only where the folder carries
    the modeling file of an export), in eval mode; and its tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    remote = os.path.isfile(os.path.join(folder, MODELING))
    config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    if causal is None:
        causal = any(a.endswith("ForCausalLM") for a in (config.architectures or []))
    auto = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    model = auto.from_pretrained(folder, trust_remote_code=remote, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def model_inputs(net: nn.Module, enc: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer's outputs the model's forward takes (a BERT tokenizer's token_type_ids on a LLaMA: not)."""
    import inspect

    params = inspect.signature(net.forward).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()) and "token_type_ids" not in params:
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    return {k: v for k, v in enc.items() if k in params}


@torch.no_grad()
def outputs_of(net: nn.Module, tokenizer, texts: Sequence[str] = PROBES) -> dict[str, torch.Tensor]:
    """The logits and the last hidden states on `texts`: a tiny or barely trained model's logits can hardly
    move with its inputs, the hidden states it feeds the head do."""
    was = net.training
    net.eval()
    try:
        enc = tokenizer(list(texts), padding=True, truncation=True, max_length=64, return_tensors="pt")
        out = net(**model_inputs(net, enc), output_hidden_states=True)
        return {"logits": out.logits.float(), "hidden": out.hidden_states[-1].float()}
    finally:
        net.train(was)


def output_difference(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Max |difference| over the logits and the last hidden states (inf where the shapes differ)."""
    diffs = [float((a[k] - b[k]).abs().max()) if a[k].shape == b[k].shape else float("inf") for k in a]
    return max(diffs)


def check_export(reference: nn.Module, folder: str) -> float:
    """Max |difference| of the logits and last hidden states between `reference` (the server's model, its
    hooks included) and the export loaded back; ExportError above TOLERANCE."""
    model, tokenizer = load_export(folder, causal=is_causal(reference))
    diff = output_difference(outputs_of(reference, tokenizer), outputs_of(model, tokenizer))
    if not diff <= TOLERANCE:
        raise ExportError(
            f"the exported model's outputs differ from the server's by {diff:.3g} (tolerance {TOLERANCE:g}): "
            "the export does not hold the whole global model; nothing was written"
        )
    return diff


# ---------------------------------------------------------------- generate


def greedy(model, tokenizer, inputs: Mapping[str, torch.Tensor], max_new_tokens: int) -> str:
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def chat_inputs(tokenizer, messages: list[dict[str, str]]) -> dict[str, torch.Tensor]:
    """The conversation as model inputs: the tokenizer's chat template, or plain "role: text" lines."""
    if getattr(tokenizer, "chat_template", None):
        enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    enc = tokenizer(text, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask")}


def classify(model, tokenizer, prompt: str) -> str:
    """A sequence classifier's answer: its label and the labels' probabilities."""
    enc = model_inputs(model, tokenizer(prompt, return_tensors="pt", truncation=True))
    with torch.no_grad():
        probs = model(**enc).logits.float().softmax(-1)[0]
    names = model.config.id2label or {}
    label = int(probs.argmax())
    spread = ", ".join(f"{names.get(i, i)} {float(p):.3f}" for i, p in enumerate(probs))
    return f"{names.get(label, label)} ({spread})"


def generate_command(folder: str, prompt: str | None, max_new_tokens: int, chat: bool) -> int:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        print(f"error: '{folder}' holds no config.json: give a folder `fedsubspace export` wrote", file=sys.stderr)
        return 2
    if max_new_tokens < 1:
        print("error: --max-new-tokens must be at least 1", file=sys.stderr)
        return 2
    model, tokenizer = load_export(folder)
    causal = is_causal(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not chat:
        if prompt is None:
            print("error: give a PROMPT, or --chat for a conversation", file=sys.stderr)
            return 2
        if causal:
            enc = model_inputs(model, tokenizer(prompt, return_tensors="pt"))
            print(greedy(model, tokenizer, enc, max_new_tokens))
        else:
            print(classify(model, tokenizer, prompt))
        return 0
    if not causal:
        print("error: --chat needs a causal LM export; this folder holds a sequence classifier", file=sys.stderr)
        return 2
    messages: list[dict[str, str]] = []
    pending = [prompt] if prompt else []
    while True:
        if pending:
            line = pending.pop()
        else:
            try:
                line = input("> ")
            except EOFError:
                return 0
        if line.strip() in ("", "exit", "quit"):
            return 0
        messages.append({"role": "user", "content": line})
        answer = greedy(model, tokenizer, chat_inputs(tokenizer, messages), max_new_tokens)
        messages.append({"role": "assistant", "content": answer})
        print(answer, flush=True)
