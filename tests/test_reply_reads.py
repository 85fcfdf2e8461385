"""Each reply is read once per need in a real round of every method (the tiny model, bench/scale.py's own
measurement, bench.scale_server.one_aggregation): its metrics validated once (common.wire.checked_metrics,
wherever it is bound), its update decoded once when it is checked and once per aggregation pass
(server_app.round.Replies), counted by harness.readcount. And the count catches a strategy that validates a
reply's metrics twice."""

from __future__ import annotations

import pytest

from bench.scale_server import one_aggregation
from common.methods import METHODS
from common.nodestore import STATE_DIR_ENV
from harness.readcount import read_once

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("task_identity")]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_validates_each_reply_once_and_decodes_it_once_per_pass(method, tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    reads = one_aggregation(method, 3, tiny_bert, str(tmp_path), "counted", "mean")["reads"]
    assert len(reads) == 2 and all(read_once(r) for r in reads), reads  # rounds 1 and 2


def test_a_strategy_that_validates_a_reply_twice_is_caught(tiny_bert, tmp_path, monkeypatch):
    """Every method's check goes through RoundStrategy.check_reply: one that validates the metrics a second
    time (through common.wire, as any module might) is counted twice, and the test above would fail."""
    from common import wire
    from server_app.round import RoundStrategy

    real = RoundStrategy.check_reply

    def twice(self, server_round, node, content):
        wire.checked_metrics(content, server_round)
        return real(self, server_round, node, content)

    monkeypatch.setattr(RoundStrategy, "check_reply", twice)
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "nodes"))
    reads = one_aggregation("fedavg", 3, tiny_bert, str(tmp_path), "counted", "mean")["reads"]
    assert [r["metrics"] for r in reads] == [[2, 2], [2, 2]] and not any(map(read_once, reads)), reads
