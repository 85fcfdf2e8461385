"""The registry of federated methods: the mechanism only. Which methods exist is said above it, in
methods/__init__.py, one `register_package(...)` line each (as peft's tuners/__init__.py lists its tuners).

The ServerApp, the ClientApp, the run-config validation, the benchmark, the scripts and the tests ask this
module which methods exist and what each one needs; whoever needs the registry filled imports `methods` first
(the apps, the scripts, the benchmark and tests/conftest.py do). A method is a `MethodSpec`
(common/methodspec.py): its name (the `method` run-config value), the module of its client round, the function
that builds its server model and strategy, its run-config sections, the values its "auto" settings resolve to,
and the facts other code reads about it (its optimizer family, replay, whether nodes keep the model, where its
numbers travel, what an attack on it is measured against).

This module imports nothing of methods/ (common is the floor methods/ stands on): every view here (METHODS,
KEEPS_MODEL, METHOD_DEFAULTS, LABELS) reads the registry when it is read, so it sees a method registered
later, and `version()` tells caches built from the registry (common.config's RunConfig) when to rebuild.
Import-light on purpose: client modules and server setups are named as strings and imported only when a run
asks for them, so `common.config` can validate a configuration without loading any model code.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import MappingProxyType, ModuleType
from typing import Any

from common.methodspec import AUTO_KEYS, OPTIMIZER_FAMILIES, REFERENCES, MethodError, MethodSpec

__all__ = ["KEEPS_MODEL", "LABELS", "METHODS", "METHOD_DEFAULTS", "MethodError", "MethodSpec", "get_method",
           "known", "names", "register_method", "register_package", "sections", "specs", "unregister",
           "version", "where"]  # fmt: skip

NAME = re.compile(r"[a-z][a-z0-9]*(-[a-z0-9]+)*")  # a run-config value, a run-folder prefix and a CLI word


# name -> spec, in registration order: the order the benchmark plans its runs in and the tests parametrize in
_REGISTRY: dict[str, MethodSpec] = {}
_VERSION = [0]  # bumped by every change of _REGISTRY


def version() -> int:
    """A number that changes whenever a method is registered or removed (for caches of registry-built things)."""
    return _VERSION[0]


def _refuse(spec: MethodSpec) -> None:
    if not NAME.fullmatch(spec.name):
        raise MethodError(f"method name '{spec.name}' must be lowercase letters and digits, words joined by '-'")
    if spec.name in _REGISTRY:
        raise MethodError(f"method '{spec.name}' is registered already")
    if not spec.client_module or ":" in spec.client_module:
        raise MethodError(f"method '{spec.name}': client_module must be a module path, got '{spec.client_module}'")
    optional = ("value_bound", "reference_values", "global_model")  # left out: refused by the code that reads it
    for what in ("server_setup", *optional):
        where = getattr(spec, what)
        if where is None and what in optional:
            continue
        module, sep, function = where.partition(":")
        if not (module and sep and function):
            raise MethodError(f"method '{spec.name}': {what} must be 'module:function', got '{where}'")
    if set(spec.defaults) != set(AUTO_KEYS):
        raise MethodError(
            f"method '{spec.name}' sets defaults for {sorted(spec.defaults)}; every method sets {sorted(AUTO_KEYS)}"
        )
    for key, value in spec.defaults.items():
        kind = AUTO_KEYS[key]
        if not isinstance(value, kind) and not (kind is float and type(value) is int):
            raise MethodError(f"method '{spec.name}': its '{key}' must be a {kind.__name__}, got {value!r}")
    if spec.optimizer not in OPTIMIZER_FAMILIES:
        raise MethodError(
            f"method '{spec.name}': optimizer '{spec.optimizer}' is none of {', '.join(OPTIMIZER_FAMILIES)}"
        )
    if spec.replayed and not spec.keeps_model:
        raise MethodError(
            f"method '{spec.name}' is replayed but keeps no model: replay needs the model it replays onto"
        )
    if spec.attack_reference is not None:
        wrong = {r: v for r, v in spec.attack_reference.items() if v not in REFERENCES}
        if wrong or spec.reply_record not in spec.attack_reference:
            raise MethodError(
                f"method '{spec.name}': attack_reference must map its reply record '{spec.reply_record}' (and any "
                f"other reply record of floats) to one of {', '.join(REFERENCES)}, got {dict(spec.attack_reference)}"
            )
    for section, cls in spec.sections.items():
        shared = sections().get(section, cls)
        if shared is not cls:
            raise MethodError(
                f"method '{spec.name}': section '{section}' is {cls.__qualname__} here, {shared.__qualname__} "
                "in a method registered before: a section name belongs to one config class"
            )


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add a method; refuses a second method of the same name and entries that could not run."""
    _refuse(spec)
    # a read-only copy: no caller can change a method's values after it was registered
    frozen = {k: MappingProxyType(dict(getattr(spec, k))) for k in ("defaults", "sections", "options")}
    if spec.attack_reference is not None:
        frozen["attack_reference"] = MappingProxyType(dict(spec.attack_reference))
    spec = dataclasses.replace(spec, **frozen)
    _REGISTRY[spec.name] = spec
    _VERSION[0] += 1
    return spec


def register_package(package: ModuleType) -> tuple[MethodSpec, ...]:
    """Register the methods a package of methods/ declares (its `SPECS`: one, or a method and its variants)."""
    specs_ = getattr(package, "SPECS", None)
    if not specs_:
        raise MethodError(f"package '{package.__name__}' declares no SPECS (a tuple of its MethodSpecs)")
    return tuple(register_method(spec) for spec in specs_)


def unregister(*chosen: str) -> None:
    """Remove registered methods (a test's temporary method, once the test is done)."""
    for name in known(*chosen):
        del _REGISTRY[name]
    _VERSION[0] += 1


def get_method(name: str) -> MethodSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        if not _REGISTRY:
            raise MethodError(
                f"method '{name}' is unknown: no method is registered; import `methods` first (methods/__init__.py "
                "registers them)"
            ) from None
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
    """The registered methods (or those of `methods`) whose spec has these values, e.g. where(replayed=True)."""
    pool = names() if methods is None else known(*methods)
    return tuple(m for m in pool if all(getattr(_REGISTRY[m], k) == v for k, v in facts.items()))


class Where(Sequence[str]):
    """The registered methods with these facts, read when it is read (a method registered later included)."""

    def __init__(self, **facts: Any) -> None:
        self.facts = facts

    def _now(self) -> tuple[str, ...]:
        return where(**self.facts)

    def __getitem__(self, i):  # type: ignore[override]
        return self._now()[i]

    def __len__(self) -> int:
        return len(self._now())

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._now())


class _Of(Mapping[str, Any]):
    """method -> one value of its spec, read when it is read."""

    def __init__(self, attr: str) -> None:
        self.attr = attr

    def __getitem__(self, name: str) -> Any:
        if name not in _REGISTRY:
            raise KeyError(name)
        return getattr(_REGISTRY[name], self.attr)

    def __iter__(self) -> Iterator[str]:
        return iter(names())

    def __len__(self) -> int:
        return len(_REGISTRY)


METHODS = Where()  # every registered method, in registration order
KEEPS_MODEL = Where(keeps_model=True)
METHOD_DEFAULTS: Mapping[str, Mapping[str, float | str]] = _Of("defaults")
LABELS: Mapping[str, str] = _Of("label")  # as the papers and the benchmark page write them
