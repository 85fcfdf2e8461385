"""The node's state file verifies or counts as absent: flipped bits, a round label changed, a NaN under a
recomputed checksum, a truncated file. Unit tests on NodeStore, then the whole protocol: a node whose state is
damaged answers sync-only, gets the whole log and ends equal to the server (FedSPZO, FedKSeed here; FedKRSO in
tests/test_krso_protocol.py, with a wiped disk)."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from common.files import DiskFull
from common.nodestore import (
    CHECKSUM,
    STATE_DIR_ENV,
    NodeStore,
    reach_round,
    safetensors_parts,
    state_checksum,
    state_dir,
)
from common.wire import WireError

DAMAGE = ["bit", "round", "nan", "truncate", "older", "empty", "torn"]  # empty, torn: what a power cut can leave
WRONG_KIND = {  # something other than a file where the state file belongs
    "folder": lambda path: os.makedirs(os.path.join(path, "inside")),
    "pipe": os.mkfifo,  # reading it would block the node forever
    "link to a folder": lambda path: (os.makedirs(path + "-target"), os.symlink(path + "-target", path)),
}


def damage(path: str, how: str) -> None:
    """Damage a state file the way a disk, a hand or a hostile process might."""
    if how in WRONG_KIND:
        os.remove(path)
        WRONG_KIND[how](path)
        return
    if how == "bit":  # one flipped bit in the last tensor's data
        with open(path, "rb+") as f:
            data = bytearray(f.read())
            data[-3] ^= 0x10
            f.seek(0)
            f.write(bytes(data))
        return
    if how == "empty":  # the rename reached the disk, the data did not (the state is not fsynced)
        open(path, "wb").close()
        return
    if how == "torn":  # the header and the first pages written back, the rest still zero
        size = os.path.getsize(path)
        with open(path, "rb+") as f:
            f.seek(size - 8)
            f.write(bytes(8))
        return
    if how == "truncate":
        size = os.path.getsize(path)
        with open(path, "rb+") as f:
            f.truncate(size // 2)
        return
    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    if how == "round":  # the round label off by one, the old checksum kept
        meta["round"] = str(int(meta["round"]) - 1)
    elif how == "nan":  # a NaN with a header recomputed to match it
        name = sorted(tensors)[0]
        tensors[name].view(-1)[0] = float("nan")
        meta[CHECKSUM] = state_checksum(tensors, int(meta["round"]), meta["fingerprint"])
    elif how == "older":  # a state as the version before this checksum wrote it (a SHA-256 under "sha256")
        meta["sha256"] = meta.pop(CHECKSUM)
    save_file(tensors, path, metadata=meta)


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"a.weight": torch.randn(4, 3, generator=g), "b.weight": torch.randn(5, generator=g)}


@pytest.mark.unit
def test_state_round_trips_with_its_checksum(tmp_path):
    store = NodeStore(str(tmp_path), "s", "fp")
    saved = _tensors(0)
    store.save(saved, 7)
    loaded = _tensors(1)
    assert store.load(loaded) == 7
    for n, t in saved.items():
        assert torch.equal(loaded[n], t)
    with safe_open(store.path, "pt") as f:
        assert f.metadata()[CHECKSUM] == state_checksum(saved, 7, "fp")
    assert state_checksum(saved, 6, "fp") != state_checksum(saved, 7, "fp")
    assert state_checksum(saved, 7, "fp") != state_checksum(saved, 7, "other")


@pytest.mark.unit
def test_the_state_is_not_fsynced_and_the_server_records_are(tmp_path, monkeypatch):
    """A node's state is a cache the log rebuilds, checked whole when read (the "empty" and "torn" cases above:
    what a power cut can leave of an unsynced write), so its write skips both fsyncs; every other file that
    replace_file writes (checkpoints, records) is still forced to the disk."""
    from common import files

    synced = []
    monkeypatch.setattr(files.os, "fsync", lambda fd: synced.append(fd))
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 3)
    assert synced == []
    loaded = _tensors(1)
    assert store.load(loaded) == 3 and torch.equal(loaded["a.weight"], _tensors(0)["a.weight"])
    files.replace_file(str(tmp_path / "record.json"), b"{}")
    assert len(synced) == 2  # the file, then its folder


@pytest.mark.unit
@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_state_counts_as_absent_and_is_never_used(how, tmp_path, caplog):
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 3)
    damage(store.path, how)
    fresh = _tensors(1)
    before = {n: t.clone() for n, t in fresh.items()}
    with caplog.at_level(logging.WARNING, logger="common.nodestore"):
        assert store.load(fresh) == 0
    assert all(torch.equal(fresh[n], before[n]) for n in fresh)  # nothing copied from the damaged file
    assert "discarded" in caplog.text and store.path in caplog.text


@pytest.mark.unit
def test_damaged_state_makes_the_node_ask_for_the_whole_log(tmp_path):
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 2)
    damage(store.path, "bit")
    applied = []
    assert reach_round(store, _tensors(1), 3, [Entry(3)], applied.append) == (False, 0)  # sync-only, round 0
    assert applied == []
    ok, reached = reach_round(store, _tensors(1), 4, [Entry(1), Entry(2), Entry(3)], lambda e: applied.append(e.round))
    assert (ok, reached, applied) == (True, 3, [1, 2, 3])
    assert store.load(_tensors(2)) == 3


class Entry:
    def __init__(self, r):
        self.round = r


@pytest.mark.unit
@pytest.mark.parametrize("how", sorted(WRONG_KIND))
def test_a_state_path_of_the_wrong_kind_is_moved_aside_and_counts_as_absent(how, tmp_path, caplog):
    """Not a damaged file but no file at all: it must not raise every round (IsADirectoryError), nor block on
    a pipe. It is moved aside (kept), counts as absent, and the node's next save and load work again."""
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 2)
    damage(store.path, how)
    with caplog.at_level(logging.WARNING, logger="common.files"):
        assert reach_round(store, _tensors(1), 3, [Entry(2)], lambda e: None) == (False, 0)  # sync-only
    assert "moved aside" in caplog.text and not os.path.lexists(store.path)
    assert any(name.startswith("s.safetensors.aside-") for name in os.listdir(tmp_path))
    assert reach_round(store, _tensors(1), 3, [Entry(1), Entry(2)], lambda e: None) == (True, 2)
    assert store.load(_tensors(1)) == 2


@pytest.mark.unit
def test_a_node_folder_that_is_a_file_is_moved_aside(tmp_path):
    folder = tmp_path / "node-7"
    folder.write_text("not a folder")
    store = NodeStore(str(folder), "s", "fp")
    assert store.load(_tensors(1)) == 0
    store.save(_tensors(0), 1)
    assert store.load(_tensors(1)) == 1
    assert [p.read_text() for p in tmp_path.glob("node-7.aside-*")] == ["not a folder"]


@pytest.mark.unit
def test_a_link_planted_at_the_temporary_file_is_not_followed(tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    store = NodeStore(str(tmp_path / "node"), "s", "fp")
    os.makedirs(tmp_path / "node")
    os.symlink(victim, store.path + ".tmp")
    store.save(_tensors(0), 4)
    assert victim.read_bytes() == b"precious" and store.load(_tensors(1)) == 4
    assert not os.path.lexists(store.path + ".tmp")


@pytest.mark.unit
def test_a_state_past_the_servers_round_is_ignored_and_kept_until_the_whole_log_replaces_it(tmp_path):
    """The server went back (or an instruction lies about the round): the node asks for the whole log, and an
    instruction alone never deletes its state; the file changes only when the log rebuilds round T-1."""
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 5)
    saved = Path(store.path).read_bytes()
    assert reach_round(store, _tensors(1), 3, [Entry(2)], lambda e: None) == (False, 0)
    assert Path(store.path).read_bytes() == saved
    assert reach_round(store, _tensors(1), 3, [Entry(1), Entry(2)], lambda e: None) == (True, 2)
    assert store.load(_tensors(1)) == 2
    assert os.listdir(tmp_path) == ["s.safetensors"]  # no temporary file left behind


@pytest.mark.unit
def test_a_log_that_makes_the_model_non_finite_is_refused_and_nothing_is_saved(tmp_path):
    store = NodeStore(str(tmp_path), "s", "fp")
    store.save(_tensors(0), 1)
    saved = Path(store.path).read_bytes()

    def poison(entry):
        if entry.round == 3:
            tensors["b.weight"].mul_(float("inf"))

    tensors = _tensors(1)
    with pytest.raises(WireError, match="non-finite"):
        reach_round(store, tensors, 4, [Entry(2), Entry(3)], poison)
    assert Path(store.path).read_bytes() == saved


@pytest.mark.integration
@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("how", [*DAMAGE, "folder"])
@pytest.mark.parametrize("method", ["fedspzo", "fedkseed"])
def test_zero_order_node_with_damaged_state_resyncs_to_the_server(
    method, how, tiny_bert, glue_dir, tmp_path, monkeypatch
):
    from common.zeroorder import fingerprint
    from tests.test_zo_protocol import assert_same, make, run_round, stored

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    cfg, model, strategy = make(method, tiny_bert, glue_dir, tmp_path)
    run_round(strategy, cfg, 1, [101, 102])
    run_round(strategy, cfg, 2, [101, 102])
    damage(NodeStore(state_dir({}, 1, 102), f"{method}-state", fingerprint(cfg, method)).path, how)
    assert run_round(strategy, cfg, 3, [101, 102])["clients"] == 1
    assert strategy.node_round[102] == 0
    server_at_3 = {n: p.clone() for n, p in model.params.items()}
    assert run_round(strategy, cfg, 4, [102])["clients"] == 1  # 102 rebuilt round 3 from the whole log, trained
    reached, params = stored(cfg, 102)
    assert reached == 3
    assert_same(params, server_at_3)


@pytest.mark.unit
def test_the_state_file_is_the_safetensors_format_the_library_reads(tmp_path):
    """safetensors_parts writes the file by hand (no whole copy first): the library must read back every dtype,
    shape and value, and the metadata; its own writer's bytes are the same tensors."""
    g = torch.Generator().manual_seed(3)
    tensors = {
        "w": torch.randn(7, 5, generator=g),
        "half": torch.randn(3, generator=g).to(torch.bfloat16),
        "h16": torch.randn(2, 2, generator=g).to(torch.float16),
        "d": torch.randn(3, generator=g).double(),
        "i": torch.arange(-3, 4),
        "u": torch.arange(5, dtype=torch.uint8),
        "b": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
        "strided": torch.randn(4, 6, generator=g)[:, ::2],  # not contiguous: written as its values
    }
    path = tmp_path / "x.safetensors"
    path.write_bytes(b"".join(bytes(p) for p in safetensors_parts(tensors, {"round": "3", "k": "v"})))
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and back[n].shape == t.shape and torch.equal(back[n], t), n
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"round": "3", "k": "v"}
    header = int.from_bytes(path.read_bytes()[:8], "little")
    assert header % 8 == 0


@pytest.mark.unit
def test_a_full_disk_keeps_the_previous_state_and_says_so(tmp_path):
    """A node whose disk fills while it saves its state: DiskFull names the file and the free space, the previous
    state still loads, and no partial temporary file is left. A real full file system (a 1 MB tmpfs)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode:
        pytest.skip("mounting a small tmpfs needs root")
    try:
        store = NodeStore(str(mount), "s", "fp")
        small = {"w": torch.ones(1000)}
        store.save(small, 4)
        with pytest.raises(
            DiskFull,
            match=r"no space left .*s\.safetensors' \(2.3 MB needed, .* free there now\).*previous file is kept",
        ):
            store.save({"w": torch.zeros(600_000)}, 5)  # 2.4 MB: does not fit
        assert not os.path.exists(store.path + ".tmp")
        back = {"w": torch.zeros(1000)}
        assert store.load(back) == 4 and torch.equal(back["w"], small["w"])
    finally:
        subprocess.run(["umount", str(mount)], check=True)


@pytest.mark.unit
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_finds_one_bad_value_anywhere(value, dtype):
    from common.nodestore import all_finite

    t = torch.randn(37, 11).to(dtype)
    assert all_finite(t) and all_finite(torch.empty(0)) and all_finite(torch.arange(5))
    for where in (0, 200, t.numel() - 1):
        bad = t.clone()
        bad.view(-1)[where] = value
        assert not all_finite(bad)
        assert not all_finite(bad.t())  # a view that is not contiguous
