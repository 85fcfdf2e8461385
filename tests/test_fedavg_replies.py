"""FedAvg baseline: malformed replies are dropped and the round aggregates the rest."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import parse_run_config
from common.records import RunRecorder
from harness.fakes import NodeList
from methods.fedavg.server import FedAvg

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]


def fedavg(cfg) -> FedAvg:
    """FedAvg's strategy on one 2 x 3 parameter, at zero."""
    recorder = RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat())
    return FedAvg(cfg, recorder, {"w": torch.nn.Parameter(torch.zeros(2, 3))})


def test_malformed_fedavg_replies_are_rejected_and_the_round_goes_on(tmp_path):
    # the plain weighted mean (no norm cap): what is checked here is which replies are counted
    cfg = parse_run_config(
        {
            "method": "fedavg",
            "results-dir": str(tmp_path),
            "run-name": "fa",
            "aggregation.rule": "mean",
            "aggregation.norm-cap": 0.0,
        }
    )
    strategy = fedavg(cfg)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList([11, 12, 13, 14, 15, 16])))
    by_node = {m.metadata.dst_node_id: m for m in msgs}

    def reply(node, arr, n=4, key="w"):
        content = RecordDict(
            {"arrays": ArrayRecord({key: Array(arr)}), "metrics": MetricRecord({"num-examples": n, "model-round": 0})}
        )
        return Message(content, reply_to=by_node[node])

    nan = np.zeros((2, 3), np.float32)
    nan[1, 2] = np.nan
    replies = [
        reply(11, np.full((2, 3), 2.0, np.float32), n=1),
        reply(12, np.full((2, 3), 5.0, np.float32), n=3),
        reply(13, nan),
        reply(14, np.zeros((3, 3), np.float32)),
        reply(15, np.zeros((2, 3), np.float64)),
        reply(16, np.zeros((2, 3), np.float32), n=0),
    ]
    strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(strategy.params["w"].detach().numpy(), np.full((2, 3), (2.0 * 1 + 5.0 * 3) / 4))
    rec = strategy.recorder.end_round(1, None)
    assert rec["clients"] == 2 and rec["rejected"] == 4


def test_an_error_reply_is_a_failure_whatever_node_it_names(tmp_path):
    """A SuperNode killed mid-round: Flower's SuperLink answers its instruction with an error Message under the
    SuperLink's own id (flwr's create_message_error_unavailable_res_message). That is a failure with its reason,
    not a rejected reply; a node's own error reply is one too; `rejected` counts only replies that failed a check."""
    from flwr.app import Error
    from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

    cfg = parse_run_config({"method": "fedavg", "results-dir": str(tmp_path), "run-name": "fa"})
    strategy = fedavg(cfg)
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList([11, 12, 13, 14])))
    by_node = {m.metadata.dst_node_id: m for m in msgs}
    for node, msg in by_node.items():  # the ids the Grid gives the instructions when it pushes them
        msg.metadata.__dict__["_message_id"] = f"instruction-{node}"

    def honest(node):
        content = RecordDict(
            {
                "arrays": ArrayRecord({"w": Array(np.full((2, 3), 1.0, np.float32))}),
                "metrics": MetricRecord({"num-examples": 4, "model-round": 0}),
            }
        )
        return Message(content, reply_to=by_node[node])

    lost = Message(Error(ErrorCode.NODE_UNAVAILABLE, "Error: Node Unavailable"), reply_to=by_node[13])
    lost.metadata.__dict__["_src_node_id"] = SUPERLINK_NODE_ID  # as the SuperLink sends it
    own = Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "out of memory"), reply_to=by_node[14])
    stray = honest(12)
    stray.metadata.__dict__["_src_node_id"] = 999  # a reply from a node that was sent nothing: a failed check
    strategy.aggregate_train(1, [honest(11), lost, honest(12), own, stray])
    np.testing.assert_array_equal(strategy.params["w"].detach().numpy(), np.ones((2, 3), np.float32))
    rec = strategy.recorder.end_round(1, None)
    assert (rec["clients"], rec["failures"], rec["rejected"]) == (2, 2, 1)


@pytest.mark.parametrize(
    ("settings", "passes"),
    [
        ({"aggregation.rule": "mean"}, 2),  # norm-cap 2 as shipped: the norms, then clip and add
        ({"aggregation.rule": "mean", "aggregation.norm-cap": 0.0}, 1),
        ({"aggregation.rule": "trimmed-mean", "aggregation.attackers": 1}, 1),  # the robust rules list them once
    ],
)
def test_each_reply_is_checked_once_and_decoded_once_per_aggregation_pass(tmp_path, settings, passes):
    """A real round of FedAvg's strategy over five replies packed by its client's wire (methods.fedavg.wire):
    each reply's metrics are validated exactly once (common.wire.checked_metrics, wherever it is called from),
    and its arrays decoded once when it is checked and once per aggregation pass (harness.readcount, as
    bench/scale.py counts it for every method)."""
    from harness.readcount import counted_reads
    from methods.fedavg import wire as fedavg_wire

    cfg = parse_run_config({"method": "fedavg", "results-dir": str(tmp_path), "run-name": "fa", **settings})
    strategy = fedavg(cfg)
    nodes = [11, 12, 13, 14, 15]
    msgs = {m.metadata.dst_node_id: m for m in strategy.configure_train(1, None, ConfigRecord(), NodeList(nodes))}
    replies = [
        Message(
            fedavg_wire.pack_reply(
                {"w": torch.full((2, 3), float(i))}, {"num-examples": 3 + i, "model-round": 0, "train-loss": 0.5}
            ),
            reply_to=msgs[node],
        )
        for i, node in enumerate(nodes)
    ]
    with counted_reads(strategy) as reads:
        _, record = strategy.aggregate_train(1, replies)
    assert record["clients"] == len(nodes)
    assert reads.summary(replies) == {"metrics": [1, 1], "decoded": [1 + passes] * 2, "passes": passes}


def test_node_ids_are_unsigned_64_bit_and_a_reply_is_kept_all_or_nothing(tmp_path):
    """Flower draws node ids from the whole unsigned 64-bit range: a round of replies from ids above 2**63 is
    aggregated like any other. A value the round's tables cannot hold leaves them as they were (a half-kept
    reply once left 2 replies against 1 weight and ended the run)."""
    from server_app.round import Accepted

    cfg = parse_run_config(
        {"method": "fedavg", "results-dir": str(tmp_path), "run-name": "fa", "aggregation.rule": "mean",
         "aggregation.norm-cap": 0.0}
    )  # fmt: skip
    strategy = fedavg(cfg)
    big = [2**64 - 1, 2**63 + 5]
    msgs = list(strategy.configure_train(1, ArrayRecord(), ConfigRecord(), NodeList(big)))
    replies = [
        Message(
            RecordDict(
                {
                    "arrays": ArrayRecord({"w": Array(np.full((2, 3), value, np.float32))}),
                    "metrics": MetricRecord({"num-examples": 2, "model-round": 0}),
                }
            ),
            reply_to=m,
        )
        for m, value in zip(msgs, (1.0, 3.0), strict=True)
    ]
    strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(strategy.params["w"].detach().numpy(), np.full((2, 3), 2.0))
    assert strategy.recorder.end_round(1, None)["clients"] == 2

    kept = Accepted([])
    kept.add(0, 3, {"train-loss": 0.5})
    with pytest.raises(OverflowError):
        kept.add(-1, 3, {"train-loss": 0.5})
    assert len(kept) == len(kept.examples) == len(kept.losses) == kept.stats.count == 1
