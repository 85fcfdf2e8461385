"""A node's CPU threads (common.training.node_threads): the node config's, simulation's share, or every core."""

from __future__ import annotations

import os

import pytest

from common.training import node_threads

pytestmark = pytest.mark.unit


def test_a_node_trains_on_every_core_it_may_use_unless_told():
    assert node_threads({}, {}) == len(os.sched_getaffinity(0))
    assert node_threads({"num-threads": 3}, {"OMP_NUM_THREADS": "1"}) == 3  # the node config wins
    assert node_threads({}, {"OMP_NUM_THREADS": "2"}) == 2  # simulation: Ray's share for each ClientApp actor
    assert node_threads({}, {"OMP_NUM_THREADS": ""}) == len(os.sched_getaffinity(0))
    with pytest.raises(ValueError, match="num-threads in the node config must be >= 1"):
        node_threads({"num-threads": 0}, {})
