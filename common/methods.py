"""The registry of federated methods: every method is registered once, here, and everything else reads it.

The ServerApp, the ClientApp, the run-config validation, the benchmark, the scripts and the tests ask this
module which methods exist and what each one needs. A method is a `MethodSpec` (common/methodspec.py): its name
(the `method` run-config value), the module of its client round, the function that builds its server model and
strategy, its run-config sections, the values its "auto" settings resolve to, and the few facts other code must
know about it (zero-order replay, whether nodes keep the global model, which records carry its numbers). Each
method's package, methods/<method>/, holds all of its code and declares its spec in its `__init__.py`; adding a
method is that one folder plus one `register_method(...)` line at the bottom of this file.

Import-light on purpose: nothing here, nor in a method's `__init__.py` and `config.py`, imports torch, Flower
or the methods' other code. Client modules and server setups are named as strings and imported only when a run
asks for them, so `common.config` can validate a configuration without loading any model code.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from common.methodspec import MethodError, MethodSpec

__all__ = ["METHODS", "ZERO_ORDER", "KEEPS_MODEL", "METHOD_DEFAULTS", "MethodError", "MethodSpec", "get_method",
           "known", "names", "register_method", "register_package", "sections", "specs", "where"]  # fmt: skip

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # a run-config value, a run-folder prefix and a CLI word


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
    for section, cls in spec.sections.items():
        shared = sections().get(section, cls)
        if shared is not cls:
            raise MethodError(
                f"method '{spec.name}': section '{section}' is {cls.__qualname__} here, {shared.__qualname__} "
                "in a method registered before: a section name belongs to one config class"
            )
    # a read-only copy: no caller can change a method's values after it was registered
    spec = dataclasses.replace(
        spec, defaults=MappingProxyType(dict(spec.defaults)), sections=MappingProxyType(dict(spec.sections))
    )
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


def sections() -> dict[str, type]:
    """Every registered method's config sections, section name -> class, in registration order."""
    return {name: cls for spec in _REGISTRY.values() for name, cls in spec.sections.items()}


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


def register_package(package: str) -> tuple[MethodSpec, ...]:
    """Register the methods a package of methods/ declares (its `SPECS`: one, or a method and its variants)."""
    return tuple(register_method(spec) for spec in importlib.import_module(f"methods.{package}").SPECS)


# The methods, one line each: each method's spec (its rates, its sections, its facts) is in its package's
# __init__.py, and FedTT's package declares FedTT+ beside it. Learning rates ("train.lr" = "auto") are Adam's
# rate of each first-order method, chosen by short single-client probes; the zero-order methods step with zo.lr
# and never read train.lr. The order of these lines is the order the benchmark plans its runs in and the tests
# parametrize in.
register_package("fedkrso")
register_package("fedavg")
register_package("fedspzo")
register_package("fedkseed")
register_package("fedtt")  # FedTT and FedTT+
register_package("fedavg_lora")

# The methods registered above, as constants for code that reads them once. Code that must also see a method
# registered later (by a plug-in, or a test) calls names(), get_method() or where() instead.
METHODS = names()
ZERO_ORDER = where(zero_order=True)
KEEPS_MODEL = where(keeps_model=True)
METHOD_DEFAULTS: Mapping[str, Mapping[str, float]] = MappingProxyType({s.name: s.defaults for s in specs()})
