"""FedAvg baseline: malformed replies are dropped and the round aggregates the rest."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.config import parse_run_config
from common.records import RunRecorder
from harness.fakes import NodeList
from methods.fedavg.server import RecordedFedAvg

pytestmark = [pytest.mark.unit, pytest.mark.usefixtures("task_identity")]


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
    strategy = RecordedFedAvg(cfg, RunRecorder(cfg.results_dir, cfg.run_name, cfg.to_flat()))
    global_arrays = ArrayRecord({"w": Array(np.zeros((2, 3), np.float32))})
    msgs = list(strategy.configure_train(1, global_arrays, ConfigRecord(), NodeList([11, 12, 13, 14, 15, 16])))
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
    arrays, _ = strategy.aggregate_train(1, replies)
    np.testing.assert_allclose(arrays["w"].numpy(), np.full((2, 3), (2.0 * 1 + 5.0 * 3) / 4))
    rec = strategy.recorder.end_round(1, None)
    assert rec["clients"] == 2 and rec["rejected"] == 4
