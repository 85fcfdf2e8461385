"""A split as the model's inputs: a classification head's token ids (`tokenize`), a decoder's label-word prompt
(`encode_prompts`) or an instruction and its response, the loss on the response only (`encode_instructions`);
`encode` picks the one the run's task and head take."""

import json
from typing import TYPE_CHECKING

import datasets
import numpy as np
import torch

from common.tasks import TaskSpec

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# what encode_instructions adds for evaluation, which a batch does not pass to the model
NOT_INPUTS = ("prompt_length", "truncated")
IGNORE = -100  # labels of the tokens no loss is computed on (prompt, padding): PyTorch's and transformers' value


def tokenize(
    dataset: datasets.Dataset,
    tokenizer: "PreTrainedTokenizerBase",
    task: TaskSpec,
    max_length: int,
) -> dict[str, torch.Tensor]:
    """Tokenise a whole (small) split at once: padded to its longest example.

    Pair tasks pass ``text_pair`` so the model sees the two segments separated.
    Returns input_ids, attention_mask and labels.
    """
    if len(dataset) == 0:
        raise ValueError(f"{task.name}: cannot tokenize an empty dataset")
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    pair = list(dataset["text_pair"]) if task.is_pair else None
    enc = tokenizer(
        list(dataset["text"]),
        pair,
        padding="longest",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
        return_token_type_ids=False,
    )
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long),
    }


def encode(
    dataset: datasets.Dataset,
    tokenizer: "PreTrainedTokenizerBase",
    task: TaskSpec,
    max_length: int,
    head_kind: str = "classifier",
    long_responses: str = "truncate",
) -> dict[str, torch.Tensor]:
    """A split as the model's inputs: a classification head's (`tokenize`), a label-word prompt's
    (`encode_prompts`) or an instruction's (`encode_instructions`)."""
    if task.kind == "instruction":
        return encode_instructions(dataset, tokenizer, max_length, long_responses)
    if head_kind == "lm":
        return encode_prompts(dataset, tokenizer, task, max_length)
    return tokenize(dataset, tokenizer, task, max_length)


def encode_prompts(
    dataset: datasets.Dataset, tokenizer: "PreTrainedTokenizerBase", task: TaskSpec, max_length: int
) -> dict[str, torch.Tensor]:
    """Each example as `task.template` filled in (its label words scored at the prompt's last token); a prompt
    over max_length loses its beginning, not the question at its end."""
    if len(dataset) == 0:
        raise ValueError(f"{task.name}: cannot encode an empty dataset")
    choices = " or ".join(w.strip() for w in task.lm_words)
    pairs = dataset["text_pair"] if task.is_pair else [""] * len(dataset)
    texts = [
        task.template.format(text=t, text_pair=p, choices=choices) for t, p in zip(dataset["text"], pairs, strict=True)
    ]
    side = tokenizer.truncation_side
    tokenizer.truncation_side = "left"
    try:
        enc = tokenizer(texts, padding="longest", truncation=True, max_length=max_length, return_tensors="pt",
                        return_token_type_ids=False)  # fmt: skip
    finally:
        tokenizer.truncation_side = side
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": enc["attention_mask"],
        "labels": torch.as_tensor(np.asarray(dataset["label"]), dtype=torch.long),
    }


PLAIN_ROLES = {"system": "{}\n\n", "user": "### Instruction:\n{}\n\n", "assistant": "### Response:\n{}\n\n"}


def render_prompt(tokenizer: "PreTrainedTokenizerBase", messages: list[dict[str, str]]) -> str:
    """The conversation up to the answer as the model reads it: the tokenizer's chat template with its
    generation prompt where it has one, else a plain Alpaca-style layout ending in "### Response:\\n"."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "".join(PLAIN_ROLES[m["role"]].format(m["content"]) for m in messages) + "### Response:\n"


def end_token(tokenizer: "PreTrainedTokenizerBase") -> int | None:
    """The token that ends an answer (eos; a BERT-style tokenizer's [SEP])."""
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def encode_instructions(
    dataset: datasets.Dataset, tokenizer: "PreTrainedTokenizerBase", max_length: int, long_responses: str = "truncate"
) -> dict[str, torch.Tensor]:
    """prompt + response + end token, with labels IGNORE on the prompt and the padding: the loss is on the
    response tokens only. The prompt and the response are tokenized apart, so the boundary is the one a
    generation starts from. A prompt that leaves no room for one response token is refused (naming its row);
    a longer response is cut at max_length and counted (`truncated`), or refused with data.long-responses =
    "refuse"."""
    if len(dataset) == 0:
        raise ValueError("cannot encode an empty dataset")
    end = end_token(tokenizer)
    rows, prompt_lengths, truncated = [], [], []
    for messages, response, where in zip(dataset["messages"], dataset["response"], dataset["where"], strict=True):
        prompt = tokenizer(render_prompt(tokenizer, json.loads(messages)), add_special_tokens=True)["input_ids"]
        answer = tokenizer(response, add_special_tokens=False)["input_ids"] + ([end] if end is not None else [])
        if len(prompt) >= max_length:
            raise ValueError(
                f"{where}: the prompt is {len(prompt)} tokens, train.max-length is {max_length}: no room for the "
                "response. Raise train.max-length or shorten the prompt"
            )
        cut = len(prompt) + len(answer) > max_length
        if cut and long_responses == "refuse":
            raise ValueError(
                f"{where}: prompt + response are {len(prompt) + len(answer)} tokens, over train.max-length = "
                f"{max_length}: raise it, shorten the response, or set data.long-responses = 'truncate'"
            )
        ids = (prompt + answer)[:max_length]
        rows.append((ids, len(prompt)))
        prompt_lengths.append(len(prompt))
        truncated.append(cut)
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (ids, p) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.as_tensor(ids)
        mask[i, : len(ids)] = 1
        labels[i, p : len(ids)] = torch.as_tensor(ids[p:])
    return {
        "input_ids": input_ids,
        "attention_mask": mask,
        "labels": labels,
        "prompt_length": torch.as_tensor(prompt_lengths, dtype=torch.long),
        "truncated": torch.as_tensor(truncated, dtype=torch.bool),
    }
