"""The head the run trains, and how it reads the model and starts.

A new classification head reads the encoder's pooled output (head.pooling: the architecture's own pooler,
or `MeanPooler` where the checkpoint declares sentence-transformers mean pooling) and starts random or as a
zero-shot classifier of the label texts (head.init = "label-words", `label_word_head`). A decoder's own LM
head scores a classification task by its label words (`LabelWordLM`, MeZO's prompt-based fine-tuning), so no
parameter is new and zero-order methods start from the model's own zero-shot classifier. Which of these a run
takes is common/runmodel.py's.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from common import export_modeling
from common.modeling import LoadedModel, ModelError, resolve


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


# Replaces a BERT-style pooler: the mean of the last hidden states over the real (unpadded) tokens.
#
# Sentence-transformers checkpoints such as all-MiniLM-L6-v2 were trained to be read this way; their [CLS]
# pooler was not (on the embedded model, a linear probe of the SST-2 dev split reaches 77.9% on mean-pooled
# features and 65.3% on the pooler's, bench/zo_head_probe.py). The attention mask is taken from the
# encoder's own call by a forward pre-hook, since a pooler is called with the hidden states only.
# One definition: the exported model's own file (self-contained, it imports torch and transformers only)
# defines it, and the run's model uses the very same class.
MeanPooler = export_modeling.MeanPooler


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
