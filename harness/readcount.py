"""How often one `aggregate_train` reads each reply: its metrics validated (common.wire.checked_metrics) and its
update decoded (the strategy's `read_update`), and how many passes the aggregation makes over the accepted
replies (server_app.round.Replies, iterated once per pass). Shared by the tests and bench/scale.py.

Each reply's metrics are to be validated once, when it is checked, and its update decoded once then and once
per aggregation pass (RoundStrategy, server_app/round.py), so that a round holds one decoded reply at a time.

    with counted_reads(strategy) as reads:
        strategy.aggregate_train(server_round, replies)
    reads.summary(replies)  # {"metrics": [fewest, most], "decoded": [fewest, most], "passes": p}

The counting wraps the functions in place while the block runs (and adds a dict entry per reply): keep it out
of a timed or traced call.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from flwr.app import Message


class ReadCounts:
    """Per reply content (by id, alive while the round runs): metrics validations and update decodes; and the
    passes begun over a Replies sequence."""

    def __init__(self) -> None:
        self.metrics: Counter[int] = Counter()
        self.decoded: Counter[int] = Counter()
        self.passes = 0

    def summary(self, replies: Sequence[Message]) -> dict:
        """The fewest and most validations and decodes of one of `replies`, and the passes."""
        metrics = [self.metrics[id(m.content)] for m in replies]
        decoded = [self.decoded[id(m.content)] for m in replies]
        return {
            "metrics": [min(metrics, default=0), max(metrics, default=0)],
            "decoded": [min(decoded, default=0), max(decoded, default=0)],
            "passes": self.passes,
        }


def read_once(summary: dict) -> bool:
    """Every reply's metrics validated once, its update decoded once when checked and once per pass (a summary
    as ReadCounts.summary makes it, or as bench/records/scale.json keeps it)."""
    once = 1 + summary["passes"]
    return summary["metrics"] == [1, 1] and summary["decoded"] == [once, once] and summary["passes"] >= 1


@contextmanager
def counted_reads(strategy) -> Iterator[ReadCounts]:
    """Count, while the block runs, the reads of each reply by `strategy` (see the module docstring).

    checked_metrics is patched in every loaded module that binds it (`from common.wire import checked_metrics`
    binds it in the importing module, which a patch of common.wire alone would miss); `read_update` on the
    strategy itself, which both its check and the aggregation's Replies call; Replies.__iter__ on the class."""
    from common import wire
    from server_app.round import Replies

    counts = ReadCounts()
    real_metrics = wire.checked_metrics
    loaded = list(sys.modules.values())
    holders = [m for m in loaded if getattr(m, "__dict__", {}).get("checked_metrics") is real_metrics]
    real_read, own = strategy.read_update, "read_update" in vars(strategy)
    real_iter = Replies.__iter__

    def checked_metrics(content, *args, **kwargs):
        counts.metrics[id(content)] += 1
        return real_metrics(content, *args, **kwargs)

    def read_update(content, *args, **kwargs):
        counts.decoded[id(content)] += 1
        return real_read(content, *args, **kwargs)

    def passes(self):
        counts.passes += 1
        return real_iter(self)

    for module in holders:
        module.checked_metrics = checked_metrics
    strategy.read_update = read_update
    Replies.__iter__ = passes
    try:
        yield counts
    finally:
        Replies.__iter__ = real_iter
        if own:
            strategy.read_update = real_read
        else:
            del strategy.read_update
        for module in holders:
            module.checked_metrics = real_metrics
