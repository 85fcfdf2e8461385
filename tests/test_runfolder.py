"""Nothing recorded is lost: a run folder that holds a run's records (rounds.jsonl, a checkpoint, a summary)
is never truncated or overwritten by a new run under the same run-name, in the ServerApp's recorder and in
scripts/simulate.py alike; and no records file is written through a link planted at its temporary name.
(A stopped run started again through the whole ServerApp: tests/test_checkpoint.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from common.config import ConfigError, parse_run_config
from common.records import CHECKPOINT, RunRecorder

pytestmark = pytest.mark.integration

STOPPED = {  # what a run stopped after round 1 leaves: rows, a checkpoint, no summary.json
    "rounds.jsonl": '{"round": 0}\n{"round": 1}\n',
    CHECKPOINT: "a checkpoint",
}


def folder_with(tmp_path, files: dict[str, str]) -> str:
    folder = tmp_path / "results" / "run"
    folder.mkdir(parents=True)
    for name, text in files.items():
        (folder / name).write_text(text)
    return str(folder)


def recorder(tmp_path, **extra) -> RunRecorder:
    cfg = parse_run_config({"results-dir": str(tmp_path / "results"), "run-name": "run", **extra})
    return RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat())


@pytest.mark.parametrize(
    "files",
    [
        STOPPED,
        {"rounds.jsonl": '{"round": 0}\n'},  # stopped after its initial evaluation
        {CHECKPOINT: "a checkpoint"},  # the records deleted, the checkpoint kept
        {"fedtt-selection.jsonl": '{"round": 1}\n'},  # a method's own record
        {**STOPPED, "summary.json": "{}"},  # a finished run
    ],
)
def test_a_new_run_refuses_a_folder_that_holds_records(tmp_path, files):
    folder = folder_with(tmp_path, files)
    with pytest.raises(ConfigError, match=rf"already holds a run's records .* resume-from='{folder}'"):
        recorder(tmp_path)
    other = str(tmp_path / "elsewhere")
    os.makedirs(other)
    with pytest.raises(ConfigError, match="already holds a run's records"):  # resuming another run into it
        recorder(tmp_path, **{"resume-from": other})
    assert {n: (tmp_path / "results" / "run" / n).read_text() for n in files} == files  # byte for byte


def test_an_empty_or_absent_folder_is_used_and_the_same_run_resumes_into_its_own(tmp_path):
    folder_with(tmp_path, {"rounds.jsonl": "", "notes.txt": "mine"})  # nothing recorded yet
    rec = recorder(tmp_path)
    rec.end_round(0, {"accuracy": 0.5, "loss": 0.7})
    assert recorder(tmp_path / "fresh").dir.endswith("run")
    # Asked explicitly: resume-from names this folder (or its checkpoint), and the run continues in it.
    for resume_from in (rec.dir, os.path.join(rec.dir, CHECKPOINT)):
        again = RunRecorder(rec.dir.rsplit(os.sep, 1)[0], "run", {"resume-from": resume_from}, rec.records())
        assert again.rounds == rec.rounds


@pytest.mark.parametrize("name", ["rounds.jsonl", "summary.json"])
def test_a_link_planted_at_a_records_temporary_file_is_not_followed(tmp_path, name):
    victim = tmp_path / "victim"
    victim.write_text("precious")
    folder = tmp_path / "results" / "run"
    folder.mkdir(parents=True)
    os.symlink(victim, folder / f"{name}.tmp")
    rec = recorder(tmp_path)
    rec.end_round(0, {"accuracy": 0.5, "loss": 0.7})
    rec.finish()
    assert victim.read_text() == "precious"
    assert json.loads((folder / "summary.json").read_text())["initial_accuracy"] == 0.5
    assert not os.path.lexists(folder / f"{name}.tmp")


def test_simulate_refuses_before_anything_starts(tmp_path, glue_dir):
    """scripts/simulate.py refused only when summary.json existed: a stopped run (none yet) was truncated."""
    from scripts.simulate import simulate

    folder = folder_with(tmp_path, STOPPED)
    base = {"results-dir": str(tmp_path / "results"), "run-name": "run", "data-dir": glue_dir}
    with pytest.raises(ConfigError, match="resume-from"):
        simulate(base, clients=2, quiet=True)
    with pytest.raises(ConfigError, match="run-name '..' names results-dir itself"):
        simulate({**base, "run-name": ".."}, clients=2, quiet=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        simulate({**base, "results-dir": str(tmp_path / "file")}, clients=2, quiet=True)
    assert {n: Path(folder, n).read_text() for n in STOPPED} == STOPPED
