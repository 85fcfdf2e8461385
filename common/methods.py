"""The registry of federated methods: every method is registered once, here, and everything else reads it.

The ServerApp, the ClientApp, the run-config validation, the benchmark, the scripts and the tests ask this
module which methods exist and what each one needs. A method is a `MethodSpec`: its name (the `method` run-config
value), the module of its client round, the function that builds its server model and strategy, the values its
"auto" settings resolve to, and the few facts other code must know about it (zero-order replay, whether nodes
keep the global model, which records carry its numbers). Adding a method is its own code plus one
`register_method(MethodSpec(...))` line at the bottom of this file.

Import-light on purpose: nothing here imports torch, Flower or the methods' code. Client modules and server
setups are named as strings and imported only when a run asks for them, so `common.config` can validate a
configuration without loading any model code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # a run-config value, a run-folder prefix and a CLI word


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the `method` run-config value
    label: str  # as the papers and the benchmark page write it
    # module holding `train(content, cfg, node_config, run_id, node_id) -> RecordDict`: the node's round
    client_module: str
    # "module:function" of `setup(cfg, recorder) -> server_app.base.ServerSetup`: the server's model and strategy
    server_setup: str
    # Values of the settings whose shipped value is "auto" (common.config.AUTO_KEYS); every method sets the
    # same keys, so a key is "auto" for all methods or for none.
    defaults: Mapping[str, float] = field(default_factory=dict, hash=False)
    # Forward passes only: replies are (seed, scalar) pairs every node replays with the constant η = zo.lr,
    # so the configuration must not hold anything replay cannot rebuild (an adaptive optimizer, weight decay).
    zero_order: bool = False
    # Nodes keep the global model on disk and catch up on missed rounds by replaying the server's update log;
    # the other methods send the trained numbers down every round and nodes keep nothing between rounds.
    keeps_model: bool = False
    # Where the method's numbers travel, for the code that forges messages to check that nodes and server refuse
    # them (tests/test_hostile.py, tests/test_instructions.py, bench/robust.py): the instruction's record holding
    # model numbers or update-log scalars, and the reply's record holding the node's update.
    instruction_record: str = "arrays"
    reply_record: str = "arrays"

    def load_client(self) -> ModuleType:
        """The client module, imported now (the first run that uses the method pays for its imports)."""
        try:
            return importlib.import_module(self.client_module)
        except ImportError as exc:
            raise MethodError(
                f"method '{self.name}': client module '{self.client_module}' cannot be imported ({exc})"
            ) from exc

    def load_server(self) -> Callable[..., Any]:
        """The server setup function, imported now."""
        module_name, _, function = self.server_setup.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MethodError(
                f"method '{self.name}': server module '{module_name}' cannot be imported ({exc})"
            ) from exc
        setup = getattr(module, function, None)
        if not callable(setup):
            raise MethodError(f"method '{self.name}': '{self.server_setup}' names no function of {module_name}")
        return setup


class MethodError(ValueError):
    """A method that cannot be registered, or whose registered code cannot be found."""


# name -> spec, in registration order: the order the benchmark plans its runs in and the tests parametrize in
_REGISTRY: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; refuses a second method of the same name and entries that could not run."""
    if not NAME.fullmatch(spec.name):
        raise MethodError(f"method name '{spec.name}' must be lowercase letters and digits, words joined by '-'")
    if spec.name in _REGISTRY:
        raise MethodError(f"method '{spec.name}' is registered already")
    if not spec.client_module or ":" in spec.client_module:
        raise MethodError(f"method '{spec.name}': client_module must be a module path, got '{spec.client_module}'")
    module, sep, function = spec.server_setup.partition(":")
    if not (module and sep and function):
        raise MethodError(f"method '{spec.name}': server_setup must be 'module:function', got '{spec.server_setup}'")
    if _REGISTRY:
        keys = set(next(iter(_REGISTRY.values())).defaults)
        if set(spec.defaults) != keys:
            raise MethodError(
                f"method '{spec.name}' sets defaults for {sorted(spec.defaults)}; every method sets {sorted(keys)}"
            )
    # a read-only copy: no caller can change a method's values after it was registered
    spec = dataclasses.replace(spec, defaults=MappingProxyType(dict(spec.defaults)))
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise MethodError(f"method '{name}' is unknown; choose one of: {', '.join(_REGISTRY)}") from None


def names() -> tuple[str, ...]:
    """Every registered method, in registration order (read at call time: sees methods registered later)."""
    return tuple(_REGISTRY)


def specs() -> tuple[MethodSpec, ...]:
    return tuple(_REGISTRY.values())


def known(*chosen: str) -> tuple[str, ...]:
    """`chosen`, each checked against the registry: for code that deliberately picks some methods (a test that
    runs a fault on one method, a benchmark section for two), so that a renamed method fails loudly there."""
    for name in chosen:
        get_method(name)
    return chosen


def where(methods: Iterable[str] | None = None, **facts: Any) -> tuple[str, ...]:
    """The registered methods (or those of `methods`) whose spec has these values, e.g. where(zero_order=True)."""
    pool = names() if methods is None else known(*methods)
    return tuple(m for m in pool if all(getattr(_REGISTRY[m], k) == v for k, v in facts.items()))


# The methods. Learning rates ("train.lr" = "auto"): Adam's rate of each first-order method, chosen by short
# single-client probes. FedKRSO trains in rank-r random subspaces and needs a larger step than full fine-tuning
# (FedAvg); the small adapters of FedTT and FedAvg-LoRA need larger steps still. The zero-order methods step with
# zo.lr (replayed from the update log) and never read train.lr; it resolves to the value it had before "auto"
# existed, so their earlier records and checkpoints still match.
register_method(MethodSpec(
    name="fedkrso", label="FedKRSO", defaults={"train.lr": 5e-4},
    client_module="methods.fedkrso.client", server_setup="methods.fedkrso.server:setup",
    keeps_model=True, instruction_record="log", reply_record="accumulators",
))  # fmt: skip
register_method(MethodSpec(
    name="fedavg", label="FedAvg", defaults={"train.lr": 5e-5},
    client_module="methods.fedavg.client", server_setup="methods.fedavg.server:setup",
))  # fmt: skip
register_method(MethodSpec(
    name="fedspzo", label="FedSPZO", defaults={"train.lr": 5e-5},
    client_module="methods.fedspzo.client", server_setup="methods.fedspzo.server:setup",
    zero_order=True, keeps_model=True, instruction_record="log", reply_record="scalars",
))  # fmt: skip
register_method(MethodSpec(
    name="fedkseed", label="FedKSeed", defaults={"train.lr": 5e-5},
    client_module="methods.fedkseed.client", server_setup="methods.fedkseed.server:setup",
    zero_order=True, keeps_model=True, instruction_record="log", reply_record="scalars",
))  # fmt: skip
register_method(MethodSpec(
    name="fedtt", label="FedTT", defaults={"train.lr": 1e-2},
    client_module="methods.fedtt.client", server_setup="methods.fedtt.server:setup",
    instruction_record="cores", reply_record="cores",
))  # fmt: skip
register_method(MethodSpec(  # FedTT training part of the cores per round: its setup reads the method's name
    name="fedtt-plus", label="FedTT+", defaults={"train.lr": 1e-2},
    client_module="methods.fedtt.client", server_setup="methods.fedtt.server:setup",
    instruction_record="cores", reply_record="cores",
))  # fmt: skip
register_method(MethodSpec(
    name="fedavg-lora", label="FedAvg-LoRA", defaults={"train.lr": 2e-3},
    client_module="methods.fedavg_lora.client", server_setup="methods.fedavg_lora.server:setup",
))  # fmt: skip

# The methods registered above, as constants for code that reads them once. Code that must also see a method
# registered later (by a plug-in, or a test) calls names(), get_method() or where() instead.
METHODS = names()
ZERO_ORDER = where(zero_order=True)
KEEPS_MODEL = where(keeps_model=True)
METHOD_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType({s.name: s.defaults for s in specs()})
