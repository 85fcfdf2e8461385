"""The registry of methods (common/methods.py, filled by methods/__init__.py): every entry resolves to real code
and declares what the code reading it needs, and the run config, the apps and the benchmark accept exactly the
registered methods, a method registered later included (an eighth method added as docs/development.md says)."""

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
    assert tuple(m for m in METHODS if get_method(m).keeps_model) == tuple(methods.KEEPS_MODEL)
    assert set(where(replayed=True)) <= set(methods.KEEPS_MODEL)  # replay needs the model it replays onto
    assert {m: dict(t) for m, t in methods.METHOD_DEFAULTS.items()} == {
        m: dict(get_method(m).defaults) for m in METHODS
    }
    # the shipped facts, each meaning one thing
    assert where(optimizer="zero-order") == where(replayed=True) == ("fedspzo", "fedkseed")
    assert methods.KEEPS_MODEL == ("fedkrso", "fedspzo", "fedkseed")
    assert [m for m in METHODS if get_method(m).options.get("plus")] == ["fedtt-plus"]


def test_the_benchmark_plans_every_registered_method():
    from bench.plan import DEFAULT, NAMES, QUICK, plan_runs

    # the full plan measures each method where its claim is (main table, compute runs, alpha 0.1 runs)
    assert {r.method for r in plan_runs(DEFAULT)} == set(METHODS)
    main = [r.method for r in plan_runs(DEFAULT) if r.task == DEFAULT.tasks[0] and r.alpha == DEFAULT.alpha]
    assert main and set(main) <= set(METHODS)
    # the quick plan (the suite's end-to-end run) runs every method in the main table, in registration order
    quick = [r.method for r in plan_runs(QUICK) if r.task == QUICK.tasks[0] and r.alpha == QUICK.alpha]
    assert quick[: len(METHODS)] == list(METHODS)
    assert {m: get_method(m).label for m in METHODS} == NAMES


@pytest.fixture
def registry():
    """The registry, restored after the test: registrations made in the test do not outlive it."""
    before = methods.names()
    yield methods
    methods.unregister(*(m for m in methods.names() if m not in before))
    assert methods.names() == before


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
    assert "fedavg-copy" in METHODS  # a view of the registry: it sees methods registered later


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
    assert where(["fedkrso", "fedavg", "fedspzo"], optimizer="zero-order") == ("fedspzo",)


def test_the_registry_imports_no_method_code():
    # common.config imports the registry, and the config is parsed for every message and by tools that never
    # train: the registry (the mechanism) imports the standard library and common.methodspec only, nothing of
    # methods/ (the floor above it); methods/__init__.py lists the methods and imports their declarations (their
    # package's __init__.py and config.py) only, and names the rest of their code as strings
    tree = ast.parse(Path(methods.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level == 0}
    assert {m.split(".")[0] for m in imported} <= set(sys.stdlib_module_names) | {"__future__"} | {"common"}
    assert {m for m in imported if m.startswith("common")} == {"common.methodspec"}
    assert "import_module" not in Path(methods.__file__).read_text()  # it names no method's module either
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


def check_declarations(spec: MethodSpec) -> None:
    """What the code reading a method's spec needs from it, each refused with the method named when missing:
    what the hostile tests and the robust benchmark attack (tests/test_hostile.py, bench/robust.py: the reply
    record, what its floats are measured from and where the global ones are, the value bound), what every
    measure of the global model reads (all its tensors: FedTT's cores are in no state_dict) and README's row."""
    from common.config import parse_run_config

    cfg = parse_run_config({"method": spec.name})
    reference = spec.attack_references()  # MethodError when the method declares none
    assert spec.reply_record in reference, f"{spec.name}: attack_reference must name its reply record"
    bound = spec.load_value_bound()  # MethodError when the method declares none
    assert callable(spec.load_reference_values())  # MethodError when a record is "global" and none is declared
    assert callable(spec.load_global_model())  # MethodError when the method declares none
    for record in reference:
        value = bound(cfg, record)
        assert 0 < value < float("inf"), f"{spec.name}: value bound of '{record}' is {value}"
    if not (spec.summary and spec.travels):
        raise MethodError(f"method '{spec.name}' declares no summary or travels: README's table of methods needs both")


@pytest.mark.parametrize("method", METHODS)
def test_every_method_declares_what_the_hostile_tests_and_the_readme_need(method):
    check_declarations(get_method(method))


# An eighth method the way docs/development.md says: a package of its own (written here into a folder that
# `methods` reads packages from) and its registration line, and nothing else. It is zero-order SGD with full
# updates over FedAvg's wire: its client and server here are FedAvg's (the test runs no round), its facts are
# its own (zero-order, not replayed, nodes keep nothing), and its section brings keys of its own.
EIGHTH = {
    "__init__.py": """
from common.methodspec import MethodSpec
from methods.fedzosgd.config import ZoSgdConfig

SPEC = MethodSpec(
    name="fedzosgd", label="FedZO-SGD", defaults={"train.lr": 1e-4, "aggregation.rule": "trimmed-or-capped"},
    client_module=f"{__name__}.client", server_setup=f"{__name__}.server:setup", sections={"zosgd": ZoSgdConfig},
    optimizer="zero-order", attack_reference={"arrays": "global"}, value_bound="methods.fedavg.wire:value_bound",
    reference_values="methods.fedavg.wire:reference_values", global_model="common.modeling:model_tensors",
    summary="zero-order SGD, full updates", travels="all weights both ways",
)
SPECS = (SPEC,)
""",
    "config.py": '''
from dataclasses import dataclass
from typing import ClassVar

from common.methodspec import need


@dataclass(frozen=True)
class ZoSgdConfig:
    """Zero-order SGD with full updates."""

    estimates: int = 2  # two-sided estimates per local step
    MAXIMA: ClassVar[dict] = {"estimates": (1024, "estimates per step")}

    def validate(self, cfg, in_use: bool) -> None:
        need(self.estimates >= 1, "zosgd.estimates must be >= 1")
''',
    "client.py": "from methods.fedavg.client import train  # noqa: F401\n",
    "server.py": "from methods.fedavg.server import setup  # noqa: F401\n",
}


@pytest.fixture
def eighth_package(tmp_path, registry):
    """methods.fedzosgd, a folder of its own that `methods` finds, registered as methods/__init__.py would."""
    import methods as package

    folder = tmp_path / "fedzosgd"
    folder.mkdir()
    for name, text in EIGHTH.items():
        (folder / name).write_text(text)
    package.__path__.append(str(tmp_path))
    try:
        yield importlib.import_module("methods.fedzosgd")
    finally:
        package.__path__.remove(str(tmp_path))
        for name in [m for m in sys.modules if m == "methods.fedzosgd" or m.startswith("methods.fedzosgd.")]:
            del sys.modules[name]


def test_an_eighth_method_in_its_own_folder_is_accepted_everywhere(eighth_package):
    from bench.plan import NAMES, Settings, learning_rates, plan_runs
    from common.runmodel import head_settings
    from scripts.config_reference import methods_table, render

    before = parse_run_config({})
    assert not hasattr(before, "zosgd")
    (spec,) = methods.register_package(eighth_package)  # its one line in methods/__init__.py
    assert methods.names()[-1] == "fedzosgd" and METHODS[-1] == "fedzosgd"
    # the run config gains its section, validates it, and resolves "auto" to its values
    cfg = parse_run_config({"method": "fedzosgd", "zosgd.estimates": 3})
    assert cfg.zosgd.estimates == 3 and (cfg.train.lr, cfg.aggregation.rule) == (1e-4, "trimmed-or-capped")
    with pytest.raises(ConfigError, match="zosgd.estimates must be >= 1"):
        parse_run_config({"method": "fedzosgd", "zosgd.estimates": 0})
    with pytest.raises(ConfigError, match="zosgd.estimates = 5000 is too large"):
        parse_run_config({"method": "fedzosgd", "zosgd.estimates": 5000})
    # its facts, read by central code: zero-order (a new head starts from the label words), but not replayed (it
    # sends full updates, so weight decay and Adam are its own business)
    assert head_settings(dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, pooling="mean"))) == (
        "mean",
        "label-words",
    )
    assert parse_run_config({"method": "fedzosgd", "train.weight-decay": 0.01, "train.optimizer": "adam"})
    assert "fedzosgd" not in methods.KEEPS_MODEL and "fedzosgd" not in where(replayed=True)
    # the benchmark plans it in the main table, names it, and leaves its unread train.lr out of the rate table
    plan = plan_runs(Settings())
    assert {r.method for r in plan} == set(METHODS)
    assert [r.name for r in plan if r.method == "fedzosgd"][0] == "sst2-a0.5-s0-fedzosgd"
    assert NAMES["fedzosgd"] == "FedZO-SGD" and "fedzosgd" not in learning_rates()
    # the hostile tests' and README's declarations, the configuration page and README's table
    check_declarations(spec)
    assert "| `zosgd.estimates` | int | `2` |" in render()
    assert methods_table()[-1] == "| `fedzosgd` — FedZO-SGD, zero-order SGD, full updates | all weights both ways |"
    assert spec.load_client().train is get_method("fedavg").load_client().train  # FedAvg's round, reused


def test_an_eighth_method_that_leaves_a_declaration_out_fails_the_named_test(eighth_package):
    """test_every_method_declares_what_the_hostile_tests_and_the_readme_need fails for a method without them."""
    (spec,) = eighth_package.SPECS
    for left_out, message in (
        ("attack_reference", "declares no attack_reference"),
        ("value_bound", "declares no value_bound"),
        ("reference_values", "declares no reference_values"),
        ("global_model", "declares no global_model"),
        ("travels", "declares no summary or travels"),
    ):
        bare = methods.register_method(dataclasses.replace(spec, **{left_out: None if left_out != "travels" else ""}))
        with pytest.raises(MethodError, match=f"method 'fedzosgd' {message}"):
            check_declarations(bare)
        methods.unregister("fedzosgd")
