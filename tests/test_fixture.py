"""The synthetic task data in tests/fixtures/glue is what tests/fixtures/make_glue.py writes, byte for byte, so
that nobody edits it by hand and a changed script cannot leave stale files behind."""

from __future__ import annotations

import filecmp
import os

import pytest

from tests.fixtures import make_glue

pytestmark = pytest.mark.unit


def test_committed_fixture_is_what_the_script_writes(tmp_path):
    written = make_glue.write(str(tmp_path))
    committed = sorted(
        os.path.relpath(os.path.join(folder, name), make_glue.OUT)
        for folder, _, names in os.walk(make_glue.OUT)
        for name in names
        if name != "README.md"
    )
    assert sorted(written) == committed, "run: python tests/fixtures/make_glue.py"
    stale = [p for p in written if not filecmp.cmp(tmp_path / p, os.path.join(make_glue.OUT, p), shallow=False)]
    assert not stale, f"{stale} differ from the script's output: run python tests/fixtures/make_glue.py"
