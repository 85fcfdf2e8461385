"""What a method declares about itself (its `MethodSpec`), and the errors its declaration and its config raise.

Each method's package (methods/<method>/__init__.py) builds its MethodSpec from this module, and
methods/__init__.py registers it with the mechanism of common/methods.py. Kept apart from the registry, and
import-light (the standard library only), so that a method's package and its config section can be imported on
their own, before or after the registry, without an import cycle.

Each fact of a spec means one thing, and central code reads the fact, never the method's name: `optimizer`
(how the method steps: the defaults of train.optimizer, head.init and zo.lr follow it), `replayed` (the run's
model is rebuilt from the replies' seeds and scalars, so the config must hold nothing replay cannot rebuild),
`keeps_model` (nodes keep the model between rounds), `options` (what tells a variant from its base, read by
the method's own code), what the code that measures "the global model" reads (`global_model`: every trained
tensor, adapters on hooks included) and what the code that forges replies needs (`attack_reference`,
`reference_values`, `value_bound`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType, ModuleType
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot work; the message says which key to change and how."""


def need(ok: bool, message: str) -> None:
    """Refuse a configuration: raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


class MethodError(ValueError):
    """A method that cannot be registered, or whose registered code cannot be found."""


# The settings whose shipped value is "auto", each resolved to the running method's own value
# (MethodSpec.defaults): key -> the type of that value. Every method sets every key (register_method checks).
AUTO_KEYS: Mapping[str, type] = MappingProxyType({"train.lr": float, "aggregation.rule": str})
FIRST_ORDER, ZERO_ORDER = "first-order", "zero-order"
OPTIMIZER_FAMILIES = (FIRST_ORDER, ZERO_ORDER)
# What an attacker's floats in a reply record are measured from: the global model's values (the record holds
# model values, e.g. FedAvg's weights) or zero (the record holds an update, e.g. FedKRSO's accumulators).
REFERENCES = ("global", "zero")


@dataclass(frozen=True)
class MethodSpec:
    name: str  # the `method` run-config value
    label: str  # as the papers and the benchmark page write it
    # module holding `train(content, cfg, node_config, run_id, node_id) -> RecordDict`: the node's round
    client_module: str
    # "module:function" of `setup(cfg, recorder) -> server_app.round.ServerSetup`: the server's model and strategy
    server_setup: str
    # Values of the settings whose shipped value is "auto" (AUTO_KEYS); every method sets the same keys, so a
    # key is "auto" for all methods or for none.
    defaults: Mapping[str, float | str] = field(default_factory=dict, hash=False)
    # How it steps. "first-order": backpropagation with train.optimizer (auto: Adam) at train.lr, a new head
    # starts random. "zero-order": forward passes only, steps with zo.lr (train.lr is never read), auto
    # optimizer plain SGD, a new head starts from the label words, zo.lr "auto" follows the model.
    optimizer: str = FIRST_ORDER
    # The global model is rebuilt by replaying each reply's (seed, scalar) pairs with the constant η = zo.lr of
    # the update log, on the server and on every node: the configuration must not hold anything replay cannot
    # rebuild (an adaptive optimizer, weight decay). Needs keeps_model (the model it replays onto).
    replayed: bool = False
    # Nodes keep the global model on disk and catch up on missed rounds by replaying the server's update log;
    # the other methods send the trained numbers down every round and nodes keep nothing between rounds.
    keeps_model: bool = False
    # What tells a variant from the method it varies (FedTT+: {"plus": True}), read by the method's own code
    # from get_method(cfg.method).options, so that no code asks for the method's name.
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)
    # Where the method's numbers travel, for the code that forges messages to check that nodes and server refuse
    # them (tests/test_hostile.py, tests/test_instructions.py, bench/robust.py): the instruction's record holding
    # model numbers or update-log scalars, and the reply's record holding the node's update.
    instruction_record: str = "arrays"
    reply_record: str = "arrays"
    # For the code that attacks replies within the bounds (tests/test_hostile.py, bench/robust.py), declared
    # by every method (tests/test_methods.py checks; attack_references and load_value_bound refuse a method
    # that declares none): reply record -> what its floats are measured from (REFERENCES), the reply record
    # among them; and "module:function" of `bound(cfg, record) -> float`, the largest |value| the server
    # accepts in that record of a reply.
    attack_reference: Mapping[str, str] | None = field(default=None, hash=False)
    value_bound: str | None = None
    # "module:function" of `arrays(cfg, record) -> {key: float ndarray}`: the reply record's arrays as the server
    # aggregates them, where that is not its float32 arrays as sent (FedKSeed: its scalars sparse or dense on the
    # wire, the dense (K,) vector aggregated), for the code that forges a reply in the server's own space
    # (bench/adaptive.py); a record of exactly these arrays must be a valid reply. None: the float32 arrays.
    reply_arrays: str | None = None
    # "module:function" of `values(setup, instruction) -> {record: {key: float ndarray}}`: for each reply record
    # declared "global" in attack_reference (and only those), the global values that record's arrays replace,
    # read from the instruction the reply answers (setup: the server's server_app.round.ServerSetup, for what the
    # instruction alone does not say, e.g. FedTT's core shapes). Needed by every method with a "global" record.
    reference_values: str | None = None
    # "module:function" of `tensors(setup) -> {name: torch.Tensor}`: every tensor that makes up the server's global
    # model (setup: its ServerSetup), trained or frozen, each once: what a test or benchmark that measures "the
    # global model" (its change, its finiteness, a resumed run's equality) reads. Declared by every method, because
    # `setup.model.state_dict()` is not always the whole model: FedTT's cores hang on forward hooks and are in
    # neither its state_dict nor its parameters().
    global_model: str | None = None
    # The method's own run-config sections: section name (the key prefix, e.g. "krso") -> its frozen dataclass
    # (methods/<method>/config.py), which has `validate(cfg, in_use)`. common.config makes each one a section of
    # RunConfig; two methods may share a section (FedTT and FedTT+ share "tt") by naming the same class.
    sections: Mapping[str, type] = field(default_factory=dict, hash=False)
    # "module:function" of `export(setup, cfg, folder) -> info`: writes the server's global model as a Hugging
    # Face folder (`fedsubspace export`, server_app/export.py); the default writes the model's every weight
    export: str = "common.export:full_weights"
    # README.md's table of methods (scripts/config_reference.py writes it): what the method is, after its label,
    # and what crosses the wire in a round
    summary: str = ""
    travels: str = ""

    @property
    def reads_train_lr(self) -> bool:
        """Whether its runs step with train.lr (the first-order methods; the zero-order ones step with zo.lr)."""
        return self.optimizer == FIRST_ORDER

    def attack_references(self) -> Mapping[str, str]:
        """`attack_reference`, or a MethodError naming what to declare: a forged reply must not silently be
        measured against 0 when the method's reply holds model values."""
        if not self.attack_reference:
            raise MethodError(
                f"method '{self.name}' declares no attack_reference: give its MethodSpec, for each reply record "
                f"whose floats travel (its reply_record '{self.reply_record}' among them), 'global' (model values) "
                "or 'zero' (an update)"
            )
        return self.attack_reference

    def load_value_bound(self) -> Callable[[Any, str], float]:
        """The `value_bound` function, imported now; a MethodError when the method declares none."""
        if not self.value_bound:
            raise MethodError(
                f"method '{self.name}' declares no value_bound: name its wire module's `bound(cfg, record)`, the "
                "largest |value| the server accepts in each reply record, as 'module:function'"
            )
        return self._load(self.value_bound, "value_bound")

    def load_reply_arrays(self) -> Callable[[Any, Any], Mapping[str, Any]] | None:
        """The `reply_arrays` function, imported now; None when the method declares none (its float32 arrays)."""
        return self._load(self.reply_arrays, "reply_arrays") if self.reply_arrays else None

    def load_reference_values(self) -> Callable[[Any, Any], Mapping[str, Mapping[str, Any]]]:
        """The `reference_values` function, imported now; a MethodError when a record is measured from the global
        values (attack_reference "global") and the method does not say where they are."""
        if not self.reference_values:
            if "global" not in self.attack_references().values():
                return _no_global_values
            raise MethodError(
                f"method '{self.name}' declares no reference_values: its attack_reference measures "
                f"{sorted(r for r, v in self.attack_references().items() if v == 'global')} from the global values, so "
                "name its `values(setup, instruction)` (the values each such reply record replaces) as 'module:function'"
            )
        return self._load(self.reference_values, "reference_values")

    def load_global_model(self) -> Callable[[Any], Mapping[str, Any]]:
        """The `global_model` function, imported now; a MethodError when the method declares none (a measure of the
        model must not silently fall back to a state_dict that may leave trained tensors out)."""
        if not self.global_model:
            raise MethodError(
                f"method '{self.name}' declares no global_model: name its `tensors(setup)`, every tensor of the "
                "server's global model by name (adapters on hooks included), as 'module:function' "
                "(common.modeling:model_tensors where the model's state_dict is all of it)"
            )
        return self._load(self.global_model, "global_model")

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
        return self._load(self.server_setup, "server")

    def _load(self, where: str, what: str) -> Callable[..., Any]:
        module_name, _, function = where.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise MethodError(
                f"method '{self.name}': {what} module '{module_name}' cannot be imported ({exc})"
            ) from exc
        found = getattr(module, function, None)
        if not callable(found):
            raise MethodError(f"method '{self.name}': '{where}' names no function of {module_name}")
        return found


def _no_global_values(setup: Any, instruction: Any) -> dict[str, dict[str, Any]]:
    """reference_values of a method whose every reply record is an update (measured from 0): none."""
    return {}
