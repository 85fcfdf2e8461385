"""Registry of the GLUE / SuperGLUE classification tasks and their metrics.

Every other module looks tasks up here, so a task's label count, text fields and
reported metrics are defined once.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TaskSpec:
    """What the data loader, model head and evaluation need to know about a task."""

    name: str
    text_fields: tuple[str, ...]  # ("text",) or ("text", "text_pair") after normalisation
    num_labels: int
    metrics: tuple[str, ...]
    hub: tuple[str, str]  # (dataset id, config name) for datasets.load_dataset
    dev_split_name: str  # how reports name the labelled evaluation split
    # One short text per label, in label order, whose pooled embedding starts that label's row of the head
    # (head.init = "label-words", common/heads.py). The SST-2 words were chosen by a probe on the embedded
    # MiniLM (bench/zo_head_probe.py): "It was bad." / "It was good." 72.2% zero-shot on the dev split.
    label_words: tuple[str, ...] = ()
    # A decoder classifies with its own LM head (head.kind = "lm"): the prompt is `template` filled with the
    # example ({text}, {text_pair}, {choices}: the label words joined by "or"), and logit c is the LM's logit of
    # the first token of `lm_words[c]` at the prompt's last token (MeZO's prompt-based fine-tuning).
    lm_words: tuple[str, ...] = ()
    template: str = ""
    kind: str = "classification"  # or "instruction" (common/datafiles.py): a prompt and the response to learn
    label_names: tuple[str, ...] = ()  # the labels as the data names them, in label order (data tasks)
    source: str = ""  # a data task's file or Hub id ("" for the built-in tasks)

    @property
    def is_pair(self) -> bool:
        """Whether examples are sentence pairs (text + text_pair)."""
        return len(self.text_fields) == 2


_SINGLE = ("text",)
_PAIR = ("text", "text_pair")
_GLUE = "nyu-mll/glue"
_SUPER_GLUE = "aps/super_glue"

_NO_YES = (" No", " Yes")
# The SST-2 prompt and words are the ones the untrained SmolLM2-135M-Instruct scores 72.7% with on 300 dev
# examples (../shared/docs/llm.md; 71.0% through LabelWordLM here). The order of the choices in the prompt
# matters to so small a model: "(negative or positive)" scored 49.7% on the same examples. The others follow
# MeZO's templates, phrased as questions.
TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec(
        "sst2", _SINGLE, 2, ("accuracy",), (_GLUE, "sst2"), "dev", ("It was bad.", "It was good."),
        (" negative", " positive"), "Review: {text}\nSentiment (positive or negative):",
    ),
    "rte": TaskSpec(
        "rte", _PAIR, 2, ("accuracy",), (_GLUE, "rte"), "dev", ("Yes.", "No."),
        (" Yes", " No"), "{text}\nDoes this mean that \"{text_pair}\" is true? ({choices}):",
    ),
    "mrpc": TaskSpec(
        "mrpc", _PAIR, 2, ("accuracy", "f1"), (_GLUE, "mrpc"), "dev", ("Different.", "Same."),
        _NO_YES, "{text}\n{text_pair}\nDo both sentences mean the same thing? ({choices}):",
    ),
    "cola": TaskSpec(
        "cola", _SINGLE, 2, ("accuracy", "mcc"), (_GLUE, "cola"), "dev", ("Wrong.", "Correct."),
        _NO_YES, "{text}\nIs this sentence grammatical? ({choices}):",
    ),
    "wic": TaskSpec(
        "wic", _PAIR, 2, ("accuracy",), (_SUPER_GLUE, "wic"), "val", ("Different.", "Same."),
        _NO_YES, "{text}\n{text_pair}\nIs the word used with the same meaning in both sentences? ({choices}):",
    ),
    "boolq": TaskSpec(
        "boolq", _PAIR, 2, ("accuracy",), (_SUPER_GLUE, "boolq"), "val", ("No.", "Yes."),
        _NO_YES, "{text_pair}\nQuestion: {text}?\nAnswer ({choices}):",
    ),
    "cb": TaskSpec(
        "cb", _PAIR, 3, ("accuracy",), (_SUPER_GLUE, "cb"), "val", ("Yes.", "No.", "Maybe."),
        (" Yes", " No", " Maybe"), "{text}\nDoes this mean that \"{text_pair}\" is true? ({choices}):",
    ),
}  # fmt: skip


def get_task(name: str) -> TaskSpec:
    """Look a built-in task up by name, failing loudly on typos in the run config (a run's task, built-in or
    from a file: common.data.task_of)."""
    try:
        return TASKS[name]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise ValueError(f"Unknown task {name!r}; known tasks: {known}") from None


def _binary_counts(preds: np.ndarray, labels: np.ndarray) -> tuple[float, ...]:
    """Confusion counts (tp, tn, fp, fn) for positive class 1, as floats to avoid overflow."""
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    return tp, tn, fp, fn


def _mcc(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary Matthews correlation; 0.0 when undefined (a constant row or column)."""
    tp, tn, fp, fn = _binary_counts(preds, labels)
    denom = (tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    if denom == 0.0:
        return 0.0
    return float((tp * tn - fp * fn) / np.sqrt(denom))


def _f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of class 1; 0.0 when there are no positive predictions or labels."""
    tp, _, fp, fn = _binary_counts(preds, labels)
    denom = 2.0 * tp + fp + fn
    return 0.0 if denom == 0.0 else 2.0 * tp / denom


def compute_metrics(task: TaskSpec, preds: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """Every metric the task reports, so all strategies are scored identically."""
    p = np.asarray(preds, dtype=np.int64).reshape(-1)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.shape != y.shape:
        raise ValueError(f"{p.size} predictions but {y.size} labels")
    if p.size == 0:
        raise ValueError("Cannot compute metrics on zero examples")
    for what, arr in (("prediction", p), ("label", y)):
        if arr.min() < 0 or arr.max() >= task.num_labels:
            raise ValueError(
                f"{task.name}: {what} values must be in [0, {task.num_labels}), got min {arr.min()} max {arr.max()}"
            )
    out: dict[str, float] = {}
    for metric in task.metrics:
        if metric == "accuracy":
            out[metric] = float(np.mean(p == y))
        elif metric == "mcc":
            out[metric] = _mcc(p, y)
        elif metric == "f1":
            out[metric] = _f1(p, y)
        else:
            raise ValueError(f"{task.name}: unsupported metric {metric!r}")
    return out
