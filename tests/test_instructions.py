"""Hostile instructions (client side): one node of three gets a damaged or forged instruction.

Every method's server runs as in a deployment (test_hostile.Run: its setup, configure_train, aggregate_train) and
every node is the real client code; the node under attack (103) is reached through the real ClientApp
(client_app.app.app, as the SuperNode calls it). For each thing a client must refuse (common.wire,
"Instructions"): the ClientApp answers an error reply with code INSTRUCTION_REFUSED and a reason, does not
crash, and the node's stored state is byte for byte what it was; the server counts the refusal as that node's
failure while the honest nodes' replies are accepted; the next honest instruction is accepted by node 103,
whose stored model then equals the server's.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client_app.app import app as client_app
from common.methods import KEEPS_MODEL, get_method, known
from common.nodestore import STATE_DIR_ENV, NodeStore, state_dir
from common.wire import INSTRUCTION_REFUSED, VALUE_BOUND, WireError, check_lr, zo_scalar_bound
from tests.test_hostile import HONEST, HOSTILE, METHODS, NODES, Run

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(autouse=True)
def node_states(tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))


def copied(content: RecordDict) -> RecordDict:
    """A copy whose records can be changed without touching the server's message (FedAvg shares one)."""
    return RecordDict({name: type(rec)(dict(rec)) for name, rec in content.items()})


def _set_float(record: str, value: float, key_pattern: str = "", dtype: str = "float32"):
    """Set the first number of the first `dtype` array whose key matches in `record` (default: the method's
    instruction_record)."""

    def attack(content, method):
        rec = content[record or get_method(method).instruction_record]
        key = next(k for k in rec if re.search(key_pattern, k) and rec[k].dtype == dtype)
        arr = rec[key].numpy().copy()
        arr.reshape(-1)[0] = value
        rec[key] = Array(arr)
        return content

    return attack


def _set_config(key: str, value):
    def attack(content, method):
        content["config"][key] = value
        return content

    return attack


def _replace_seed(key_pattern: str | None):
    """Replace one seed: in the config (key_pattern None) or in a logged round's seed array."""

    def attack(content, method):
        if key_pattern is None:
            name = "seeds" if method == "fedkrso" else "round-seed"
            cfg = content["config"]
            cfg[name] = [cfg[name][0] + 1, *cfg[name][1:]] if name == "seeds" else cfg[name] + 1
            return content
        rec = content["log"]
        key = next(k for k in rec if re.fullmatch(key_pattern, k))
        seeds = rec[key].numpy().copy()
        seeds[0] ^= 1
        rec[key] = Array(seeds)
        return content

    return attack


ATTACKS = {  # name -> (attack, what the reason must say)
    "log value 1e30": (_set_float("", 1e30), "above the bound"),
    "NaN": (_set_float("", float("nan")), "NaN or Inf"),
    "round 0": (_set_config("server-round", 0), "server-round"),
    "round as text": (_set_config("server-round", "3"), "server-round"),
}
ZO_ATTACKS = {
    "lr 1e30": (_set_config("lr", 1e30), "outside"),
    "lr 0": (_set_config("lr", 0.0), "outside"),
    "lr -1e-3": (_set_config("lr", -1e-3), "outside"),
    "lr 10 x zo.lr": (_set_config("lr", 0.1), "differs from this node's zo.lr"),
    "logged lr 1e30": (_set_float("log", 1e30, r"/lr$", "float64"), "outside"),
}
PAST_BOUND = {"value 2.5e3, past 2 x VALUE_BOUND": (_set_float("", 2.5 * VALUE_BOUND), "above the bound")}
EXTRA = {
    "fedavg": PAST_BOUND,
    "fedavg-lora": PAST_BOUND,
    "fedkrso": {
        **PAST_BOUND,
        "replaced seed (config)": (_replace_seed(None), "replaced seeds"),
        "replaced seed (log)": (_replace_seed(r"\d+/seeds"), "replaced seeds"),
        "head 1e30": (_set_float("head", 1e30), "above the bound"),
    },
    "fedspzo": {
        "replaced seed (config)": (_replace_seed(None), "replaced seeds"),
        "replaced seed (log)": (_replace_seed(r"\d+/seed"), "replaced seeds"),
        **ZO_ATTACKS,
    },
    "fedkseed": ZO_ATTACKS,
    "fedtt": {**PAST_BOUND, "head 1e30": (_set_float("head", 1e30), "above the bound")},
    "fedtt-plus": {**PAST_BOUND, "masks not a list of ints": (_set_config("masks", "all"), "masks")},
}
known(*EXTRA)  # a renamed method fails here rather than silently losing its attacks


def through_client_app(run: Run, msg: Message) -> Message:
    """What the SuperNode does with an instruction: call the ClientApp with the node's context."""
    node = msg.metadata.dst_node_id
    context = Context(
        run_id=run.run_id,
        node_id=node,
        node_config={"partition-id": NODES[node], "num-partitions": 3},
        state=RecordDict(),
        run_config=run.cfg.to_flat(),
    )
    torch.manual_seed(node)  # as Run.reply: same instruction, same reply
    return client_app(msg, context)


def store_of(run: Run) -> tuple[NodeStore, dict[str, torch.Tensor]]:
    """Node 103's NodeStore and the server's tensors it must equal (log methods only)."""
    strategy, cfg = run.setup.strategy, run.cfg
    if cfg.method == "fedkrso":
        from methods.fedkrso.model import fingerprint

        fp, tensors = fingerprint(cfg), strategy.km.target_weights()
    else:
        from common.zeroorder import fingerprint

        fp, tensors = fingerprint(cfg, cfg.method), strategy.global_tensors()
    return NodeStore(state_dir({}, run.run_id, HOSTILE), f"{cfg.method}-state", fp), tensors


@pytest.mark.integration
@pytest.mark.parametrize("method", METHODS)
def test_a_node_refuses_untrustworthy_instructions_without_touching_its_state(method, tiny_bert, glue_dir, tmp_path):
    run = Run(method, tiny_bert, glue_dir, tmp_path)
    for rnd in (1, 2):
        msgs = run.instructions(rnd)
        assert run.aggregate(rnd, [run.reply(msgs[n]) for n in NODES])["clients"] == 3
    msgs = run.instructions(3)  # node 103 holds round 1 and gets the log entry of round 2
    path = store_of(run)[0].path if method in KEEPS_MODEL else None
    before = Path(path).read_bytes() if path else None
    refusal = None
    for name, (attack, reason) in {**ATTACKS, **EXTRA.get(method, {})}.items():
        content = attack(copied(msgs[HOSTILE].content), method)
        forged = Message(content, dst_node_id=HOSTILE, message_type=MessageType.TRAIN)
        refusal = through_client_app(run, forged)
        assert refusal.has_error(), name
        assert refusal.error.code == INSTRUCTION_REFUSED, (name, refusal.error.reason)
        assert reason in refusal.error.reason, (name, refusal.error.reason)
        if path:
            assert Path(path).read_bytes() == before, name
    rec = run.aggregate(3, [*[run.reply(msgs[n]) for n in HONEST], refusal])
    assert (rec["clients"], rec["failures"], rec["rejected"]) == (2, 1, 0)  # honest nodes go on
    msgs = run.instructions(4)  # node 103 still holds round 1: the log of rounds 2 and 3
    honest_reply = through_client_app(run, msgs[HOSTILE])
    assert not honest_reply.has_error()
    if path:
        store, server = store_of(run)
        held = {n: torch.full_like(t, float("nan")) for n, t in server.items()}
        assert store.load(held) == 3
        for name, t in server.items():
            torch.testing.assert_close(held[name], t.detach(), rtol=0, atol=1e-6)
    rec = run.aggregate(4, [*[run.reply(msgs[n]) for n in HONEST], honest_reply])
    assert (rec["clients"], rec["failures"]) == (3, 0)
    assert torch.isfinite(run.weights()).all()


def _at_the_bound(content: RecordDict, cfg) -> RecordDict:
    """A reply whose every number sits exactly at the server's bound (which accepts it)."""
    if cfg.method == "fedkrso":
        rec, bound = content["accumulators"], VALUE_BOUND
    else:
        rec, bound = content["scalars"], zo_scalar_bound(cfg.zo.eps, cfg.train.local_steps * cfg.kseed.perturbations)
    for key in list(rec):
        if rec[key].dtype == "float32":
            rec[key] = Array(np.full(rec[key].shape, bound, np.float32))
    return content


@pytest.mark.integration
@pytest.mark.parametrize("method", ["fedkrso", "fedkseed"])
def test_replies_at_the_reply_bound_never_make_the_next_instruction_refused(method, tiny_bert, glue_dir, tmp_path):
    """Every reply sits at the server's bound (the worst case: the aggregate is the bound, up to rounding). Nodes
    accept up to 2x that bound, so what the server accepted can never become an instruction every node refuses."""
    run = Run(method, tiny_bert, glue_dir, tmp_path)
    msgs = run.instructions(1)
    replies = [Message(_at_the_bound(run.reply(msgs[n]).content, run.cfg), reply_to=msgs[n]) for n in NODES]
    assert run.aggregate(1, replies)["clients"] == 3
    msgs = run.instructions(2)
    for node in NODES:
        reply = through_client_app(run, msgs[node])
        assert not reply.has_error(), (node, reply.error.reason if reply.has_error() else "")


@pytest.mark.unit
def test_learning_rate_checks():
    assert check_lr("x", 1e-4, 1e-4) == 1e-4
    for bad in (0.0, -1e-4, 1e30, float("nan"), float("inf"), True, "1e-4"):
        with pytest.raises(WireError):
            check_lr("x", bad, 1e-4)
    with pytest.raises(WireError, match="differs"):
        check_lr("x", 2e-4, 1e-4)


@pytest.mark.unit
def test_an_instruction_config_that_is_not_a_record_is_refused():
    from common.wire import checked_round_config

    with pytest.raises(WireError, match="config"):
        checked_round_config(RecordDict({"config": ArrayRecord()}), with_log=False)
    with pytest.raises(WireError, match="log-first"):
        checked_round_config(RecordDict({"config": ConfigRecord({"server-round": 2, "log-first": 3})}), True)
