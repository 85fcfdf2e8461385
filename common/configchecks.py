"""What a run-config value may be, and the checks of every run's settings against it: the choices of each
listed key, the range of every rate, scale and eps and the largest value of every count, size and timeout (the
core's and each registered method section's own), and `check_settings`, which common.config.validate runs
first (then the aggregation section's checks, beside its section there, and each method section's own)."""

from __future__ import annotations

import math
import re
from typing import Any

from common import methods
from common.methodspec import MethodSpec, need

PARTITIONINGS = ("iid", "dirichlet", "natural")  # natural: by data.client-column (a data task's own clients)
TASK_KINDS = ("auto", "classification", "instruction")
HEAD_KINDS = ("auto", "classifier", "lm")
LONG_RESPONSES = ("truncate", "refuse")
OPTIMIZERS = ("auto", "adam", "sgd")  # auto: Adam for first-order methods, plain SGD for zero-order ones
PRECISIONS = ("float32", "bfloat16")  # train.precision (common/precision.py)
ZO_PARAMS = ("all", "bitfit", "head")  # common.zeroorder.zo_parameters
HEAD_POOLINGS = ("auto", "model", "mean")
HEAD_INITS = ("auto", "random", "label-words")

# Every rate, scale and eps: finite and in this range (docs/configuration.md), or no run with it can train:
# key -> (low, high, low included, why the range); ranges() adds each registered method section's own.
CORE_RANGES: dict[str, tuple[float, float, bool, str]] = {
    "train.lr": (0.0, 1.0, False, "a step above 1 moves a weight by more than its own size; auto = the method's rate"),
    "train.weight-decay": (0.0, 1.0, True, "a decay above 1 per step erases the weights"),
    "zo.lr": (0.0, 1.0, False, "every node refuses a zero-order η above common.wire.ZO_LR_MAX = 1"),
    "zo.eps": (0.0, 0.1, False, "ε is a small perturbation; 1e-3 is the default"),
}
# key -> (the largest value, why): every count, size and timeout is bounded, so that a typo (1e308 rounds, 2^63
# steps) is refused before anything starts instead of failing hours later. The bounds are far above any run a
# device or a simulation could make; each method section adds its own MAXIMA (class attributes; maxima()).
CORE_MAXIMA: dict[str, tuple[float, str]] = {
    "num-server-rounds": (100_000, "rounds of one run"),
    "seed": (2**32 - 1, "a 32-bit seed"),
    "min-clients": (1_000_000, "nodes of one federation"),
    "round-timeout": (7 * 86_400.0, "a week, in seconds"),
    "dirichlet-alpha": (1e6, "at a few hundred the split is IID already"),
    "train.local-steps": (1_000_000, "steps of one client round"),
    "train.batch-size": (65_536, "examples in one step"),
    "train.max-length": (1_048_576, "tokens of one example"),
    "eval.every": (100_000, "rounds between evaluations"),
    "eval.max-examples": (100_000_000, "evaluation examples"),
    "eval.batch-size": (65_536, "examples in one evaluation pass"),
    "eval.generate": (1_000_000, "answers generated per evaluation"),
    "eval.max-new-tokens": (65_536, "tokens of one generated answer"),
    "aggregation.attackers": (1_000_000, "hostile replies per round"),
    "aggregation.norm-cap": (1e6, "multiples of the round's median update norm"),
    "aggregation.clip-norm": (1e12, "an update's L2 norm"),
    "aggregation.weight-cap": (1e6, "multiples of the round's median num-examples"),
}


def ranges() -> dict[str, tuple[float, float, bool, str]]:
    """CORE_RANGES and each registered method section's own (its RANGES, e.g. tt.scale, lora.alpha)."""
    own = {f"{n}.{k}": r for n, cls in methods.sections().items() for k, r in getattr(cls, "RANGES", {}).items()}
    return {**CORE_RANGES, **own}


def maxima() -> dict[str, tuple[float, str]]:
    """CORE_MAXIMA and each registered method section's own (its MAXIMA)."""
    own = {f"{n}.{k}": m for n, cls in methods.sections().items() for k, m in getattr(cls, "MAXIMA", {}).items()}
    return {**CORE_MAXIMA, **own}


NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems (check_paths asks the real one)


def _interval(low: float, high: float, low_included: bool) -> str:
    return f"{'[' if low_included else '('}{low:g}, {high:g}]"


def check_settings(cfg: Any, spec: MethodSpec) -> None:
    """Refuse impossible settings of every run (the task, its data, the run's counts, names, ranges and maxima,
    train.*, eval.*, head.*, zo.*, what replay needs of the method `spec`) with a message that names the key and
    the fix."""
    from common.datafiles import FILE_SUFFIXES, is_data_task
    from common.tasks import TASKS  # local import: tasks pulls in numpy only, but keep config light

    need(
        cfg.task in TASKS or is_data_task(cfg.task),
        f"task '{cfg.task}' is unknown; choose one of: {', '.join(sorted(TASKS))}, or give the path of a "
        f"{', '.join(FILE_SUFFIXES)} file, or hf:org/name",
    )
    need(cfg.task_kind in TASK_KINDS, f"task-kind '{cfg.task_kind}' is unknown; choose one of: {', '.join(TASK_KINDS)}")
    need(
        cfg.task_kind == "auto" or cfg.task not in TASKS or cfg.task_kind == "classification",
        f"task-kind '{cfg.task_kind}': the built-in task '{cfg.task}' is a classification task; for an instruction "
        "task give a file of prompts and responses as task",
    )
    d = cfg.data
    need(
        math.isfinite(d.eval_fraction) and 0 < d.eval_fraction <= 0.5,
        f"data.eval-fraction must be in (0, 0.5], got {d.eval_fraction}",
    )
    need(
        d.long_responses in LONG_RESPONSES,
        f"data.long-responses '{d.long_responses}' is unknown; choose one of: {', '.join(LONG_RESPONSES)}",
    )
    need(
        cfg.partitioning != "natural" or d.client_column.strip() != "",
        "partitioning = 'natural' needs data.client-column: the column naming the client that holds each row",
    )
    need(
        cfg.partitioning != "natural" or cfg.task not in TASKS,
        f"partitioning = 'natural' needs a data task with a client column; '{cfg.task}' has none: use iid or dirichlet",
    )
    need(cfg.head.kind in HEAD_KINDS, f"head.kind '{cfg.head.kind}' is unknown; choose one of: {', '.join(HEAD_KINDS)}")
    need(cfg.num_server_rounds >= 1, "num-server-rounds must be >= 1")
    need(cfg.seed >= 0, "seed must be >= 0")
    need(
        cfg.partitioning in PARTITIONINGS,
        f"partitioning '{cfg.partitioning}' is unknown; choose one of: {', '.join(PARTITIONINGS)}",
    )
    need(
        math.isfinite(cfg.dirichlet_alpha) and cfg.dirichlet_alpha > 0,
        f"dirichlet-alpha must be > 0 and finite, got {cfg.dirichlet_alpha}",
    )
    need(0 < cfg.fraction_train <= 1, "fraction-train must be in (0, 1]")
    need(cfg.min_clients >= 1, "min-clients must be >= 1")
    need(
        math.isfinite(cfg.round_timeout) and cfg.round_timeout > 0,
        f"round-timeout must be a finite number of seconds > 0, got {cfg.round_timeout}",
    )
    # The run's records go to <results-dir>/<run-name>: one plain name inside results-dir, nothing else.
    need(
        cfg.run_name == "" or re.fullmatch(r"[A-Za-z0-9._-]+", cfg.run_name) is not None,
        f"run-name '{cfg.run_name}' may only contain letters, digits, '.', '_' and '-' (no '/')",
    )
    need(
        cfg.run_name not in (".", ".."),
        f"run-name '{cfg.run_name}' names results-dir itself or its parent: give the run a name of its own",
    )
    need(
        len(cfg.run_name.encode()) <= NAME_MAX,
        f"run-name is {len(cfg.run_name.encode())} bytes long; a file name holds at most {NAME_MAX}: shorten it",
    )
    flat = cfg.to_flat()
    for key, (low, high, low_included, why) in ranges().items():
        v = flat[key]
        need(
            math.isfinite(v) and (low <= v if low_included else low < v) and v <= high,
            f"{key} must be in {_interval(low, high, low_included)}, got {v!r} ({why}): set it in that range",
        )
    for key, (high, why) in maxima().items():
        v = flat[key]
        # `not v > high`: a NaN is left to the key's own finiteness check, which names it so
        shown = f"{float(v):g}" if abs(v) >= 1e15 else repr(v)  # a 309-digit int is not a message
        need(not v > high, f"{key} = {shown} is too large: at most {high:g} ({why}); set it in range")
    t = cfg.train
    need(t.local_steps >= 1, "train.local-steps must be >= 1")
    need(t.batch_size >= 1, "train.batch-size must be >= 1")
    need(t.optimizer in OPTIMIZERS, f"train.optimizer must be one of {', '.join(OPTIMIZERS)}")
    need(t.max_length >= 8, "train.max-length must be >= 8 tokens")
    need(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}, got '{t.precision}'")
    need(cfg.eval.every >= 1, "eval.every must be >= 1 (rounds between evaluations)")
    need(cfg.eval.max_examples >= 0, "eval.max-examples must be >= 0 (0 = whole dev split)")
    need(cfg.eval.batch_size >= 1, "eval.batch-size must be >= 1")
    need(
        cfg.head.pooling in HEAD_POOLINGS,
        f"head.pooling '{cfg.head.pooling}' is unknown; choose one of: {', '.join(HEAD_POOLINGS)}",
    )
    need(cfg.head.init in HEAD_INITS, f"head.init '{cfg.head.init}' is unknown; choose one of: {', '.join(HEAD_INITS)}")
    z = cfg.zo
    need(z.distribution in ("rademacher", "gaussian"), "zo.distribution must be 'rademacher' or 'gaussian'")
    need(z.params in ZO_PARAMS, f"zo.params '{z.params}' is unknown; choose one of: {', '.join(ZO_PARAMS)}")
    if spec.replayed:
        replay = (
            f"{cfg.method} sends only scalars: every node rebuilds the model by replaying θ <- θ - η·g·z(seed) "
            "with the constant η = zo.lr of the update log"
        )
        need(
            t.optimizer in ("auto", "sgd"),
            f"train.optimizer '{t.optimizer}' breaks replay: {replay}, and an adaptive optimizer's state cannot "
            "be rebuilt from the scalars. Use train.optimizer = 'auto' (plain SGD for replayed methods)",
        )
        need(
            t.weight_decay == 0,
            f"train.weight-decay = {t.weight_decay} breaks replay: {replay}, so a decay applied outside "
            "the logged update would make the server's model and the clients' differ. Set train.weight-decay = 0",
        )
