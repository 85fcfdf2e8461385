"""Server checkpoint and resume: for every method a run of N rounds equals a run of k rounds resumed for N - k;
torn, altered, foreign and stale checkpoints are refused with a clear error; the write is atomic.

The whole ServerApp run (server_app.app.run) goes through Flower's Strategy.start with a grid that hands
each message to the method's real client function in this process, as the runtime does, and returns the
replies in node order. The tiny model here has no dropout (nor LoRA dropout): dropout draws from each
client process's own torch RNG, which no server state holds, and would make even two uninterrupted runs
differ; without it every round is a deterministic function of the server state, so equality is exact.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save as st_save

from common.config import ConfigError, parse_run_config
from common.files import DiskFull
from common.methods import METHODS, get_method
from common.nodestore import STATE_DIR_ENV
from common.records import RunRecorder, jsonl_line, records_digest
from harness.fakes import InProcessGrid
from server_app import checkpoint
from server_app.app import build_setup, resume, run
from server_app.state import records_to_state

pytestmark = pytest.mark.usefixtures("task_identity")

NODES = {101: 0, 102: 1, 103: 2}  # node id -> partition id


@pytest.fixture(scope="module")
def tiny_bert(tiny_bert_no_dropout):
    """This module's tiny BERT is conftest's without dropout: its rounds are deterministic."""
    return tiny_bert_no_dropout


def make_cfg(method, tiny_bert, glue_dir, tmp_path, **extra):
    return parse_run_config(
        {
            "method": method, "task": "rte", "model": tiny_bert, "data-dir": glue_dir, "seed": 1,
            "results-dir": str(tmp_path / "results"), "train.local-steps": 2, "train.batch-size": 4,
            "train.max-length": 32, "train.lr": 1e-2, "eval.max-examples": 16, "eval.batch-size": 16,
            "fraction-train": 0.6, "min-clients": 2, "krso.k": 2, "krso.rank": 4,
            "krso.intervals": 2, "zo.lr": 1e-2, "zo.eps": 1e-2, "spzo.split-layer": 1, "spzo.p1": 1, "spzo.p2": 2, "zo.params": "all",
            "kseed.k": 64, "tt.bottleneck": 8, "tt.rank": 3, "lora.rank": 2, "lora.dropout": 0.0, **extra,
        }
    )  # fmt: skip


def run_to(method, tiny_bert, glue_dir, tmp_path, run_id, rounds, name, **extra):
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"num-server-rounds": rounds, "run-name": name, **extra})
    grid = InProcessGrid(cfg, run_id, NODES)
    run(grid, cfg, run_id)
    return os.path.join(cfg.results_dir, name), grid.sampled


def row(r):
    """A round record as RunRecorder.end_round writes it."""
    with tempfile.TemporaryDirectory() as folder:
        rec = RunRecorder(folder, "row", {})
        rec.begin_round(r)
        return rec.end_round(r, None)


def write_rows(folder, records) -> None:
    """`records` ({name: rows}) as the .jsonl files a run leaves beside its checkpoint."""
    os.makedirs(folder, exist_ok=True)
    for name, rows in records.items():
        Path(folder, f"{name}.jsonl").write_bytes(b"".join(jsonl_line(r) for r in rows))


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def server_model(method, tiny_bert, glue_dir, tmp_path, records):
    """The global model of a run's last checkpoint, rebuilt as a resumed run rebuilds it."""
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"run-name": "inspect"})
    setup = build_setup(cfg, RunRecorder(str(tmp_path / "inspect"), method, cfg.to_flat()))
    resume(setup, checkpoint.read(records), run_id=0)
    return global_model(cfg, setup)


def server_model_initial(method, tiny_bert, glue_dir, tmp_path):
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"run-name": "initial"})
    setup = build_setup(cfg, RunRecorder(str(tmp_path / "inspect"), "initial", cfg.to_flat()))
    return global_model(cfg, setup)


def global_model(cfg, setup) -> dict[str, torch.Tensor]:
    """A copy of every tensor of the server's global model (MethodSpec.global_model: FedTT's cores included)."""
    return {n: t.detach().clone() for n, t in get_method(cfg.method).load_global_model()(setup).items()}


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_run_of_n_rounds_equals_k_rounds_resumed(method, tiny_bert, glue_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    full, sampled_full = run_to(method, tiny_bert, glue_dir, tmp_path, 1, 3, "full")
    part, sampled_part = run_to(method, tiny_bert, glue_dir, tmp_path, 2, 2, "part")  # "stopped" after round 2
    resumed, sampled = run_to(method, tiny_bert, glue_dir, tmp_path, 3, 3, "resumed", **{"resume-from": part})
    assert sampled_part + sampled == sampled_full  # client sampling continues where it stopped
    assert sampled_full[2] != sampled_full[0]  # 2 of 3 nodes a round: a sampler restarted from the seed would differ

    a = server_model(method, tiny_bert, glue_dir, tmp_path, full)
    b = server_model(method, tiny_bert, glue_dir, tmp_path, resumed)
    initial = server_model_initial(method, tiny_bert, glue_dir, tmp_path)
    assert a.keys() == b.keys() == initial.keys()
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, rtol=0, atol=1e-6, msg=name)
    assert any(not torch.equal(t, initial[name]) for name, t in a.items())  # training moved the model

    rows_full = read_jsonl(os.path.join(full, "rounds.jsonl"))
    rows_part = read_jsonl(os.path.join(part, "rounds.jsonl"))
    rows = read_jsonl(os.path.join(resumed, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert rows[:3] == rows_part  # the records so far, carried over unchanged
    assert rows[3]["clients"] == rows_full[3]["clients"] == 2
    assert rows[3]["accuracy"] == pytest.approx(rows_full[3]["accuracy"], abs=1e-6)
    assert rows[3]["loss"] == pytest.approx(rows_full[3]["loss"], abs=1e-5)
    with open(os.path.join(resumed, "summary.json")) as f:
        summary = json.load(f)
    assert summary["rounds"] == 3 and summary["totals"]["client_replies"] == sum(r["clients"] for r in rows)
    assert checkpoint.read(resumed).round == 3
    if method.startswith("fedtt"):
        sel_full = read_jsonl(os.path.join(full, "fedtt-selection.jsonl"))
        assert read_jsonl(os.path.join(resumed, "fedtt-selection.jsonl")) == sel_full


# --- refusals ---------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_every_method_trains_the_same_nodes_each_round(tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Side by side means the same clients: with the same seed and nodes, every strategy draws the same nodes
    in the same rounds (server_app.round.choose_nodes), FedAvg's included (Flower's own sampling is the
    unseeded global `random`)."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    drawn = {m: run_to(m, tiny_bert, glue_dir, tmp_path / m, 1, 3, "draws")[1] for m in ("fedavg", "fedkseed")}
    assert drawn["fedavg"] == drawn["fedkseed"] and len({tuple(d) for d in drawn["fedavg"]}) > 1


@pytest.mark.integration
def test_fedavg_reads_a_checkpoint_from_before_its_seeded_sampling(tiny_bert, glue_dir, tmp_path, caplog):
    """A FedAvg checkpoint written before its strategy had a sampling RNG (state {}) still resumes, saying that
    sampling starts again from the seed; a state key FedAvg does not know is refused."""
    cfg = make_cfg("fedavg", tiny_bert, glue_dir, tmp_path, **{"run-name": "old"})
    setup = build_setup(cfg, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    fresh = setup.strategy._rng.getstate()
    tensors = {k: checkpoint._numpy(v) for k, v in setup.strategy.state_dict()[0].items()}  # "arrays/<name>"
    setup.strategy.load_state_dict(tensors, {}, 2, True)
    assert setup.strategy._rng.getstate() == fresh
    assert "no client-sampling state" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match="FedAvg does not have"):
        setup.strategy.load_state_dict(tensors, {"log": []}, 2, True)


@pytest.fixture(scope="module")
def saved_run(tiny_bert, glue_dir, tmp_path_factory):
    """A FedKSeed run stopped after 2 rounds (cheap, and its checkpoint has a log, an RNG and records)."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    tmp = tmp_path_factory.mktemp("saved")
    os.environ[STATE_DIR_ENV] = str(tmp / "nodes")
    try:
        records, _ = run_to("fedkseed", tiny_bert, glue_dir, tmp, 1, 2, "saved")
    finally:
        del os.environ[STATE_DIR_ENV]
    with open(os.path.join(records, checkpoint.FILENAME), "rb") as f:
        data = f.read()
    SEGMENTS.update({n: Path(records, checkpoint.LOG_DIR, n).read_bytes() for n in os.listdir(Path(records, "log"))})
    RECORDS.update({n: Path(records, n).read_bytes() for n in os.listdir(records) if n.endswith(".jsonl")})
    return tmp, data


SEGMENTS: dict[str, bytes] = {}  # saved_run's update-log segments, copied with its checkpoint
RECORDS: dict[str, bytes] = {}  # saved_run's records files (rounds.jsonl), copied with its checkpoint


def copy_to(tmp_path, data: bytes, segments: dict[str, bytes] | None = None, records: dict | None = None) -> str:
    """The checkpoint `data` in a fresh folder, with saved_run's update log (or `segments`) and records files
    (or `records`: {file name: bytes}) beside it."""
    path = tmp_path / "copy" / checkpoint.FILENAME
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    shutil.rmtree(path.parent / checkpoint.LOG_DIR, ignore_errors=True)
    (path.parent / checkpoint.LOG_DIR).mkdir()
    for name, segment in (SEGMENTS if segments is None else segments).items():
        (path.parent / checkpoint.LOG_DIR / name).write_bytes(segment)
    for name in os.listdir(path.parent):
        if name.endswith(".jsonl"):
            os.remove(path.parent / name)
    for name, content in (RECORDS if records is None else records).items():
        (path.parent / name).write_bytes(content)
    return str(path)


def rewritten(data: bytes, edit) -> bytes:
    """The same tensors with the metadata changed by `edit` (its SHA-256 left as it was)."""
    from safetensors.numpy import load

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    edit(meta)
    return st_save(load(data), metadata=meta)


@pytest.mark.integration
def test_a_valid_checkpoint_reads_back(saved_run, tmp_path):
    tmp, data = saved_run
    state = checkpoint.read(copy_to(tmp_path, data))
    assert state.round == 2 and [r["round"] for r in state.records["rounds"]] == [0, 1, 2]
    assert state.config["method"] == "fedkseed" and state.tensors == {}
    assert os.path.getsize(copy_to(tmp_path, data)) < 64 * 1024  # a log method keeps its log, not its weights


@pytest.mark.integration
def test_checkpoint_command_checks_and_describes(saved_run, tmp_path, capsys):
    _, data = saved_run
    path = copy_to(tmp_path, data)
    assert checkpoint.main([os.path.dirname(path)]) == 0
    out = capsys.readouterr().out
    assert "whole (SHA-256 checked)" in out and "fedkseed on rte" in out and "round 2 of 2 done" in out
    assert checkpoint.main([copy_to(tmp_path, data[:-1])]) == 1
    assert "torn" in capsys.readouterr().err


@pytest.mark.unit
def test_missing_checkpoint_is_refused(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
        checkpoint.read(str(tmp_path / "nope.safetensors"))
    with pytest.raises(checkpoint.CheckpointError, match=f"no {checkpoint.FILENAME} in folder"):
        checkpoint.read(str(tmp_path))


@pytest.mark.integration
def test_truncated_checkpoint_is_refused(saved_run, tmp_path):
    _, data = saved_run
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(checkpoint.CheckpointError, match="torn or not a checkpoint"):
            checkpoint.read(copy_to(tmp_path, data[:cut]))


@pytest.mark.integration
def test_every_flipped_byte_is_refused(saved_run, tmp_path):
    _, data = saved_run
    header_end = 8 + int.from_bytes(data[:8], "little")
    positions = sorted(  # a log method's checkpoint may hold no tensors: then the header is the whole file
        {9, 40, header_end // 2, header_end - 3, header_end + 3, (header_end + len(data)) // 2, len(data) - 1}
        & set(range(len(data)))
    )
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x01
        with pytest.raises(checkpoint.CheckpointError, match="torn|SHA-256|not a fedsubspace|version"):
            checkpoint.read(copy_to(tmp_path, bytes(bad)))


@pytest.mark.integration
def test_edited_round_number_is_refused(saved_run, tmp_path):
    _, data = saved_run

    def edit(meta):
        assert '"round": 2' in meta["state"]
        meta["state"] = meta["state"].replace('"round": 2', '"round": 1', 1)

    with pytest.raises(checkpoint.CheckpointError, match="SHA-256"):
        checkpoint.read(copy_to(tmp_path, rewritten(data, edit)))


@pytest.mark.integration
def test_other_format_version_is_refused(saved_run, tmp_path):
    _, data = saved_run
    with pytest.raises(checkpoint.CheckpointError, match="format version '4'; this code reads versions 1, 2, 3"):
        checkpoint.read(copy_to(tmp_path, rewritten(data, lambda m: m.update(version="4"))))
    with pytest.raises(checkpoint.CheckpointError, match="not a fedsubspace server checkpoint"):
        checkpoint.read(copy_to(tmp_path, rewritten(data, lambda m: m.update(format="other"))))


@pytest.mark.integration
@pytest.mark.parametrize(
    "change, message",
    [
        ({"method": "fedkrso"}, "method = 'fedkseed' there, 'fedkrso' here"),
        ({"seed": 2}, "seed = 1 there, 2 here"),
        ({"task": "mrpc"}, "task = 'rte' there, 'mrpc' here"),
        ({"kseed.k": 128}, "kseed.k = 64 there, 128 here"),
        ({"num-server-rounds": 2}, "already holds round 2 and num-server-rounds is 2"),
    ],
)
def test_checkpoint_of_another_configuration_is_refused(
    saved_run, tiny_bert, glue_dir, tmp_path, change, message, monkeypatch
):
    tmp, data = saved_run
    path = copy_to(tmp_path, data)
    extra = {"method": "fedkseed", "num-server-rounds": 3, "run-name": "again", "resume-from": path, **change}
    cfg = make_cfg(extra.pop("method"), tiny_bert, glue_dir, tmp_path, **extra)
    with pytest.raises(ConfigError, match=message):
        run(InProcessGrid(cfg, 2, NODES), cfg, 2)
    assert not os.path.exists(os.path.join(cfg.results_dir, "again"))  # refused before anything was written


@pytest.mark.integration
def test_log_that_does_not_rebuild_the_model_is_refused(saved_run, tiny_bert, glue_dir, tmp_path):
    """A checkpoint consistent in itself whose log, replayed on this model, does not give its model digest
    (as when the files at `model` changed between the runs)."""
    _, data = saved_run
    state = checkpoint.read(copy_to(tmp_path, data))
    name = next(iter(state.strategy["digest"]))
    state.strategy["digest"][name][0] += 1.0
    path = copy_to(tmp_path, b"")
    checkpoint.write(path, state)
    cfg = make_cfg("fedkseed", tiny_bert, glue_dir, tmp_path, **{"num-server-rounds": 3, "resume-from": path})
    with pytest.raises(checkpoint.CheckpointError, match="does not give the model it was written from"):
        run(InProcessGrid(cfg, 2, NODES), cfg, 2)


@pytest.mark.integration
def test_node_rounds_are_kept_only_within_the_same_flower_run(saved_run, tiny_bert, glue_dir, tmp_path):
    """Nodes keep their copy per Flower run: under a new run every node is sent the whole log."""
    _, data = saved_run
    state = checkpoint.read(copy_to(tmp_path, data))
    assert state.strategy["node-round"]  # the nodes of round 2 hold round 1
    cfg = make_cfg("fedkseed", tiny_bert, glue_dir, tmp_path, **{"num-server-rounds": 3, "run-name": "n"})
    for same_run, expected in ((True, {int(n): r for n, r in state.strategy["node-round"].items()}), (False, {})):
        setup = build_setup(cfg, RunRecorder(str(tmp_path / "n"), str(same_run), cfg.to_flat()))
        resume(setup, state, run_id=state.run_id if same_run else state.run_id + 1)
        assert setup.strategy.node_round == expected and len(setup.strategy.log) == 2


@pytest.mark.integration
def test_crash_between_write_and_rename_leaves_the_previous_checkpoint(saved_run, tmp_path, monkeypatch):
    _, data = saved_run
    path = copy_to(tmp_path, data)
    state = checkpoint.read(path)
    strategy = {k: v for k, v in state.strategy.items() if k != checkpoint.LOG_HEAD}  # no log: the file alone
    row_3 = row(3)
    later = checkpoint.ServerState(
        3, state.config, state.tensors, strategy, {"rounds": [*state.records["rounds"], row_3]}
    )
    with open(os.path.join(os.path.dirname(path), "rounds.jsonl"), "ab") as f:
        f.write(jsonl_line(row_3))  # the recorder appends the round's row before the checkpoint counts it

    def crash(src, dst):
        raise OSError("power lost")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="power lost"):
        checkpoint.write(path, later)
    monkeypatch.undo()
    assert os.path.exists(path + ".tmp")  # the new state was written in full, never renamed
    assert checkpoint.read(path).round == 2  # the previous checkpoint is whole and valid
    with open(path, "rb") as f:
        assert f.read() == data
    checkpoint.write(path, later)  # the next write replaces the stale temporary file
    assert checkpoint.read(path).round == 3 and not os.path.exists(path + ".tmp")


@pytest.mark.unit
def test_written_state_round_trips_exactly(tmp_path):
    tensors = {
        "log/1/seeds": np.arange(4, dtype=np.int64),
        "log/1/0/w": np.random.default_rng(0).random((3, 2), np.float32),
    }
    state = checkpoint.ServerState(
        1, {"method": "fedkrso"}, tensors, {"x": [0.1, 2**40]}, {"rounds": [row(0), row(1)]}, run_id=7,
    )  # fmt: skip
    path = str(tmp_path / "c.safetensors")
    checkpoint.write(path, state)
    write_rows(tmp_path, state.records)
    back = checkpoint.read(path)
    assert back.round == 1 and back.run_id == 7 and back.strategy == {"x": [0.1, 2**40]}
    assert back.records == state.records
    assert back.tensors.keys() == tensors.keys() and all(np.array_equal(back.tensors[k], v) for k, v in tensors.items())


@pytest.mark.integration
def test_a_link_planted_at_the_temporary_file_is_not_followed(tmp_path):
    """checkpoint.safetensors.tmp made a link to another file: the write removes the link and creates its own
    file exclusively; the link's target is untouched."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = tmp_path / "run" / checkpoint.FILENAME
    path.parent.mkdir()
    os.symlink(victim, str(path) + ".tmp")
    rows = [row(0), row(1)]
    checkpoint.write(str(path), checkpoint.ServerState(1, {"method": "fedkrso"}, {}, {}, {"rounds": rows}))
    write_rows(path.parent, {"rounds": rows})
    assert victim.read_bytes() == b"precious" and checkpoint.read(str(path)).round == 1
    assert sorted(os.listdir(path.parent)) == [checkpoint.FILENAME, "rounds.jsonl"]


@pytest.mark.integration
@pytest.mark.parametrize("name", [checkpoint.FILENAME, "rounds.jsonl", "log/round-000001.safetensors"])
def test_a_link_in_the_run_folder_is_not_read(saved_run, tmp_path, name):
    """The checkpoint, a records file or a segment replaced by a link (here to a copy of the very file, so only
    the link itself can be refused): resuming refuses it, naming it, instead of reading whatever it points to."""
    _, data = saved_run
    folder = Path(copy_to(tmp_path, data)).parent
    target, genuine = folder / name, tmp_path / "genuine"
    genuine.write_bytes(target.read_bytes())
    target.unlink()
    os.symlink(genuine, target)
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"'{target}' is a symbolic link")):
        checkpoint.read(str(folder))
    target.unlink()
    os.rename(genuine, target)
    assert checkpoint.read(str(folder)).round == 2


@pytest.mark.integration
def test_a_stopped_run_started_again_under_its_name_keeps_every_round(tiny_bert, glue_dir, tmp_path, monkeypatch):
    """A run stopped after round 2 (records and checkpoint, no summary.json) started again with the same run-name:
    without resume-from the ServerApp refuses, naming resume-from, and leaves every byte; asked to resume
    (resume-from = its own folder) it continues there and keeps rounds 0..2 as they were."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    records, _ = run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 1, 2, "stopped")
    os.remove(os.path.join(records, "summary.json"))
    before = {n: Path(records, n).read_bytes() for n in ("rounds.jsonl", checkpoint.FILENAME)}
    with pytest.raises(ConfigError, match=f"resume-from='{records}'"):
        run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 2, 3, "stopped")
    assert {n: Path(records, n).read_bytes() for n in before} == before
    run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 2, 3, "stopped", **{"resume-from": records})
    rows = read_jsonl(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    assert "".join(json.dumps(r) + "\n" for r in rows[:3]).encode() == before["rounds.jsonl"]
    assert checkpoint.read(records).round == 3


class Killed(BaseException):
    """The server process killed mid-write (a BaseException: no `except Exception` on the way catches it)."""


@pytest.mark.integration
def test_a_run_stopped_before_its_first_checkpoint_starts_again_under_its_name(
    tiny_bert, glue_dir, tmp_path, monkeypatch
):
    """Killed while writing its first checkpoint, the run leaves rows 0 and 1 and no checkpoint. resume-from
    says there is nothing to resume and what to do; started again under its name it runs from round 0 (its
    old records moved aside, kept), writes the rows it would have written, and can be resumed from then on."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))

    def killed(path, state):
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write", killed)
        with pytest.raises(Killed):
            run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 1, 2, "early")
    records = os.path.join(tmp_path, "results", "early")
    stopped = read_jsonl(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in stopped] == [0, 1] and not os.path.exists(os.path.join(records, checkpoint.FILENAME))
    with pytest.raises(checkpoint.CheckpointError, match="stopped before its first checkpoint.*without resume-from"):
        run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 2, 2, "early", **{"resume-from": records})
    run_to("fedkseed", tiny_bert, glue_dir, tmp_path, 3, 2, "early")
    rows = read_jsonl(os.path.join(records, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2] and checkpoint.read(records).round == 2
    for again, before in zip(rows, stopped, strict=False):  # the same rounds again, from the same seeds
        assert again["clients"] == before["clients"] and again["accuracy"] == pytest.approx(before["accuracy"])
    aside = [n for n in os.listdir(records) if n.startswith("rounds.jsonl.aside-")]
    assert len(aside) == 1 and read_jsonl(os.path.join(records, aside[0])) == stopped


def resigned(data: bytes, edit, replace: bool = False, version: int = checkpoint.VERSION) -> bytes:
    """The checkpoint with its JSON state edited in place by `edit` (or replaced by what it returns) and its
    SHA-256 recomputed, as someone who knows the format would forge it: only the field checks can refuse it.
    `version`: the format version it then says it has."""
    from safetensors.numpy import load

    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    meta = header["__metadata__"]
    state = json.loads(meta["state"])
    replaced = edit(state)
    state = replaced if replace else state
    meta["state"], meta["version"] = json.dumps(state), str(version)
    tensors = load(data)
    meta["sha256"] = checkpoint._digest(meta["state"], tensors, version)
    return st_save(tensors, metadata=meta)


def rows_inside(records) -> object:
    """A state edit: the records' rows themselves in the state, as versions 1 and 2 keep them."""
    return lambda s: s.update(records=records)


STATE_EDITS = {  # name: (edit, what the error says)
    "state a list": (lambda s: [s], "not an object"),
    "round a list of ints": (lambda s: s.update(round=[1, 2]), "not a round number"),
    "round a bool": (lambda s: s.update(round=True), "not a round number"),
    "config a list": (lambda s: s.update(config=["method", "fedkseed"]), "config that is not run-config keys"),
    "config value a dict": (lambda s: s["config"].update(seed={"x": 1}), "config that is not run-config keys"),
    "strategy a list": (lambda s: s.update(strategy=[]), "strategy state that is a list"),
    "no records": (lambda s: s.pop("records"), "incomplete state"),
    "run id a string": (lambda s: s.update({"flower-run-id": "7"}), "not a run id"),
    "log head not a digest": (lambda s: s["strategy"].update({"log-head": 5}), "'log-head' is not a SHA-256"),
    "records as rows": (lambda s: s["records"].update(rounds=[0, 1, 2]), "not the row counts and SHA-256"),
    "record named by a path": (lambda s: s["records"].update({"../x": s["records"]["rounds"]}), "not the row counts"),
    "digest not hex": (lambda s: s["records"]["rounds"].update(sha256="x" * 64), "not the row counts"),
    "rounds counted short": (lambda s: s["records"]["rounds"].update(rows=2), "counts 2 rows of rounds.jsonl, not 3"),
    "no round records": (lambda s: s["records"].pop("rounds"), "counts None rows of rounds.jsonl"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(STATE_EDITS))
def test_a_resigned_checkpoint_with_a_bad_field_is_refused_naming_the_file(saved_run, tmp_path, name):
    _, data = saved_run
    assert checkpoint.read(copy_to(tmp_path, resigned(data, lambda s: None))).round == 2  # the forging is honest
    edit, says = STATE_EDITS[name]
    path = copy_to(tmp_path, resigned(data, edit, replace=name == "state a list"))
    with pytest.raises(checkpoint.CheckpointError, match=f"resume-from: '{path}' .*{says}"):
        checkpoint.read(path)


ROW_EDITS = {  # edits of saved_run's records ({name: rows}), refused under a re-signed checkpoint
    "round rows that are ints": (lambda r: r.update(rounds=[0, 1, 2]), "not rows"),
    "rounds out of order": (lambda r: r["rounds"].reverse(), r"holds the records of rounds \[2, 1, 0\]"),
    "a row without its count": (lambda r: r["rounds"][1].pop("clients"), "clients = None, not a count"),
    "seconds a string": (lambda r: r["rounds"][2].update(seconds="1"), "not a number"),
    "extra record of ints": (lambda r: r.update(other=[1]), "other record"),
}


def saved_rows() -> dict[str, list]:
    return {n.removesuffix(".jsonl"): [json.loads(line) for line in b.splitlines()] for n, b in RECORDS.items()}


def with_rows(data: bytes, records: dict[str, list], version: int = checkpoint.VERSION) -> tuple[bytes, dict]:
    """saved_run's checkpoint re-signed to hold `records` and the records files to put beside it: version 3
    keeps their count and digest (the rows go in the files), versions 1 and 2 the rows (no files)."""
    if version in checkpoint.ROWS_INSIDE:
        return resigned(data, rows_inside(records), version=version), {}
    digests = {name: records_digest(rows) for name, rows in records.items()}
    files = {f"{name}.jsonl": b"".join(jsonl_line(r) for r in rows) for name, rows in records.items()}
    return resigned(data, lambda s: s.update(records=digests)), files


@pytest.mark.integration
@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("name", sorted(ROW_EDITS))
def test_a_resigned_record_row_is_refused_naming_the_file_that_holds_it(saved_run, tmp_path, name, version):
    """A row that cannot continue the run, re-signed: in version 3 in the records file (its digest recomputed
    in the checkpoint), named; in version 2 inside the checkpoint, which is named."""
    _, data = saved_run
    rows = saved_rows()
    forged, files = with_rows(data, rows, version)
    honest = copy_to(tmp_path, forged, records=files)
    assert checkpoint.read(honest).records == rows  # the forging is honest; version 2 reads no file
    edit, says = ROW_EDITS[name]
    edit(rows)
    forged, files = with_rows(data, rows, version)
    path = copy_to(tmp_path, forged, records=files)
    named = path if version == 2 else os.path.join(os.path.dirname(path), r"\w+\.jsonl")
    with pytest.raises(checkpoint.CheckpointError, match=f"resume-from: '{named}' .*{says}"):
        checkpoint.read(path)


@pytest.mark.integration
def test_an_edited_truncated_or_missing_records_file_is_refused_naming_it(saved_run, tmp_path):
    """The checkpoint counts rounds.jsonl's rows and holds their SHA-256: a file that lost, changed or reordered
    a row is refused as a damaged segment is, naming it; rows after the checkpoint's round are dropped."""
    _, data = saved_run
    rounds = RECORDS["rounds.jsonl"]
    lines = rounds.splitlines(keepends=True)
    assert len(lines) == 3
    flipped = bytearray(rounds)
    flipped[len(lines[0]) + 5] ^= 0x01  # a byte of round 1's row
    refused = {
        "missing": ({}, "is missing: '.*' was written after its first 3 rows; copy the run's records"),
        "emptied": ({"rounds.jsonl": b""}, "holds 0 complete rows, but '.*' was written after its first 3: the file"),
        "last row cut": ({"rounds.jsonl": rounds[:-10]}, "holds 2 complete rows, but"),
        "a row dropped": ({"rounds.jsonl": lines[0] + lines[2]}, "holds 2 complete rows, but"),
        "a byte flipped": ({"rounds.jsonl": bytes(flipped)}, "fails its SHA-256 check: its first 3 rows are not"),
        "rows swapped": ({"rounds.jsonl": lines[0] + lines[2] + lines[1]}, "fails its SHA-256 check"),
        "a folder": ({"rounds.jsonl": None}, "is missing"),
    }
    for name, (files, says) in refused.items():
        path = copy_to(tmp_path, data, records={n: b for n, b in files.items() if b is not None})
        if None in files.values():
            os.mkdir(os.path.join(os.path.dirname(path), "rounds.jsonl"))
        with pytest.raises(checkpoint.CheckpointError, match=f"resume-from: '.*/copy/rounds.jsonl' {says}"):
            checkpoint.read(path)
        assert checkpoint.main([path]) == 1, name
        shutil.rmtree(os.path.dirname(path))
    later = rounds + jsonl_line(row(3)) + b'{"round": 4, "bytes'  # a round whose checkpoint never followed
    state = checkpoint.read(copy_to(tmp_path, data, records={"rounds.jsonl": later}))
    assert state.round == 2 and state.records == saved_rows()


@pytest.mark.unit
def test_the_checkpoint_does_not_grow_with_the_records(tmp_path):
    """The checkpoint keeps each records file's row count and digest, not its rows: after 50 rounds it is the
    size it was after 5 (a few more digits), and the rows read back from the files beside it are the rows."""
    sizes = {}
    for rounds in (5, 50):
        rec = RunRecorder(str(tmp_path), f"run-{rounds}", {"method": "fedtt-plus"})
        rec.end_round(0, {"accuracy": 0.5, "loss": 0.7})
        for t in range(1, rounds + 1):
            rec.begin_round(t)
            rec.add_replies(1000 + t, [{"train-seconds": 0.1 * t, "peak-rss-mb": 300.0}], 0, 0)
            rec.add_record("fedtt-selection", {"round": t, "numbers": 96, "cores": [{"adapter": 0, "core": t % 3}]})
            rec.end_round(t, {"accuracy": 0.5 + t / 1000, "loss": 0.7})
        assert rec.digests() == {name: records_digest(rows) for name, rows in rec.records().items()}
        path = os.path.join(rec.dir, checkpoint.FILENAME)
        checkpoint.write(path, checkpoint.ServerState(rounds, {"method": "fedtt-plus"}, {}, {}, written=rec.digests()))
        sizes[rounds] = os.path.getsize(path)
        assert checkpoint.read(path).records == rec.records()
    assert sizes[50] - sizes[5] <= 8, sizes


STRATEGY_EDITS = {  # edits of a FedKSeed checkpoint's strategy state, refused when the run resumes from it
    "no digest": (lambda s: s["strategy"].pop("digest"), "lacks 'digest'"),
    "digest of strings": (lambda s: s["strategy"].update(digest={"w": ["1", "2"]}), "'digest' is not"),
    "rng a string": (lambda s: s["strategy"].update(rng="state"), "'rng' is not a client-sampling RNG state"),
    "rng word negative": (lambda s: s["strategy"]["rng"][1].__setitem__(0, -1), "'rng' is not"),
    "rng version 2": (lambda s: s["strategy"]["rng"].__setitem__(0, 2), "'rng' is not"),
    "rng position 999": (lambda s: s["strategy"]["rng"][1].__setitem__(624, 999), "'rng' is not"),
    "no rng": (lambda s: s["strategy"].pop("rng"), "lacks 'rng'"),
    "node-round of strings": (lambda s: s["strategy"].update({"node-round": {"x": "1"}}), "'node-round' is not"),
    "instruction a list (version 1)": (lambda s: s["strategy"].update(instruction=[1]), "'instruction' is not"),
}


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(STRATEGY_EDITS))
def test_a_resigned_strategy_state_is_refused_when_resuming(saved_run, tiny_bert, glue_dir, tmp_path, name):
    _, data = saved_run
    edit, says = STRATEGY_EDITS[name]
    path = copy_to(tmp_path, resigned(data, edit))
    cfg = make_cfg("fedkseed", tiny_bert, glue_dir, tmp_path, **{"num-server-rounds": 3, "resume-from": path})
    with pytest.raises(checkpoint.CheckpointError, match=f"resume-from: '{path}': .*{says}"):
        run(InProcessGrid(cfg, 2, NODES), cfg, 2)


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_every_methods_strategy_refuses_a_bad_rng_state_with_the_checkpoint_error(
    method, tiny_bert, glue_dir, tmp_path
):
    """For every method: its own state (as written at round 0) with the sampling RNG broken among honest fields,
    and FedTT+'s scores naming a core the model does not have; the error names the file."""
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"run-name": "bad"})
    setup = build_setup(cfg, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    tensors, state = setup.strategy.state_dict()
    tensors = {k: checkpoint._numpy(v) for k, v in tensors.items()}  # as read back from the file
    edits = [("rng", [3, [0] * 624 + [625], None])]
    if method == "fedtt-plus":
        edits.append(("scores", [[99, "down", 0, 1.0]]))
    for key, value in edits:
        saved = checkpoint.ServerState(0, cfg.to_flat(), tensors, {**state, key: value}, {}, path="/x/ckpt")
        with pytest.raises(checkpoint.CheckpointError, match=f"resume-from: '/x/ckpt': .*'{key}' is not"):
            resume(build_setup(cfg, RunRecorder(str(tmp_path / key), method, cfg.to_flat())), saved, 0)


@pytest.mark.integration
@pytest.mark.parametrize("value", [1e30, -1e30, float("nan")])
@pytest.mark.parametrize("method", ["fedavg", "fedavg-lora", "fedtt", "fedtt-plus"])
def test_a_checkpoint_is_held_to_the_bounds_of_a_reply(method, value, tiny_bert, glue_dir, tmp_path):
    """A checkpoint edited with its checksum recomputed (checkpoint.write computes it) to hold 1e30 or NaN in a
    FedTT core or a FedAvg weight reads back whole, and resuming from it is refused with the checkpoint error
    naming the file and the tensor: its values are held to the bound and finiteness of a reply's."""
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"run-name": "poisoned"})
    setup = build_setup(cfg, RunRecorder(str(tmp_path / "build"), method, cfg.to_flat()))
    tensors, state = setup.strategy.state_dict()
    tensors = {k: checkpoint._numpy(v).copy() for k, v in tensors.items()}
    name = sorted(k for k in tensors if not method.startswith("fedtt") or k.startswith("cores/"))[0]
    tensors[name].flat[0] = value
    path = str(tmp_path / "ckpt" / checkpoint.FILENAME)
    rows = [row(0), row(1)]
    checkpoint.write(path, checkpoint.ServerState(1, cfg.to_flat(), tensors, state, {"rounds": rows}))
    write_rows(os.path.dirname(path), {"rounds": rows})
    saved = checkpoint.read(path)  # its checksum holds: only the bound can refuse it
    says = "expected finite float32" if np.isnan(value) else "above the bound 2000"
    with pytest.raises(checkpoint.CheckpointError, match=re.escape(f"resume-from: '{path}': ") + f".*'{name}'.*{says}"):
        resume(build_setup(cfg, RunRecorder(str(tmp_path / "again"), method, cfg.to_flat())), saved, 0)
    if method == "fedtt-plus":  # and FedTT+'s scores to a reply's range
        core = next(iter(setup.strategy.shapes))
        saved.tensors = {k: checkpoint._numpy(v) for k, v in setup.strategy.state_dict()[0].items()}
        saved.strategy = {**state, "scores": [[*core, value]]}
        with pytest.raises(checkpoint.CheckpointError, match="'scores' is not"):
            resume(build_setup(cfg, RunRecorder(str(tmp_path / "scores"), method, cfg.to_flat())), saved, 0)


# --- the update log beside the checkpoint -----------------------------------------------------------------

LOG_METHODS = ["fedkrso", "fedspzo", "fedkseed"]


@pytest.mark.integration
@pytest.mark.parametrize("method", LOG_METHODS)
def test_bytes_written_per_round_do_not_grow_with_the_round(method, tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Each round writes its own segment and the small checkpoint, never the log so far nor the records so far
    (their rows are in rounds.jsonl, appended a row a round; the checkpoint counts them and holds their digest):
    round 10 writes about what round 1 wrote, and the checkpoint itself changes by a few bytes at most."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    writes: list[tuple[str, int]] = []
    real = checkpoint.replace_file

    def counted(path, data):
        writes.append((os.path.basename(path), len(data)))
        real(path, data)

    monkeypatch.setattr(checkpoint, "replace_file", counted)
    records, _ = run_to(method, tiny_bert, glue_dir, tmp_path, 1, 10, "long")
    per_round, segments, current = [], [], 0
    for name, n in writes:
        current += n
        if name == checkpoint.FILENAME:
            per_round.append(current)
            current = 0
        else:
            segments.append(n)
    assert len(per_round) == len(segments) == 10  # one segment and one checkpoint a round, each written once
    assert max(segments) <= 2 * min(segments)  # a segment is one round's entry (FedKSeed's may be sparse)
    assert per_round[9] <= 2 * per_round[0], per_round
    sizes = [n for name, n in writes if name == checkpoint.FILENAME]
    assert max(sizes) - min(sizes) <= CHECKPOINT_JITTER, sizes
    assert sorted(os.listdir(os.path.join(records, checkpoint.LOG_DIR))) == [
        f"round-{t:06d}.safetensors" for t in range(1, 11)
    ]
    assert checkpoint.read(records).round == 10 and len(checkpoint.read(records).log) == 10


# What a checkpoint's size may vary by from round to round: the digits of numbers in its JSON state (the round,
# the sampling RNG's 624 words, the node-round map, the model digest's floats), never a row or an entry a round.
CHECKPOINT_JITTER = 256


def segment_name(t: int) -> str:
    return f"round-{t:06d}.safetensors"


@pytest.mark.integration
def test_a_damaged_segment_is_refused_naming_it(saved_run, tmp_path):
    _, data = saved_run
    for t in (1, 2):
        seg = SEGMENTS[segment_name(t)]
        header_end = 8 + int.from_bytes(seg[:8], "little")
        for pos in (40, header_end - 3, len(seg) - 1):  # metadata, tensor header, numbers
            bad = bytearray(seg)
            bad[pos] ^= 0x01
            path = copy_to(tmp_path, data, {**SEGMENTS, segment_name(t): bytes(bad)})
            with pytest.raises(
                checkpoint.CheckpointError, match=f"'.*/log/{segment_name(t)}' .*(SHA-256|torn|round|not an)"
            ):
                checkpoint.read(path)
        path = copy_to(tmp_path, data, {**SEGMENTS, segment_name(t): seg[: len(seg) // 2]})
        with pytest.raises(checkpoint.CheckpointError, match=f"{segment_name(t)}' is torn"):
            checkpoint.read(path)


@pytest.mark.integration
def test_a_missing_segment_is_refused_naming_it(saved_run, tmp_path):
    _, data = saved_run
    for t in (1, 2):
        path = copy_to(tmp_path, data, {n: s for n, s in SEGMENTS.items() if n != segment_name(t)})
        with pytest.raises(checkpoint.CheckpointError, match=f"{segment_name(t)}' is missing"):
            checkpoint.read(path)


@pytest.mark.integration
def test_reordered_segments_are_refused(saved_run, tmp_path):
    _, data = saved_run
    one, two = SEGMENTS[segment_name(1)], SEGMENTS[segment_name(2)]
    path = copy_to(tmp_path, data, {segment_name(1): two, segment_name(2): one})
    with pytest.raises(checkpoint.CheckpointError, match=f"{segment_name(1)}' holds round '2', not round 1"):
        checkpoint.read(path)


@pytest.mark.integration
def test_a_segment_from_another_log_is_refused_by_the_chain(saved_run, tmp_path):
    """Segments re-signed as someone who knows the format would: a round-2 entry that does not follow this
    log's round 1 breaks the chain; a whole log that is not the one the checkpoint names breaks its head."""
    from safetensors.numpy import load

    _, data = saved_run

    def forged(t, previous, scale=2.0):
        seg = SEGMENTS[segment_name(t)]
        meta = json.loads(seg[8 : 8 + int.from_bytes(seg[:8], "little")])["__metadata__"]
        tensors = {k: (v * scale if v.dtype == np.float32 else v) for k, v in load(seg).items()}
        configs = json.loads(meta["configs"])
        return checkpoint.write_segment(str(tmp_path / "forge"), t, tensors, configs, previous)

    forged(2, "1" * 64)
    path = copy_to(tmp_path, data, {**SEGMENTS, segment_name(2): (tmp_path / "forge" / segment_name(2)).read_bytes()})
    with pytest.raises(checkpoint.CheckpointError, match=f"{segment_name(2)}' does not follow the segment of round 1"):
        checkpoint.read(path)
    head = forged(2, forged(1, checkpoint.GENESIS))
    forged_log = {n: (tmp_path / "forge" / n).read_bytes() for n in (segment_name(1), segment_name(2))}
    assert head != checkpoint.read(copy_to(tmp_path, data)).strategy[checkpoint.LOG_HEAD]
    with pytest.raises(checkpoint.CheckpointError, match="are not the ones of this checkpoint"):
        checkpoint.read(copy_to(tmp_path, data, forged_log))


@pytest.mark.integration
def test_a_segment_after_the_checkpoints_round_is_ignored_and_written_again(
    saved_run, tiny_bert, glue_dir, tmp_path, monkeypatch
):
    """A crash between writing round 3's segment and its checkpoint: the checkpoint says round 2, the stray
    segment 3 and the stray row 3 of rounds.jsonl are not read, and the resumed run's round 3 replaces them."""
    _, data = saved_run
    stray = {"rounds.jsonl": RECORDS["rounds.jsonl"] + jsonl_line({**row(3), "clients": 99}) + b'{"round": 4, "by'}
    path = copy_to(tmp_path, data, {**SEGMENTS, segment_name(3): b"half a segment"}, records=stray)
    assert checkpoint.read(path).round == 2
    records = os.path.dirname(path)
    cfg = make_cfg(
        "fedkseed", tiny_bert, glue_dir, tmp_path,
        **{"num-server-rounds": 3, "results-dir": os.path.dirname(records), "run-name": "copy", "resume-from": records},
    )  # fmt: skip
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    run(InProcessGrid(cfg, 2, NODES), cfg, 2)
    state = checkpoint.read(records)
    assert state.round == 3 and [s.round for s in state.log] == [1, 2, 3]
    assert [r["round"] for r in state.records["rounds"]] == [0, 1, 2, 3] and state.records["rounds"][3]["clients"] == 2
    assert Path(records, "rounds.jsonl").read_bytes().startswith(RECORDS["rounds.jsonl"])  # rows 0..2 as they were
    for t in (1, 2):  # resumed in place: the segments it had are not written again
        assert Path(records, checkpoint.LOG_DIR, segment_name(t)).read_bytes() == SEGMENTS[segment_name(t)]


def as_older_version(version, records, method, tiny_bert, glue_dir, tmp_path) -> str:
    """The checkpoint at `records` as an older version wrote it, alone in a folder (no records files beside it):
    version 2 with the records' rows in its state and the log's segments beside it; version 1 with the rows and
    the whole log inside, as the instruction of round T+1 carrying rounds 1..T with its ConfigRecords under
    "instruction", and no segments."""
    state = checkpoint.read(records)
    folder = tmp_path / f"version-{version}"
    path = str(folder / checkpoint.FILENAME)
    if version == 2:
        if os.path.isdir(checkpoint.log_dir(state.path)):
            shutil.copytree(checkpoint.log_dir(state.path), folder / checkpoint.LOG_DIR)
        data = resigned(Path(state.path).read_bytes(), rows_inside(state.records), version=2)
        folder.mkdir(exist_ok=True)
        Path(path).write_bytes(data)
        return path
    cfg = make_cfg(method, tiny_bert, glue_dir, tmp_path, **{"run-name": "rebuild"})
    setup = build_setup(cfg, RunRecorder(str(tmp_path / "rebuild"), method, cfg.to_flat()))
    resume(setup, state, run_id=state.run_id)
    s = setup.strategy
    tensors, configs = records_to_state(s.instruction(len(s.log) + 1, s.log))
    strategy = {k: v for k, v in state.strategy.items() if k != checkpoint.LOG_HEAD}
    strategy["instruction"] = configs
    staged = str(tmp_path / "staged" / checkpoint.FILENAME)
    checkpoint.write(staged, checkpoint.ServerState(state.round, state.config, tensors, strategy, run_id=state.run_id))
    folder.mkdir()
    Path(path).write_bytes(resigned(Path(staged).read_bytes(), rows_inside(state.records), version=1))
    return path


@pytest.mark.integration
@pytest.mark.parametrize("method, version", [("fedkrso", 1), ("fedspzo", 1), ("fedkseed", 2), ("fedtt-plus", 2)])
def test_an_older_checkpoint_still_resumes_exactly(method, version, tiny_bert, glue_dir, tmp_path, monkeypatch):
    """Versions 1 and 2 (the records' rows inside the checkpoint, rewritten every round; version 1 with the log
    inside too) resume from the file alone, and the run continues in version 3 in its own folder."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    full, _ = run_to(method, tiny_bert, glue_dir, tmp_path, 1, 3, "full")
    part, _ = run_to(method, tiny_bert, glue_dir, tmp_path, 2, 2, "part")
    old = as_older_version(version, part, method, tiny_bert, glue_dir, tmp_path)
    data = Path(old).read_bytes()
    assert json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])["__metadata__"]["version"] == str(version)
    assert not [n for n in os.listdir(os.path.dirname(old)) if n.endswith(".jsonl")]
    assert (checkpoint.read(old).log is None) == (version == 1 or method == "fedtt-plus")
    resumed, _ = run_to(method, tiny_bert, glue_dir, tmp_path, 3, 3, "resumed", **{"resume-from": old})
    a = server_model(method, tiny_bert, glue_dir, tmp_path, full)
    b = server_model(method, tiny_bert, glue_dir, tmp_path, resumed)  # version 3, with its own segments 1..3
    for name, t in a.items():
        torch.testing.assert_close(b[name], t, rtol=0, atol=1e-6, msg=name)
    assert read_jsonl(os.path.join(resumed, "rounds.jsonl"))[:3] == read_jsonl(os.path.join(part, "rounds.jsonl"))
    if method == "fedtt-plus":
        sel = read_jsonl(os.path.join(resumed, "fedtt-selection.jsonl"))
        assert sel == read_jsonl(os.path.join(full, "fedtt-selection.jsonl")) and len(sel) == 3
        return
    assert [s.round for s in checkpoint.read(resumed).log] == [1, 2, 3]
    written, held = checkpoint.read(resumed).log, checkpoint.read(part).log
    assert [s.digest for s in written[:2]] == [s.digest for s in held]  # the log it held, written again in its folder


@pytest.fixture
def small_disk(tmp_path):
    """A real file system of 8 MB (tmpfs), unmounted afterwards; skipped where mounting needs a root we are not."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def fill(folder: Path) -> Path:
    """Write a file into `folder` until its file system is full; returns it (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)
    return filler


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fedkseed", "fedtt"])
def test_a_full_disk_stops_the_run_with_its_resume_and_the_resumed_run_completes(
    method, tiny_bert, glue_dir, tmp_path, small_disk, monkeypatch
):
    """The results folder's disk fills after round 1's checkpoint: the run stops in round 2 with DiskFull, which
    names the file, says the checkpoint of round 1 is whole and gives the resume-from to use; no partial row and
    no temporary file are left. With space freed, the resume runs rounds 2..3 and ends as an uninterrupted run."""
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    full, _ = run_to(method, tiny_bert, glue_dir, tmp_path, 1, 3, "full")
    real_write, filler = checkpoint.write, []

    def write_then_fill(path, state):
        real_write(path, state)
        if state.round == 1:
            filler.append(fill(small_disk))

    disk = {"results-dir": str(small_disk / "results")}
    with monkeypatch.context() as m:
        m.setattr(checkpoint, "write", write_then_fill)
        with pytest.raises(
            DiskFull,
            match=r"no space left on the device to write .* needed, .* free there now.* checkpoint of round 1 is whole",
        ) as err:
            run_to(method, tiny_bert, glue_dir, tmp_path, 2, 3, "filled", **disk)
    records = small_disk / "results" / "filled"
    assert f"resume-from='{records}'" in str(err.value), err.value
    assert checkpoint.read(str(records)).round == 1
    assert not [p for p in records.rglob("*.tmp")]
    assert all(line.endswith(b"\n") for line in (records / "rounds.jsonl").read_bytes().splitlines(keepends=True))
    filler[0].unlink()
    run_to(method, tiny_bert, glue_dir, tmp_path, 3, 3, "filled", **disk, **{"resume-from": str(records)})
    rows, rows_full = read_jsonl(records / "rounds.jsonl"), read_jsonl(os.path.join(full, "rounds.jsonl"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and checkpoint.read(str(records)).round == 3
    for r, f in zip(rows, rows_full, strict=True):
        assert r["clients"] == f["clients"] and r["accuracy"] == pytest.approx(f["accuracy"], abs=1e-6)
