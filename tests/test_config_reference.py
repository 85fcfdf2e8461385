"""docs/configuration.md is what the config classes say (scripts/config_reference.py), and every key has help."""

from __future__ import annotations

import dataclasses

import pytest

pytestmark = pytest.mark.unit


def test_configuration_page_is_current():
    from scripts import config_reference

    assert config_reference.main(["--check"]) == 0, "run: python -m scripts.config_reference"


def test_every_key_is_explained():
    from common.config import RunConfig
    from scripts.config_reference import describe, field_help

    helps = field_help()
    run = RunConfig()
    missing = []
    for f in dataclasses.fields(run):
        value = getattr(run, f.name)
        fields = dataclasses.fields(value) if dataclasses.is_dataclass(value) else [f]
        owner = type(value).__name__ if dataclasses.is_dataclass(value) else "RunConfig"
        for sub in fields:
            key = f"{f.name}.{sub.name}" if dataclasses.is_dataclass(value) else sub.name
            if not describe(key.replace("_", "-"), helps.get((owner, sub.name), "")):
                missing.append(key)
    assert not missing, f"config fields without a comment in common/config.py: {missing}"
