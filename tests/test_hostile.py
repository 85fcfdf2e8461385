"""Hostile replies (issue 10, server side): one hostile node among honest ones, through the real strategies.

Every method's server runs as in a deployment (common SETUPS, the strategy's configure_train and
aggregate_train); the honest nodes are the real client code on the tiny models of conftest.py; the hostile
node 103 starts from its own honest reply and breaks one thing in it. A run "without the attacker" is the
same run in which node 103 never answers. Stated distances: a rejected reply leaves the global model
EXACTLY (bit for bit) where the run without the attacker puts it.
"""

from __future__ import annotations

import importlib
import io
import math
import os

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Message, MetricRecord, RecordDict
from numpy.lib import format as npy

from client_app.app import CLIENTS
from common.config import parse_run_config
from common.nodestore import STATE_DIR_ENV
from common.records import RunRecorder
from common.wire import WireError, decode_array
from server_app.app import SETUPS
from tests.conftest import NodeList

pytestmark = pytest.mark.usefixtures("task_identity")

HONEST = {101: 0, 102: 1}
HOSTILE = 103
NODES = {**HONEST, HOSTILE: 2}
METHODS = ["fedkrso", "fedspzo", "fedkseed", "fedtt", "fedtt-plus", "fedavg", "fedavg-lora"]
MAIN_RECORD = {  # the record holding each method's update
    "fedkrso": "accumulators",
    "fedspzo": "scalars",
    "fedkseed": "scalars",
    "fedtt": "cores",
    "fedtt-plus": "cores",
    "fedavg": "arrays",
    "fedavg-lora": "arrays",
}


def make_cfg(method, model, glue_dir, tmp_path, name, **extra):
    return parse_run_config(
        {
            "method": method, "model": model, "task": "rte", "data-dir": glue_dir,
            "results-dir": str(tmp_path / "results"), "run-name": name, "train.local-steps": 2,
            "train.batch-size": 4, "train.max-length": 32, "train.lr": 1e-2, "krso.k": 2, "krso.rank": 4,
            "krso.intervals": 2, "zo.lr": 1e-2, "zo.eps": 1e-2, "spzo.split-layer": 1, "spzo.p1": 1, "spzo.p2": 2, "zo.params": "all",
            "kseed.k": 64, "tt.bottleneck": 8, "tt.rank": 3, "min-clients": 1, **extra,
        }
    )  # fmt: skip


class Run:
    """One method's server (its real strategy) and real clients; `run_id` keeps each run's node state apart."""

    runs = 0

    def __init__(self, method, model, glue_dir, tmp_path, **extra):
        Run.runs += 1
        self.run_id = Run.runs
        self.cfg = make_cfg(method, model, glue_dir, tmp_path, f"{method}-{self.run_id}", **extra)
        self.recorder = RunRecorder(self.cfg.results_dir, self.cfg.run_name, self.cfg.to_flat())
        self.setup = SETUPS[method](self.cfg, self.recorder)
        self.arrays = self.setup.initial
        self.client = importlib.import_module(CLIENTS[method]).train

    def instructions(self, rnd):
        msgs = self.setup.strategy.configure_train(rnd, self.arrays, ConfigRecord(), NodeList(NODES))
        return {m.metadata.dst_node_id: m for m in msgs}

    def reply(self, msg):
        node = msg.metadata.dst_node_id
        torch.manual_seed(node)  # dropout draws from torch's global generator: same instruction, same reply
        content = self.client(
            msg.content, self.cfg, {"partition-id": NODES[node], "num-partitions": 3}, self.run_id, node
        )
        return Message(content, reply_to=msg)

    def aggregate(self, rnd, replies):
        arrays, _ = self.setup.strategy.aggregate_train(rnd, replies)
        if arrays is not None and self.setup.load is not None:
            self.arrays = arrays
            self.setup.load(arrays)
        return self.recorder.end_round(rnd, None)

    def weights(self) -> torch.Tensor:
        """The whole global model, flattened (what the server would evaluate)."""
        return torch.cat([p.detach().reshape(-1).float() for p in self.setup.model.state_dict().values()])


def npy_bytes(descr: str, shape: tuple, payload: bytes, fortran: bool = False) -> bytes:
    buf = io.BytesIO()
    npy.write_array_header_1_0(buf, {"descr": descr, "fortran_order": fortran, "shape": shape})
    return buf.getvalue() + payload


def _floats(arr: Array) -> np.ndarray:
    return np.frombuffer(arr.data[-4 * math.prod(arr.shape) :], np.float32).reshape(arr.shape)


# Each kind replaces an Array by one whose metadata says "float32 of the right shape" and whose bytes do not.
MALFORMED = {
    "garbage": lambda a: os.urandom(len(a.data)),
    "float64 1e300": lambda a: npy_bytes("<f8", tuple(a.shape), np.full(a.shape, 1e300).tobytes()),
    "float16": lambda a: npy_bytes("<f2", tuple(a.shape), np.zeros(a.shape, np.float16).tobytes()),
    "int32 bytes": lambda a: npy_bytes("<i4", tuple(a.shape), np.ones(a.shape, np.int32).tobytes()),
    "big-endian": lambda a: npy_bytes(">f4", tuple(a.shape), _floats(a).astype(">f4").tobytes()),
    "object dtype": lambda a: npy_bytes("|O", tuple(a.shape), b"\0" * 8 * math.prod(a.shape)),
    "fewer elements": lambda a: npy_bytes("<f4", (math.prod(a.shape) - 1,), _floats(a).tobytes()[4:]),
    "truncated": lambda a: a.data[:-4],
    "fortran": lambda a: npy_bytes("<f4", tuple(a.shape), _floats(a).tobytes(), fortran=True),
    "terabyte header": lambda a: npy_bytes("<f4", (10**12,), _floats(a).tobytes()),
    "header of nonsense": lambda a: b"\x93NUMPY\x01\x00" + (120).to_bytes(2, "little") + b"{" * 120,
}


def _with_data(a: Array, data: bytes, stype: str = "numpy.ndarray") -> Array:
    return Array(dtype=a.dtype, shape=tuple(a.shape), stype=stype, data=data)


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_decode_array_reads_what_the_bytes_are(kind):
    good = Array(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(decode_array("a", good, (2, 3)), np.arange(6).reshape(2, 3))
    with pytest.raises(WireError):
        decode_array("a", _with_data(good, MALFORMED[kind](good)), (2, 3))


def test_decode_array_refuses_metadata_and_storage_lies_and_bounds():
    good = Array(np.ones((2, 3), np.float32))
    for bad in (
        _with_data(good, good.data, stype="torch.Tensor"),
        Array(dtype="float32", shape=(10**6, 10**6), stype="numpy.ndarray", data=good.data),  # a terabyte shape
        Array(dtype="float64", shape=(2, 3), stype="numpy.ndarray", data=good.data),
    ):
        with pytest.raises(WireError):
            decode_array("a", bad, (2, 3))
    with pytest.raises(WireError, match="bound"):
        decode_array("a", Array(np.full((2, 3), 1e30, np.float32)), (2, 3), bound=1e3)
    index = Array(np.arange(4, dtype=np.int32))  # an index array whose bytes hold int64
    lie = _with_data(index, npy_bytes("<i8", (4,), np.arange(4, dtype=np.int64).tobytes()))
    with pytest.raises(WireError, match="bytes hold"):
        decode_array("index", lie, (4,), "int32")
    with pytest.raises(WireError, match="bytes"):  # more bytes than the shape can hold: refused before parsing
        decode_array("a", _with_data(good, good.data + b"\0" * 10**6), (2, 3))


def _first_float_array(content: RecordDict, method: str) -> str:
    rec = content[MAIN_RECORD[method]]
    return next(k for k in rec if rec[k].dtype == "float32" and math.prod(rec[k].shape) > 1)


def _attack_malformed(kind):
    def attack(content, method):
        rec = content[MAIN_RECORD[method]]
        key = _first_float_array(content, method)
        rec[key] = _with_data(rec[key], MALFORMED[kind](rec[key]))
        return content

    return attack


def _attack_index_bytes(content, method):  # FedKSeed's sparse index: metadata int32, bytes int64
    rec = content["scalars"]
    index = rec["index"]
    rec["index"] = _with_data(index, npy_bytes("<i8", tuple(index.shape), index.numpy().astype(np.int64).tobytes()))
    return content


def _attack_alias(content, method):  # "01/n" next to "1/n": one would silently overwrite the other
    rec = content["accumulators"]
    key = next(k for k in rec if k.startswith("1/"))
    rec["0" + key] = Array(np.full(tuple(rec[key].shape), 0.5, np.float32))
    return content


def _attack_other_stype(content, method):
    rec = content[MAIN_RECORD[method]]
    key = _first_float_array(content, method)
    rec[key] = _with_data(rec[key], rec[key].data, stype="torch.Tensor")
    return content


def _attack_oversize(content, method):  # one more array, larger than anything the method sends
    content[MAIN_RECORD[method]]["padding"] = Array(np.zeros(2_000_000, np.float32))
    return content


def _attack_renamed_record(content, method):
    content["renamed"] = content.pop(MAIN_RECORD[method])
    return content


def _attack_list_metric(content, method):
    content["metrics"]["train-loss"] = [0.1, 0.2]
    return content


def _attack_absurd(content, method):  # finite, representable in float32, and absurd
    rec = content[MAIN_RECORD[method]]
    key = _first_float_array(content, method)
    rec[key] = Array(np.full(tuple(rec[key].shape), 1e30, np.float32))
    return content


def _attack_metric(value):
    def attack(content, method):
        content["metrics"]["train-loss"] = value
        return content

    return attack


def _attack_examples(value):
    def attack(content, method):
        content["metrics"]["num-examples"] = value
        return content

    return attack


def _attack_round(delta):
    def attack(content, method):
        content["metrics"]["model-round"] = content["metrics"]["model-round"] + delta
        return content

    return attack


ATTACKS = {
    **{f"bytes: {k}": _attack_malformed(k) for k in MALFORMED},
    "other storage type": _attack_other_stype,
    "oversize": _attack_oversize,
    "renamed record": _attack_renamed_record,
    "list-valued metric": _attack_list_metric,
    "value 1e30": _attack_absurd,
    "train-loss inf": _attack_metric(float("inf")),
    "train-loss nan": _attack_metric(float("nan")),
    "train-loss 3e38": _attack_metric(3e38),
    "num-examples float": _attack_examples(1e12),
    "stale round": _attack_round(-1),
    "future round": _attack_round(+1),
}


def _attack_scores(value):
    def attack(content, method):
        scores = content["scores"]["scores"].numpy().copy()
        scores[0] = value
        content["scores"]["scores"] = Array(scores)
        return content

    return attack


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize("method", METHODS)
def test_one_hostile_node_sending_malformed_replies_changes_nothing(method, tiny_bert, glue_dir, tmp_path):
    """Each attack: a fresh server, the two honest replies plus the attacker's. The reply is rejected,
    the round goes on, and the global model is bit for bit that of the run without the attacker."""
    clean = Run(method, tiny_bert, glue_dir, tmp_path)
    msgs = clean.instructions(1)
    honest = [clean.reply(msgs[n]) for n in HONEST]
    assert clean.aggregate(1, honest)["clients"] == 2
    expected = clean.weights()
    attacks = dict(ATTACKS)
    if method == "fedkseed":
        attacks["index bytes"] = _attack_index_bytes
    if method == "fedkrso":
        attacks["aliased keys"] = _attack_alias
    if method == "fedtt-plus":
        attacks["score 3e38"] = _attack_scores(3e38)
    for name, attack in attacks.items():
        run = Run(method, tiny_bert, glue_dir, tmp_path)
        msgs = run.instructions(1)
        hostile = Message(attack(run.reply(msgs[HOSTILE]).content, method), reply_to=msgs[HOSTILE])
        rec = run.aggregate(
            1, [*[Message(h.content, reply_to=msgs[n]) for n, h in zip(HONEST, honest, strict=True)], hostile]
        )
        assert (rec["clients"], rec["rejected"]) == (2, 1), name
        assert torch.equal(run.weights(), expected), name


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize("method", ["fedavg", "fedkrso"])
def test_an_extra_metric_key_is_ignored_not_fatal(method, tiny_bert, glue_dir, tmp_path):
    """A newer client may add a metric: the reply is accepted and the key (even list-valued) ignored."""
    runs = [Run(method, tiny_bert, glue_dir, tmp_path) for _ in range(2)]
    msgs = runs[0].instructions(1)
    replies = [runs[0].reply(msgs[n]) for n in NODES]
    results = []
    for i, run in enumerate(runs):
        mine = run.instructions(1)
        contents = []
        for node, r in zip(NODES, replies, strict=True):
            content = RecordDict({k: v for k, v in r.content.items()})
            if i == 1 and node == HOSTILE:
                content["metrics"] = MetricRecord({**r.content["metrics"], "new-metric": [1.0, 2.0], "extra": 3})
            contents.append(Message(content, reply_to=mine[node]))
        assert run.aggregate(1, contents)["clients"] == 3
        results.append(run.weights())
    assert torch.equal(results[0], results[1])


def test_fedkrso_refuses_aliased_accumulator_keys():
    from common.fedkrso.wire import pack_reply, unpack_reply

    shapes = {"a.w": (3, 2)}
    reply = pack_reply({(1, "a.w"): torch.ones(3, 2)}, {}, {"num-examples": 4, "model-round": 0})
    reply["accumulators"]["01/a.w"] = Array(np.full((3, 2), 5.0, np.float32))
    with pytest.raises(WireError, match="01/a.w"):
        unpack_reply(reply, 1, 2, shapes, {})
    del reply["accumulators"]["01/a.w"]
    assert unpack_reply(reply, 1, 2, shapes, {}).accumulators[(1, "a.w")].sum() == 6
    reply["accumulators"]["+1/a.w"] = Array(np.ones((3, 2), np.float32))
    with pytest.raises(WireError):
        unpack_reply(reply, 1, 2, shapes, {})


def play(run, rounds, attack=None):
    """`rounds` rounds with the honest nodes, and node 103 answering through `attack` (never, if None)."""
    records = []
    for rnd in range(1, rounds + 1):
        msgs = run.instructions(rnd)
        replies = [run.reply(msgs[n]) for n in HONEST]
        if attack is not None:
            replies.append(Message(attack(run.reply(msgs[HOSTILE]).content, run.cfg.method), reply_to=msgs[HOSTILE]))
        records.append(run.aggregate(rnd, replies))
    return records


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize("method", METHODS)
def test_a_claim_of_1e12_examples_weighs_at_most_the_cap(method, tiny_bert, glue_dir, tmp_path):
    """num-examples = 1e12 counts as aggregation.weight-cap (4) x the round's median count: the run is bit for
    bit the run in which the attacker claimed exactly that, over two rounds, and its share is at most 4/6."""
    claims = {}

    def claim(n):
        def attack(content, method):
            claims.setdefault(n, []).append(content["metrics"]["num-examples"])
            content["metrics"]["num-examples"] = n if n else 4 * sorted([*honest_counts, 10**12])[1]
            return content

        return attack

    probe = Run(method, tiny_bert, glue_dir, tmp_path)
    msgs = probe.instructions(1)
    honest_counts = [int(probe.reply(msgs[n]).content["metrics"]["num-examples"]) for n in HONEST]
    lying = Run(method, tiny_bert, glue_dir, tmp_path)
    records = play(lying, 2, claim(10**12))
    capped = Run(method, tiny_bert, glue_dir, tmp_path)
    play(capped, 2, claim(None))
    assert [r["clients"] for r in records] == [3, 3]  # accepted: the count is plausible as an int, only capped
    assert torch.isfinite(lying.weights()).all()
    assert torch.equal(lying.weights(), capped.weights())


def _scaled(factor):
    """Node 103 sends its honest reply's numbers x factor (kept just inside the value bounds): a plausible-looking
    reply that drags the model far away under the mean."""

    def attack(content, method):
        for rec_name in (MAIN_RECORD[method], "head"):
            if rec_name not in content:
                continue
            rec = content[rec_name]
            for key in list(rec.keys()):
                if rec[key].dtype == "float32":
                    bound = 0.9 * (5000.0 if method in ("fedspzo", "fedkseed") else 1e3)
                    rec[key] = Array(np.clip(rec[key].numpy() * factor, -bound, bound).astype(np.float32))
        return content

    return attack


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize("method", ["fedkrso", "fedspzo", "fedkseed", "fedtt-plus", "fedavg"])
def test_robust_rules_keep_a_plausible_attacker_close_to_the_honest_run(method, tiny_bert, glue_dir, tmp_path):
    """Within the bounds, an attacker's reply is accepted; what limits it is the rule. Two honest nodes and one
    attacker sending 300x its honest numbers, two rounds. Stated distance: d = |w - w_clean| / |w_clean - w_0|
    (w: the whole global model; clean: the same run without the attacker). The coordinate-wise median of two
    honest values and an outlier lies between the honest ones, so each round's aggregated update differs from
    the honest mean by at most half the honest spread per coordinate, about one honest update: d <= 3 over two
    rounds for median and trimmed-mean (trim 0.34 of 3 replies = the median); measured 1.0 to 1.9. Without a
    defence (mean) the same attacker makes d > 10 (measured 1e3 to 1e5)."""
    w0 = Run(method, tiny_bert, glue_dir, tmp_path).weights()
    clean = Run(method, tiny_bert, glue_dir, tmp_path)
    play(clean, 2)
    moved = (clean.weights() - w0).norm()
    assert moved > 0
    distance = {}
    for rule, extra in {
        "mean": {},
        "median": {"aggregation.rule": "median"},
        "trimmed-mean": {"aggregation.rule": "trimmed-mean", "aggregation.trim-fraction": 0.34},
    }.items():
        run = Run(method, tiny_bert, glue_dir, tmp_path, **extra)
        records = play(run, 2, _scaled(300.0))
        assert [r["clients"] for r in records] == [3, 3], rule
        assert torch.isfinite(run.weights()).all(), rule
        distance[rule] = float((run.weights() - clean.weights()).norm() / moved)
    assert distance["mean"] > 10, distance
    assert distance["median"] <= 3.0 and distance["trimmed-mean"] <= 3.0, distance


@pytest.mark.usefixtures("state_dir")
def test_clip_norm_cuts_a_plausible_attacker_down_to_an_honest_size(tiny_bert, glue_dir, tmp_path):
    """Mean + aggregation.clip-norm (FedKRSO): each reply's update (accumulators and head change, together) is
    scaled to at most the clip norm, set here to the norm of an honest update of round 1. The attacker of
    test_robust_rules_... (x300) then weighs like one more honest update: d <= 3 as for the robust rules,
    against d > 10 without clipping, and every honest reply is still accepted."""
    probe = Run("fedkrso", tiny_bert, glue_dir, tmp_path)
    head = probe.setup.strategy.km.head_state()
    reply = probe.reply(probe.instructions(1)[101]).content
    squares = sum(float((a.numpy().astype(np.float64) ** 2).sum()) for a in reply["accumulators"].values())
    squares += sum(float(((a.numpy() - head[n].numpy()) ** 2).sum()) for n, a in reply["head"].items())
    w0 = Run("fedkrso", tiny_bert, glue_dir, tmp_path).weights()
    clean = Run("fedkrso", tiny_bert, glue_dir, tmp_path, **{"aggregation.clip-norm": math.sqrt(squares)})
    play(clean, 2)
    attacked = Run("fedkrso", tiny_bert, glue_dir, tmp_path, **{"aggregation.clip-norm": math.sqrt(squares)})
    records = play(attacked, 2, _scaled(300.0))
    assert [r["clients"] for r in records] == [3, 3]
    d = float((attacked.weights() - clean.weights()).norm() / (clean.weights() - w0).norm())
    assert torch.isfinite(attacked.weights()).all() and d <= 3.0, d


def _relabelled(msg: Message, src: int | None = None, reply_to: str | None = None) -> Message:
    """`msg` with its sender or the instruction it answers rewritten, as a transport that cannot be trusted
    (or a node speaking for another) would deliver it."""
    if src is not None:
        msg.metadata.__dict__["_src_node_id"] = src
    if reply_to is not None:
        msg.metadata.__dict__["_reply_to_message_id"] = reply_to
    return msg


@pytest.mark.usefixtures("state_dir")
@pytest.mark.parametrize("method", METHODS)
def test_a_reply_counts_once_and_only_from_the_node_it_was_asked_of(method, tiny_bert, glue_dir, tmp_path):
    """The honest replies of 101 and 102, plus one hostile delivery each time: 101's reply delivered twice,
    103's reply labelled as 101's (answering 101's instruction), 103's reply answering 101's instruction
    under its own name, a reply from node 999 that was sent nothing. Each extra is rejected and the global
    model is bit for bit that of the round with the two honest replies alone. The instructions carry ids,
    as the Grid gives them when it pushes them."""
    clean = Run(method, tiny_bert, glue_dir, tmp_path)
    msgs = clean.instructions(1)
    honest = {n: clean.reply(msgs[n]).content for n in HONEST}
    assert clean.aggregate(1, [Message(honest[n], reply_to=msgs[n]) for n in HONEST])["clients"] == 2
    expected = clean.weights()
    hostile_content = clean.reply(msgs[HOSTILE]).content
    extras = {
        "delivered twice": lambda mine: Message(honest[101], reply_to=mine[101]),
        "another node's name": lambda mine: _relabelled(Message(hostile_content, reply_to=mine[101]), src=101),
        "another node's instruction": lambda mine: _relabelled(
            Message(hostile_content, reply_to=mine[101]), src=HOSTILE
        ),
        "a node sent nothing": lambda mine: _relabelled(Message(hostile_content, reply_to=mine[101]), src=999),
    }
    for name, extra in extras.items():
        run = Run(method, tiny_bert, glue_dir, tmp_path)
        mine = run.instructions(1)
        for node, msg in mine.items():
            msg.metadata.__dict__["_message_id"] = f"instruction-{node}-{run.run_id}"
        replies = [Message(honest[n], reply_to=mine[n]) for n in HONEST]
        replies.insert(1, extra(mine))  # among the honest ones, after the first
        rec = run.aggregate(1, replies)
        assert (rec["clients"], rec["rejected"]) == (2, 1), name
        assert torch.equal(run.weights(), expected), name
