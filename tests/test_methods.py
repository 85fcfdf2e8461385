"""The registry of methods (common/methods.py): every entry resolves to real code, and the run config, the apps
and the benchmark accept exactly the registered methods, a method registered later included."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import sys
from pathlib import Path

import pytest

from common import methods
from common.config import AUTO_KEYS, ConfigError, parse_run_config
from common.methods import METHODS, MethodError, MethodSpec, get_method, known, register_method, where

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("method", METHODS)
def test_every_method_has_a_server_setup_and_a_client_that_resolve(method):
    spec = get_method(method)
    assert callable(spec.load_server())
    assert callable(spec.load_client().train)  # what the ClientApp calls: train(content, cfg, node_config, ...)
    assert spec.label and set(spec.defaults) == set(AUTO_KEYS)


def test_the_config_accepts_exactly_the_registered_methods():
    assert methods.names() == METHODS and len(set(METHODS)) == len(METHODS)
    for method in METHODS:
        assert parse_run_config({"method": method}).method == method
    with pytest.raises(ConfigError, match=f"method 'fedsgd' is unknown; choose one of: {', '.join(METHODS)}$"):
        parse_run_config({"method": "fedsgd"})


def test_derived_lists_are_the_registry_facts():
    assert tuple(m for m in METHODS if get_method(m).zero_order) == methods.ZERO_ORDER
    assert tuple(m for m in METHODS if get_method(m).keeps_model) == methods.KEEPS_MODEL
    assert set(methods.ZERO_ORDER) <= set(methods.KEEPS_MODEL)  # replay needs the model it replays onto
    assert {m: dict(t) for m, t in methods.METHOD_DEFAULTS.items()} == {
        m: dict(get_method(m).defaults) for m in METHODS
    }


def test_the_benchmark_plans_every_registered_method():
    from bench.run import DEFAULT, NAMES, QUICK, plan_runs

    # the full plan measures each method where its claim is (main table, compute runs, alpha 0.1 runs)
    assert {r.method for r in plan_runs(DEFAULT)} == set(METHODS)
    main = [r.method for r in plan_runs(DEFAULT) if r.task == DEFAULT.tasks[0] and r.alpha == DEFAULT.alpha]
    assert main and set(main) <= set(METHODS)
    # the quick plan (the suite's end-to-end run) runs every method in the main table, in registration order
    quick = [r.method for r in plan_runs(QUICK) if r.task == QUICK.tasks[0] and r.alpha == QUICK.alpha]
    assert quick[: len(METHODS)] == list(METHODS)
    assert {m: get_method(m).label for m in METHODS} == NAMES


@pytest.fixture
def registry(monkeypatch):
    """The registry, restored after the test: registrations made in the test do not outlive it."""
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    return methods


def eighth(**changes) -> MethodSpec:
    """A new method that reuses FedAvg's client and server: what registering an eighth method takes."""
    return dataclasses.replace(get_method("fedavg"), **{"name": "fedavg-copy", "label": "FedAvg copy", **changes})


def test_a_method_registered_later_is_accepted_everywhere(registry):
    spec = register_method(eighth(defaults={"train.lr": 1e-4, "aggregation.rule": "median"}))
    assert registry.names()[-1] == "fedavg-copy" and get_method("fedavg-copy") is spec
    cfg = parse_run_config({"method": "fedavg-copy"})
    assert (cfg.train.lr, cfg.aggregation.rule) == (1e-4, "median")  # "auto" resolves to its own values
    assert spec.load_server() is get_method("fedavg").load_server()
    assert spec.load_client() is get_method("fedavg").load_client()
    assert "fedavg-copy" not in METHODS  # the constant is the shipped registrations; names() sees later ones


def test_registration_refuses_what_could_not_run(registry):
    with pytest.raises(MethodError, match="'fedavg' is registered already"):
        register_method(get_method("fedavg"))
    with pytest.raises(MethodError, match="lowercase"):
        register_method(eighth(name="FedAvg_Copy"))
    with pytest.raises(MethodError, match="server_setup must be 'module:function'"):
        register_method(eighth(server_setup="methods.fedavg.server.setup"))
    with pytest.raises(MethodError, match="client_module must be a module path"):
        register_method(eighth(client_module="methods.fedavg.client:train"))
    with pytest.raises(
        MethodError, match=r"sets defaults for \[\]; every method sets \['aggregation.rule', 'train.lr'\]"
    ):
        register_method(eighth(defaults={}))
    assert "fedavg-copy" not in registry.names()


def test_entries_that_name_missing_code_fail_with_the_method_named(registry):
    spec = register_method(eighth(server_setup="methods.fedavg.server:nothing", client_module="methods.nothing"))
    with pytest.raises(MethodError, match="method 'fedavg-copy': 'methods.fedavg.server:nothing' names no function"):
        spec.load_server()
    with pytest.raises(MethodError, match="method 'fedavg-copy': client module 'methods.nothing' cannot be imported"):
        spec.load_client()


def test_picked_subsets_are_checked_against_the_registry():
    assert known("fedkrso", "fedtt") == ("fedkrso", "fedtt")
    with pytest.raises(MethodError, match="method 'fedkrsso' is unknown; choose one of: fedkrso"):
        known("fedkrsso")
    assert where(["fedkrso", "fedavg", "fedspzo"], zero_order=True) == ("fedspzo",)


def test_the_registry_imports_no_method_code():
    # common.config imports the registry, and the config is parsed for every message and by tools that never
    # train: the registry imports the standard library and the methods' declarations (their package's
    # __init__.py and config.py) only, and names the rest of their code as strings
    tree = ast.parse(Path(methods.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert {m.split(".")[0] for m in imported} <= set(sys.stdlib_module_names) | {"__future__"} | {"common"}
    assert {m for m in imported if m.startswith("common")} == {"common.methodspec"}
    for package in {spec.client_module.rsplit(".", 1)[0] for spec in methods.specs()}:
        for part in ("__init__", "config"):
            path = Path(methods.__file__).parent.parent / package.replace(".", "/") / f"{part}.py"
            if not path.exists():
                continue
            body = ast.parse(path.read_text()).body  # top level: imports under `if TYPE_CHECKING` do not run
            found = {a.name for n in body if isinstance(n, ast.Import) for a in n.names}
            found |= {n.module for n in body if isinstance(n, ast.ImportFrom)}
            light = set(sys.stdlib_module_names) | {"__future__"}
            assert {m for m in found if m.split(".")[0] not in light} <= {"common.methodspec", f"{package}.config"}


def test_each_method_lives_in_one_package():
    # each method's client, server and config are in methods/<package>/, which declares its spec
    for spec in methods.specs():
        package = spec.client_module.rsplit(".", 1)[0]
        assert spec.client_module == f"{package}.client" and spec.server_setup == f"{package}.server:setup"
        assert all(cls.__module__ == f"{package}.config" for cls in spec.sections.values())
        assert spec in importlib.import_module(package).SPECS
