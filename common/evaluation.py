"""Server-side evaluation of the global model on the task's evaluation split.

Classification (a new head, or the LM head scoring label words): mean loss and every metric of the task.
Instruction tasks: the held-out response loss (mean over every response token of the split, the training
objective) and its perplexity, and the exact match of greedy answers to the first `eval.generate` prompts
(answers and references compared as decoded text, stripped and case-folded), reported as "accuracy".
"""

from __future__ import annotations

import math
import time

import torch
from torch import nn

from common.encoding import IGNORE
from common.tasks import TaskSpec, compute_metrics
from common.training import Encoded, batch

# instruction tasks: rows per forward pass of the response loss, whatever eval.batch-size says: the LM head's
# logits are rows x tokens x vocabulary (8 x 128 x 49,152 floats = 200 MB for SmolLM2)
LM_EVAL_ROWS = 8


@torch.no_grad()
def evaluate(
    model: nn.Module, encoded: Encoded, task: TaskSpec, batch_size: int, eval_cfg=None, tokenizer=None
) -> dict[str, float]:
    """Mean loss and every metric of the task (accuracy; MCC for CoLA; F1 for MRPC); for instruction tasks
    `evaluate_instructions` (answers generated up to eval_cfg's budget, compared as text by `tokenizer`)."""
    if task.kind == "instruction":
        generate = 32 if eval_cfg is None else eval_cfg.generate
        max_new = 32 if eval_cfg is None else eval_cfg.max_new_tokens
        return evaluate_instructions(model, encoded, min(batch_size, LM_EVAL_ROWS), generate, max_new, tokenizer)
    model.eval()
    n = len(encoded["labels"])
    preds: list[int] = []
    loss_sum = 0.0
    for start in range(0, n, batch_size):
        out = model(**batch(encoded, range(start, min(n, start + batch_size))))
        size = min(n, start + batch_size) - start
        loss_sum += float(out.loss) * size
        preds.extend(out.logits.argmax(dim=-1).tolist())
    metrics = compute_metrics(task, preds, encoded["labels"].tolist())
    metrics["loss"] = loss_sum / max(n, 1)
    return metrics


def response_tokens(labels: torch.Tensor) -> int:
    """Tokens a causal LM's loss averages over in this batch: the response labels after the shift by one."""
    return int((labels[:, 1:] != IGNORE).sum())


@torch.no_grad()
def evaluate_instructions(
    model: nn.Module, encoded: Encoded, rows: int, generate: int, max_new_tokens: int, tokenizer=None
) -> dict[str, float]:
    model.eval()
    n = len(encoded["labels"])
    loss_sum, tokens = 0.0, 0
    for start in range(0, n, rows):
        b = batch(encoded, range(start, min(n, start + rows)))
        count = response_tokens(b["labels"])
        if count:
            loss_sum += float(model(**b).loss) * count
            tokens += count
    loss = loss_sum / max(tokens, 1)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "response-tokens": float(tokens)}
    if generate > 0:
        clock = time.perf_counter()
        answers = greedy_answers(model, encoded, min(generate, n), max_new_tokens, tokenizer)
        out["accuracy"] = sum(a == r for a, r in answers) / len(answers)
        out["generated"] = float(len(answers))
        out["generate-seconds"] = time.perf_counter() - clock
    return out


def _normal(ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(ids.tolist(), skip_special_tokens=True).strip().casefold()


def greedy_answers(
    model: nn.Module, encoded: Encoded, count: int, max_new_tokens: int, tokenizer
) -> list[tuple[str, str]]:
    """(answer, reference) of the first `count` prompts as text decoded by `tokenizer` (stripped, case-folded):
    greedy decoding, one prompt at a time (no padding), stopped at the end token or after max_new_tokens."""
    from common.encoding import end_token

    if tokenizer is None:
        raise ValueError("scoring generated answers needs the run's tokenizer, to compare them as text")
    pairs = []
    for i in range(count):
        p = int(encoded["prompt_length"][i])
        real = int(encoded["attention_mask"][i].sum())
        prompt = encoded["input_ids"][i, :p].unsqueeze(0)
        made = model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=max_new_tokens,
            do_sample=False, pad_token_id=model.config.pad_token_id, eos_token_id=end_token(tokenizer),
        )[0, p:]  # fmt: skip
        pairs.append((_normal(made, tokenizer), _normal(encoded["input_ids"][i, p:real], tokenizer)))
    return pairs
