"""Nothing recorded is lost: a run folder that holds a run's records (rounds.jsonl, a checkpoint, a summary)
is never truncated or overwritten by a new run under the same run-name, in the ServerApp's recorder and in
scripts/simulate.py alike; no records file is written through a link planted at its temporary name; and one
server writes a run folder at a time (its lock, common.runfolder.hold_run_folder), whether a second one starts
fresh or with resume-from, at the same moment or while the first still runs.
(A stopped run started again through the whole ServerApp: tests/test_checkpoint.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from common.config import ConfigError, parse_run_config
from common.files import NotAFile
from common.records import RunRecorder
from common.runfolder import CHECKPOINT, RunFolderBusy, hold_run_folder

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
        {CHECKPOINT: "a checkpoint"},  # the records deleted, the checkpoint kept
        {"fedtt-selection.jsonl": '{"round": 1}\n', CHECKPOINT: "a checkpoint"},  # a method's own record
        {"rounds.jsonl": '{"round": 0}\n', "summary.json": "{}"},  # a finished run
        {**STOPPED, "summary.json": "{}"},
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


@pytest.mark.parametrize(
    "files",
    [
        {"rounds.jsonl": '{"round": 0}\n'},  # stopped after its initial evaluation
        {"rounds.jsonl": '{"round": 0}\n{"round": 1}\n', "fedtt-selection.jsonl": '{"round": 1}\n'},  # in round 1
        {"fedtt-selection.jsonl": '{"round": 1}\n'},
    ],
)
def test_a_run_stopped_before_its_first_checkpoint_starts_again_its_records_kept_aside(tmp_path, files):
    """Records but no checkpoint and no summary: nothing to resume, so no dead end either: a run started again
    under its name begins from round 0, and the old records are renamed beside it, byte for byte."""
    folder = folder_with(tmp_path, files)
    rec = recorder(tmp_path)
    assert rec.rounds == [] and not any(os.path.getsize(p) for n in files if os.path.exists(p := Path(folder, n)))
    aside = {n.split(".aside-")[0]: Path(folder, n).read_text() for n in os.listdir(folder) if ".aside-" in n}
    assert aside == files
    rec.end_round(0, None)
    assert [json.loads(line)["round"] for line in Path(folder, "rounds.jsonl").read_text().splitlines()] == [0]


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


@pytest.mark.parametrize("record", ["rounds", "fedtt-selection"])
def test_a_link_planted_at_a_records_file_between_rounds_is_not_followed(tmp_path, record):
    """rounds.jsonl (or a method's own record) replaced by a link between rounds: the append is refused, naming
    the link, and the link's target is untouched (opened with "ab", the rows went into it and the run succeeded)."""
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    rec = recorder(tmp_path)
    rec.end_round(0, {"accuracy": 0.5, "loss": 0.7})
    rec.add_record("fedtt-selection", {"round": 0})
    path = Path(rec.dir, f"{record}.jsonl")
    path.unlink()
    os.symlink(victim, path)
    rec.begin_round(1)
    with pytest.raises(NotAFile, match=rf"'{path}' is a symbolic link \(to '{victim}'\)"):
        rec.end_round(1, None) if record == "rounds" else rec.add_record(record, {"round": 1})
    assert victim.read_text() == "precious\n"


def test_a_pipe_at_a_records_file_is_refused_without_hanging(tmp_path):
    rec = recorder(tmp_path)
    rec.end_round(0, None)
    path = Path(rec.dir, "rounds.jsonl")
    path.unlink()
    os.mkfifo(path)
    rec.begin_round(1)
    with pytest.raises(NotAFile, match="is not a regular file"):
        rec.end_round(1, None)


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


# --- one writer per run folder ----------------------------------------------------------------------------

ROOT = str(Path(__file__).resolve().parents[1])


def server_process(script: str, *args: str) -> subprocess.Popen:
    """A Python process running `script` (what a server does with the run folder), its output piped."""
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": ROOT}, cwd=ROOT,
    )  # fmt: skip


def take(folder: str) -> None:
    """Take the run folder's lock and let it go: what a second server does first."""
    with hold_run_folder(folder):
        pass


def test_a_second_writer_is_refused_by_a_message_naming_the_first(tmp_path):
    folder = str(tmp_path / "results" / "run")
    busy = rf"pid {os.getpid()} on host .*, Flower run 7, started .*flwr stop"
    with hold_run_folder(folder, run_id=7), pytest.raises(RunFolderBusy, match=busy):
        take(folder)
    take(folder)  # released at the end of the block


def test_the_lock_goes_with_the_process_that_held_it(tmp_path):
    """A server SIGKILLed mid-run leaves nothing to clean up: the kernel drops its lock."""
    folder = str(tmp_path / "results" / "run")
    holder = server_process(
        """
        import sys, time
        from common.runfolder import hold_run_folder
        with hold_run_folder(sys.argv[1], run_id=5):
            print("held", flush=True)
            time.sleep(120)
        """,
        folder,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderBusy, match=rf"pid {holder.pid} .*Flower run 5"):
            take(folder)
    finally:
        holder.kill()
        holder.wait()
    take(folder)


def test_two_servers_started_together_cannot_both_pass_the_check(tmp_path):
    """check_not_overwriting and the first row happen under the lock (as server_app.app.run does them), so of
    two servers started on one run-name at the same moment one writes and the other is refused; without the
    lock both would pass the check (the folder is empty until the first row) and interleave their rows."""
    script = """
        import sys, time
        from common.records import RunRecorder
        from common.runfolder import RunFolderBusy, hold_run_folder
        results = sys.argv[1]
        try:
            with hold_run_folder(results + "/run"):
                rec = RunRecorder(results, "run", {})  # check_not_overwriting: the folder is still empty
                time.sleep(1.5)  # the check and the first row far apart: the other server starts in between
                rec.end_round(0, None)
            print("wrote")
        except RunFolderBusy:
            print("refused")
        """
    servers = [server_process(script, str(tmp_path / "results")) for _ in range(2)]
    outcomes = sorted(p.communicate(timeout=120)[0].strip() for p in servers)
    assert outcomes == ["refused", "wrote"]
    assert (tmp_path / "results" / "run" / "rounds.jsonl").read_text().count("\n") == 1


def test_the_server_refuses_a_run_folder_another_server_writes(tmp_path, glue_dir):
    """server_app.app.run takes the lock before it checks or writes anything in the folder (and a run resumed
    from a folder checks that no server writes it): a second server, started fresh or resuming that folder (in
    place or into another one), is refused and changes nothing."""
    from server_app.app import run

    folder = folder_with(tmp_path, STOPPED)
    base = {"results-dir": str(tmp_path / "results"), "run-name": "run", "data-dir": glue_dir}
    with hold_run_folder(folder, run_id=3):
        for extra in ({}, {"resume-from": folder}, {"run-name": "fork", "resume-from": folder}):
            with pytest.raises(RunFolderBusy, match=rf"'{folder}' is being written .*Flower run 3"):
                run(None, parse_run_config({**base, **extra}), run_id=4)
    assert {n: Path(folder, n).read_text() for n in STOPPED} == STOPPED
    assert not os.path.exists(tmp_path / "results" / "fork")  # refused before anything was written


def test_a_link_at_the_run_folder_or_its_lock_is_refused(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "results").mkdir()
    os.symlink(elsewhere, tmp_path / "results" / "run")
    with pytest.raises(ConfigError, match="is a symbolic link"):
        take(str(tmp_path / "results" / "run"))
    folder = tmp_path / "results" / "other"
    folder.mkdir()
    os.symlink(tmp_path / "victim", folder / ".lock")
    with pytest.raises(ConfigError, match="symbolic link, not a run folder's lock"):
        take(str(folder))
    assert not (tmp_path / "victim").exists() and not os.listdir(elsewhere)
