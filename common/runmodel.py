"""The run's model: `load_model` with the head the run's config asks for (head.kind, head.pooling and
head.init, "auto" resolved from the model and the method), and the model of a method that trains its new
head densely and sends it (FedKRSO, FedTT). Identical on every node: everything derives from the pretrained
weights and the run seed only."""

from __future__ import annotations

import torch
from torch import nn

from common.heads import LabelWordLM, declared_pooling, label_word_head, label_word_ids, use_mean_pooling
from common.modeling import LoadedModel, ModelError, head_parameters, is_decoder, load_model


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
