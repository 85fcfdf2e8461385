"""Run-config validation: every impossible setting stops the run with a message that says what to fix."""

from __future__ import annotations

import math
import re
import tomllib

import pytest

from common.config import (
    AUTO_KEYS,
    ConfigError,
    RunConfig,
    check_resume,
    parse_run_config,
)
from common.methods import METHOD_DEFAULTS, METHODS, Where
from common.modeling import ModelError, resolve

pytestmark = pytest.mark.unit


def test_defaults_match_pyproject():
    from flwr.common.config import flatten_dict

    with open("pyproject.toml", "rb") as f:
        flat = flatten_dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])
    assert flat == RunConfig().to_flat()  # the dataclass defaults and the shipped config are one and the same
    assert parse_run_config(flat) == parse_run_config({})


def test_types_are_coerced_and_checked():
    cfg = parse_run_config({"train.lr": 1, "krso.rank": 4.0, "method": "fedavg"})
    assert cfg.train.lr == 1.0 and isinstance(cfg.krso.rank, int) and cfg.method == "fedavg"
    with pytest.raises(ConfigError, match="krso.rank.*must be int"):
        parse_run_config({"krso.rank": "eight"})
    with pytest.raises(ConfigError, match="krso.rank.*must be int"):
        parse_run_config({"krso.rank": 2.5})


def test_every_method_has_its_own_defaults():
    assert set(METHOD_DEFAULTS) == set(METHODS)
    assert all(set(table) == set(AUTO_KEYS) for table in METHOD_DEFAULTS.values())
    assert RunConfig().to_flat()["train.lr"] == "auto"


@pytest.mark.parametrize("method", METHODS)
def test_auto_resolves_to_the_methods_own_rate(method):
    cfg = parse_run_config({"method": method})
    assert isinstance(cfg.train.lr, float) and math.isfinite(cfg.train.lr) and cfg.train.lr > 0
    assert cfg.train.lr == METHOD_DEFAULTS[method]["train.lr"]
    assert parse_run_config({"method": method, "train.lr": "auto"}) == cfg
    assert cfg.to_flat()["train.lr"] == cfg.train.lr  # the records say which rate the run used


def test_auto_rates_are_the_benchmarks():
    # the benchmark's tuned rates: FedKRSO's is what `make run` used to pass by hand
    assert parse_run_config({}).train.lr == 5e-4
    rates = {m: parse_run_config({"method": m}).train.lr for m in ("fedavg", "fedtt", "fedtt-plus", "fedavg-lora")}
    assert rates == {"fedavg": 5e-5, "fedtt": 1e-2, "fedtt-plus": 1e-2, "fedavg-lora": 2e-3}


def test_a_number_overrides_auto():
    assert parse_run_config({"method": "fedtt", "train.lr": 3e-3}).train.lr == 3e-3
    assert parse_run_config({"train.lr": 1}).train.lr == 1.0


@pytest.mark.parametrize("value", ["fast", "Auto", "", True, [1e-3]])
def test_other_lr_values_are_refused_naming_the_key(value):
    with pytest.raises(ConfigError, match=r"run config 'train.lr' must be a number or \"auto\".*fedkrso 0.0005"):
        parse_run_config({"train.lr": value})


def test_resume_compares_resolved_rates(tmp_path):
    explicit = parse_run_config({"method": "fedtt", "train.lr": 1e-2, "resume-from": str(tmp_path)})
    auto = parse_run_config({"method": "fedtt", "resume-from": str(tmp_path)})
    check_resume(auto, explicit.to_flat(), done=1)  # a checkpoint made with the auto value spelled out
    check_resume(explicit, auto.to_flat(), done=1)
    other = parse_run_config({"method": "fedtt", "train.lr": 5e-3}).to_flat()
    with pytest.raises(ConfigError, match=r"train.lr = 0.005 there, 0.01 here"):
        check_resume(auto, other, done=1)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"method": "fedsgd"}, "method 'fedsgd' is unknown; choose one of: fedkrso, fedavg, fedspzo, fedkseed"),
        ({"task": "mnli"}, "task 'mnli' is unknown"),
        ({"krso.k": 0}, "krso.k"),
        ({"krso.rank": 0}, "krso.rank must be >= 1"),
        ({"dirichlet-alpha": 0.0}, "dirichlet-alpha must be > 0"),
        ({"dirichlet-alpha": float("inf")}, "dirichlet-alpha must be > 0 and finite"),
        ({"round-timeout": float("inf")}, "round-timeout must be a finite number"),
        ({"dirichlet-alpha": -1}, "dirichlet-alpha must be > 0"),
        ({"partitioning": "shards"}, "partitioning 'shards' is unknown"),
        ({"num-server-rounds": 0}, "num-server-rounds"),
        ({"train.lr": 0}, "train.lr must be in (0, 1], got 0.0"),
        ({"train.optimizer": "lion"}, "train.optimizer"),
        ({"train.local-steps": 10, "krso.intervals": 4}, "multiple of krso.intervals"),
        ({"fraction-train": 1.5}, "fraction-train"),
        ({"run-name": "../escape"}, "run-name '../escape' may only contain letters, digits, '.', '_' and '-' (no '/')"),
        ({"run-name": ".."}, "run-name '..' names results-dir itself or its parent"),
        ({"run-name": "."}, "run-name '.' names results-dir itself"),
        ({"run-name": "a" * 300}, "run-name is 300 bytes long; a file name holds at most 255: shorten it"),
        ({"krso.ranks": 8}, "unknown run-config key"),
    ],
)
def test_impossible_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        parse_run_config(overrides)


def test_fedavg_does_not_need_krso_divisibility():
    assert parse_run_config({"method": "fedavg", "train.local-steps": 10, "krso.intervals": 4}).train.local_steps == 10


def test_model_settings(tmp_path):
    path, gguf = resolve("")
    assert gguf is None and path.endswith("model")
    with pytest.raises(ModelError, match="no such folder"):
        resolve(str(tmp_path / "missing-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="without config.json"):
        resolve(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve(str(tmp_path / "x.gguf"))
    assert resolve("HuggingFaceTB/SmolLM2-135M") == ("HuggingFaceTB/SmolLM2-135M", None)


REPLAYED = Where(replayed=True)


@pytest.mark.parametrize("method", REPLAYED)
def test_replayed_methods_refuse_what_breaks_replay(method):
    assert parse_run_config({"method": method}).train.optimizer == "auto"  # plain SGD for replayed methods
    assert parse_run_config({"method": method, "train.optimizer": "sgd"}).method == method
    with pytest.raises(ConfigError, match="train.optimizer 'adam' breaks replay.*constant η = zo.lr"):
        parse_run_config({"method": method, "train.optimizer": "adam"})
    with pytest.raises(ConfigError, match="train.weight-decay = 0.01 breaks replay"):
        parse_run_config({"method": method, "train.weight-decay": 0.01})
    # Methods that are not replayed keep their optimizer state locally: Adam and weight decay are theirs to use.
    for other in Where(replayed=False):
        assert parse_run_config({"method": other, "train.optimizer": "adam", "train.weight-decay": 0.01})


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        ({"zo.lr": 0}, r"zo.lr must be in \(0, 1\]"),
        ({"zo.eps": -1e-3}, r"zo.eps must be in \(0, 0.1\]"),
        ({"zo.distribution": "uniform"}, "zo.distribution must be"),
        ({"spzo.p2": 0}, "spzo.p1 must be >= 0 and spzo.p2 >= 1"),
        ({"spzo.p1": -1}, "spzo.p1 must be >= 0"),
        ({"spzo.split-layer": 0}, "spzo.split-layer must not be 0"),
        ({"kseed.k": 0}, "kseed.k"),
        ({"kseed.perturbations": 0}, "kseed.perturbations must be >= 1"),
    ],
)
def test_impossible_zero_order_settings_are_refused(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        parse_run_config({"method": "fedspzo", **overrides})


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "key, bad, good",
    [
        ("train.lr", [INF, NAN, -1e-4, 2.0], [1e-6, 5e-5, 1.0]),
        ("train.weight-decay", [INF, NAN, -0.1, 1.5], [0.0, 0.01, 1.0]),
        ("zo.lr", [INF, NAN, 5.0, 1.0000001, 0.0], [1e-7, 0.02, 1.0]),
        ("zo.eps", [INF, NAN, 0.0, 0.5], [1e-5, 1e-3, 0.1]),
        ("tt.scale", [INF, NAN, 0.0, -1.0, 1e3], [0.1, 1.0, 100.0]),
        ("lora.alpha", [INF, NAN, 0.0, 1e6], [1.0, 16.0, 1024.0]),
    ],
)
def test_every_rate_scale_and_eps_is_finite_and_in_its_stated_range(key, bad, good):
    """A hostile or mistyped value among honest ones: the honest ones pass, each bad one is refused with the key,
    the range and the fix, for every method (the check does not depend on the method)."""
    for method in METHODS:
        extra = {"train.optimizer": "sgd"} if key == "train.weight-decay" else {}
        for value in good:
            if key == "train.weight-decay" and value and method in REPLAYED:
                continue  # replay refuses any decay (test_replayed_methods_refuse_what_breaks_replay)
            parse_run_config({"method": method, key: value, **extra})
        for value in bad:
            with pytest.raises(ConfigError, match=rf"{key} must be in [(\[].*got .*set it in that range"):
                parse_run_config({"method": method, key: value, **extra})


def test_the_configuration_page_states_every_range():
    from common.configchecks import _interval, ranges
    from common.wire import ZO_LR_MAX

    with open("docs/configuration.md") as f:  # generated from the config classes (scripts/config_reference.py)
        rows = {line.split("|")[1].strip(): line for line in f if line.startswith("| `")}
    for key, (low, high, low_included, _) in ranges().items():
        assert f"In {_interval(low, high, low_included)}." in rows[f"`{key}`"], key
    assert ranges()["zo.lr"][1] == ZO_LR_MAX  # what every node accepts


def test_paths_that_cannot_hold_the_records_are_refused(tmp_path):
    from common.config import check_paths

    check_paths(parse_run_config({"results-dir": str(tmp_path / "new" / "results"), "run-name": "fine"}))
    (tmp_path / "file").write_text("x")
    for results_dir in (tmp_path / "file", tmp_path / "file" / "below"):
        with pytest.raises(ConfigError, match=r"results-dir .* is a file, not a folder: point results-dir at a folder"):
            check_paths(parse_run_config({"results-dir": str(results_dir), "run-name": "r"}))
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "taken").write_text("x")
    with pytest.raises(ConfigError, match="run-name 'taken': .* is a file, not a folder: choose another run-name"):
        check_paths(parse_run_config({"results-dir": str(tmp_path / "results"), "run-name": "taken"}))


def test_every_count_size_and_timeout_is_bounded_before_anything_starts():
    from common.configchecks import maxima

    MAXIMA = maxima()

    flat = parse_run_config({}).to_flat()
    assert {k for k, v in flat.items() if isinstance(v, int) and not isinstance(v, bool)} <= set(MAXIMA)
    for key, (high, _) in MAXIMA.items():
        for value in (high * 10, 1e308):
            value = int(value) if isinstance(flat[key], int) else value
            with pytest.raises(
                ConfigError, match=f"{re.escape(key)} = .* is too large: at most {re.escape(f'{high:g}')}"
            ):
                parse_run_config({key: value})
