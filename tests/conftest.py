"""Shared fixtures: tiny real models (random weights, real tokenizer) and the task data; the test tiers.

Task data: the folder named by GLUE_DIR when it exists, else the synthetic fixture in tests/fixtures/glue
(same layout, a few hundred rows per split), so that a fresh clone runs every test without the real files.

Tiers: every test carries exactly one of the markers `unit`, `integration`, `system` (registered in
pyproject.toml); collection stops with the list of tests that have none or several.
"""

from __future__ import annotations

import os

import pytest

import methods  # noqa: F401 - registers every method (methods/__init__.py): the tests parametrize over them
from harness.tiny import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE_GLUE = os.path.join(ROOT, "tests", "fixtures", "glue")
TIERS = ("unit", "integration", "system")


def given_glue() -> str | None:
    """The real GLUE folder when GLUE_DIR names one that exists, else None."""
    path = os.environ.get("GLUE_DIR")
    return os.path.abspath(path) if path and os.path.isdir(path) else None


GLUE = given_glue() or FIXTURE_GLUE


def pytest_report_header(config):
    if given_glue():
        return f"task data: {GLUE} (GLUE_DIR)"
    why = "GLUE_DIR not set" if not os.environ.get("GLUE_DIR") else f"GLUE_DIR={os.environ['GLUE_DIR']} not found"
    return f"task data: {GLUE} (the synthetic fixture; {why})"


@pytest.hookimpl(tryfirst=True)  # before -m deselects: a test without a tier must not vanish from every tier
def pytest_collection_modifyitems(config, items):
    wrong = []
    for item in items:
        tiers = sorted({m.name for m in item.iter_markers() if m.name in TIERS})
        if len(tiers) != 1:
            wrong.append(f"{item.nodeid}: {', '.join(tiers) or 'no tier'}")
        elif item.get_closest_marker("e2e") and tiers != ["system"]:
            wrong.append(f"{item.nodeid}: e2e but {tiers[0]}")
    if wrong:
        raise pytest.UsageError(
            "every test needs exactly one tier marker (unit, integration or system; e2e tests are system):\n  "
            + "\n  ".join(wrong)
        )


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> str:
    """A 2-layer BERT saved without a classification head (as a pretrained checkpoint would be)."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny-bert")), "bert")


@pytest.fixture(scope="session")
def tiny_bert_no_dropout(tmp_path_factory) -> str:
    """tiny_bert without dropout: rounds that must be the same bits each time they run (checkpoints, exports).
    Built on its own (the same weights as tiny_bert), since the modules that use it call it tiny_bert."""
    import json

    path = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    save_tiny(str(path), "bert")
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A 2-layer LLaMA-architecture decoder, for the decoder path."""
    return save_tiny(str(tmp_path_factory.mktemp("tiny-llama")), "llama")


@pytest.fixture(scope="session")
def glue_dir() -> str:
    """The task data folder: GLUE_DIR's when given, else the synthetic fixture (never a skip)."""
    return GLUE


@pytest.fixture
def task_identity():
    """Lets tests build Flower Messages outside a runtime (the runtime normally sets these)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
