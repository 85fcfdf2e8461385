"""What both fleet commands check before anything starts: the run config, with the ServerApp's own validation,
and the data folder the fleet mounts. A bad key or an empty data folder is told in seconds, not after the fleet
has come up (or the images have been built)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import methods as _methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import ConfigError, parse_run_config


def check_run_config(run_config: Mapping[str, Any]) -> None:
    """Check a fleet run's config here, with the ServerApp's own validation, before `flwr run` sends it.

    The SuperLink refuses a key the app does not declare with only `[code: 15] Invalid run configuration.` (the
    key's name goes to its own log), and a bad value fails the run inside the ServerApp: checked here, both raise
    the ConfigError a simulation gives, naming the key and what it accepts. The app's defaults
    (`[tool.flwr.app.config]`) fill in the keys not given, as the SuperLink does. Paths are the containers' and
    are not looked at here (the ServerApp checks them when the run starts)."""
    from scripts.simulate import app_defaults

    parse_run_config({**app_defaults(), **run_config})


GLUE_LAYOUT = (
    "a folder in the GLUE layout: one folder per task as the GLUE and SuperGLUE downloads unpack them (SST-2/, "
    "RTE/, MRPC/, CoLA/ with train.tsv and dev.tsv; WiC/, CB/ with train.jsonl and val.jsonl; BoolQ/val.jsonl)"
)


def check_glue_dir(path: str) -> None:
    """The folder a fleet mounts at /app/data/glue must exist and hold task folders: Docker makes a missing bind
    source as an empty folder, and every run on it then fails inside its ServerApp."""
    if not path:
        raise ConfigError(f"no data folder: set GLUE_DIR (or data-dir / --glue-dir) to {GLUE_LAYOUT}")
    if not os.path.isdir(path):
        raise ConfigError(
            f"data folder {path} does not exist: set GLUE_DIR (or data-dir / --glue-dir) to {GLUE_LAYOUT}"
        )
    if not any(os.path.isdir(os.path.join(path, entry)) for entry in os.listdir(path)):
        raise ConfigError(f"data folder {path} holds no task folder: copy the task files into it, {GLUE_LAYOUT}")


def refused(glue_dir: str, run_configs: Iterable[Mapping[str, Any]]) -> bool:
    """Check the data folder and every run config; on the first failure print `error: ...` to stderr and return
    True (the commands then exit with status 2)."""
    try:
        check_glue_dir(glue_dir)
        for run_config in run_configs:
            check_run_config(run_config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return True
    return False
