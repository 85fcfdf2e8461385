"""Stand-ins for what Flower's runtime gives a strategy or a client, shared by the tests, the benchmark and the scripts (harness/__init__.py).

A strategy asks its Grid which nodes are connected and sends it messages; a client function gets a message's
content and its node's config and returns the reply's content. These fakes do that in this process, with the
methods' real client code, so a test drives the same strategies and clients a deployment runs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

from flwr.app import Message

from common.methods import get_method


def client_reply(train: Callable, cfg, msg: Message, partitions: Mapping[int, int], run_id: int = 1) -> Message:
    """The reply of the node `msg` is addressed to, computed by a method's client function `train`.

    `partitions` maps node id -> partition id; its length is the number of partitions, as the runtime's
    node config would say."""
    node = msg.metadata.dst_node_id
    node_config = {"partition-id": partitions[node], "num-partitions": len(partitions)}
    return Message(train(msg.content, cfg, node_config, run_id, node), reply_to=msg)


class NodeList:
    """The one Grid call the strategies' configure_train makes: which nodes are connected."""

    def __init__(self, nodes: Iterable[int]):
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


class InProcessGrid(NodeList):
    """The Grid calls that Strategy.start and the strategies make, served in this process: each message goes
    to the method's real client function for its node (`nodes`: node id -> partition id), as the runtime
    would deliver it, and the replies come back in node order. `sampled`: the nodes of each training round."""

    def __init__(self, cfg, run_id: int, nodes: dict[int, int]):
        super().__init__(nodes)
        self.partitions, self.cfg, self.run_id = dict(nodes), cfg, run_id
        self.client = get_method(cfg.method).load_client()
        self.sampled: list[list[int]] = []

    def send_and_receive(self, messages, *, timeout=None):
        messages = sorted(messages, key=lambda m: m.metadata.dst_node_id)
        if messages:
            self.sampled.append([m.metadata.dst_node_id for m in messages])
        return [client_reply(self.client.train, self.cfg, msg, self.partitions, self.run_id) for msg in messages]


def assert_wire_covers_messages(wire: list[dict]) -> None:
    """The wire bytes of a fleet's wire.jsonl rows (scripts/fleet/wire.py WireLog, both fleets) cover the messages'
    bytes, summed from the start through each round, both ways. WireLog books the counters when it sees a round's
    row, which is written after the round's messages went: a round's bytes are never booked later than their
    round, but a row seen late books the next round's first bytes with it, so only the sums hold row by row."""
    totals = {"down": 0, "up": 0, "message_down": 0, "message_up": 0}
    for w in wire:
        for way in ("down", "up"):
            totals[way] += w[f"wire_bytes_{way}"]
            totals[f"message_{way}"] += w[f"message_bytes_{way}"] or 0
            assert totals[way] >= totals[f"message_{way}"], (w, totals)
