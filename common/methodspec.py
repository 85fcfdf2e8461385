"""What a method declares about itself (its `MethodSpec`), and the errors its declaration and its config raise.

Each method's package (methods/<method>/__init__.py) builds its MethodSpec from this module, and the registry
(common/methods.py) registers it. Kept apart from the registry, and import-light (the standard library only), so
that a method's package and its config section can be imported on their own, before or after the registry,
without an import cycle.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any


class ConfigError(ValueError):
    """A run configuration that cannot work; the message says which key to change and how."""


def need(ok: bool, message: str) -> None:
    """Refuse a configuration: raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


class MethodError(ValueError):
    """A method that cannot be registered, or whose registered code cannot be found."""


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
    defaults: Mapping[str, float | str] = field(default_factory=dict, hash=False)
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
    # The method's own run-config sections: section name (the key prefix, e.g. "krso") -> its frozen dataclass
    # (methods/<method>/config.py), which has `validate(cfg, in_use)`. common.config makes each one a section of
    # RunConfig; two methods may share a section (FedTT and FedTT+ share "tt") by naming the same class.
    sections: Mapping[str, type] = field(default_factory=dict, hash=False)
    # "module:function" of `export(setup, cfg, folder) -> info`: writes the server's global model as a Hugging
    # Face folder (`fedsubspace export`, common/export.py); the default writes the model's every weight
    export: str = "common.export:full_weights"

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
