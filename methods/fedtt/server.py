"""FedTT's and FedTT+'s server: the strategy (send the global adapters and the round's core selection, average
what returns, on the shared round of server_app.round.RoundStrategy) and its setup.

Thin: the mathematics (aggregation, FedTT+'s selection rule) is in methods.fedtt.tt, the wire format in
methods.fedtt.wire.
"""

from __future__ import annotations

from logging import INFO

import numpy as np
import torch
from flwr.app import RecordDict
from flwr.common import log

from common import robust
from common.config import RunConfig
from common.methods import get_method
from common.records import RunRecorder
from common.wire import reply_limit
from methods.fedtt.model import TTModel, build
from methods.fedtt.tt import CoreKey, plus_selection, score_votes
from methods.fedtt.wire import SCORE_BOUND, Update, pack_instruction, reply_payload, unpack_update
from server_app.round import Replies, RoundStrategy, ServerSetup
from server_app.state import CheckpointError, checked_tensors, is_number, rng_state, set_rng_state, strategy_field


class FedTT(RoundStrategy):
    """FedTT (`plus=False`): every core trains and travels. FedTT+ (`plus=True`): the rule's cores only."""

    def __init__(self, cfg: RunConfig, tm: TTModel, recorder: RunRecorder, plus: bool) -> None:
        super().__init__(cfg, recorder)
        self.tm, self.plus = tm, plus
        self.shapes = tm.adapters.shapes()
        self.scores: dict[CoreKey, float] | None = None  # FedTT+: the last round's mean gradient scores
        self.selected: dict[int, list[CoreKey]] = {}  # round -> cores trained in it (kept for the records)

    @property
    def want_scores(self) -> bool:
        return self.plus and self.cfg.tt.plus_rule == "gradient"

    def summary(self) -> None:
        counts = self.tm.trainable_counts()
        log(
            INFO,
            "%s: %d adapters, TT rank %d, bottleneck %d; %d core numbers + %d head numbers trainable%s",
            "FedTT+" if self.plus else "FedTT",
            len(self.tm.adapters.adapters),
            self.cfg.tt.rank,
            self.cfg.tt.bottleneck,
            counts["cores"],
            counts["head"],
            f"; rule {self.cfg.tt.plus_rule}, {self.cfg.tt.plus_cores} core(s) per matrix per round"
            if self.plus
            else "",
        )

    def instructions(self, server_round: int, nodes: list[int]) -> list[RecordDict]:
        """The same instruction to every node: the round's core selection, every global core and the head."""
        t = self.cfg.tt
        selected = (
            plus_selection(self.tm.adapters, server_round, t.plus_rule, t.plus_cores, self.scores)
            if self.plus
            else self.tm.adapters.core_keys()
        )
        self.selected[server_round] = selected
        self._record_selection(server_round, selected)
        content = pack_instruction(
            server_round, selected, self.tm.adapters.state(), self.tm.head_state(), self.want_scores
        )
        return [content] * len(nodes)

    def read_update(self, content: RecordDict, server_round: int) -> Update:
        selected = self.selected[server_round]
        return unpack_update(content, selected, self.shapes, self.tm.head_shapes, self.want_scores)

    def reply_size_limit(self, server_round: int) -> int:
        return reply_limit(
            *reply_payload(self.selected[server_round], self.shapes, self.tm.head_shapes, self.want_scores)
        )

    def apply(self, server_round: int, weights: list[float], replies: Replies) -> dict:
        selected = self.selected[server_round]
        # One update per reply: its trained cores and its head, against the global ones, bounded together.
        state = self.tm.adapters.state()
        reference = {**{k: state[k] for k in selected}, **{("head", n): v for n, v in self.tm.head_state().items()}}
        # the aggregate is the new global cores and head themselves: finite aggregate (or RoundFailed), finite model
        merged = self.combine(
            server_round,
            weights,
            replies.map(lambda r: {**r.cores, **{("head", n): v for n, v in r.head.items()}}),
            reference,
        )
        scores = self.scores
        if self.want_scores:
            # Each client's scores become a distribution over the cores of each TT matrix (they only rank
            # cores within a matrix), then combine by the run's rule without norm bounding (but capped-mean's): one
            # client moves a core's score by at most its weight share (means), or not past the honest ones (robust
            # rules). Read before anything changes: a reply that fails to decode again (RoundFailed) changes nothing.
            ag = self.cfg.aggregation
            votes = replies.map(lambda r: {k: np.float64(v) for k, v in score_votes(r.scores).items()})
            combined = robust.aggregate(votes, weights, rule=ag.rule, attackers=ag.attackers)
            scores = {k: float(v) for k, v in combined.items()}
        self.tm.adapters.load({k: v for k, v in merged.items() if k[0] != "head"})
        self.tm.set_head({n: merged[("head", n)] for n in self.tm.head})
        self.scores = scores
        return {"trained-cores": len(selected)}

    def _record_selection(self, server_round: int, selected: list[CoreKey]) -> None:
        """One line per round in <records>/fedtt-selection.jsonl: which cores trained, how many numbers."""
        line = {
            "round": server_round,
            "numbers": self.tm.adapters.num_parameters(selected),
            "cores": [{"adapter": i, "matrix": m, "core": j} for i, m, j in selected],
        }
        self.recorder.add_record("fedtt-selection", line)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """The global cores and head, FedTT+'s last scores and the sampling RNG (server_app/checkpoint.py)."""
        tensors = {f"cores/{i}.{m}.{j}": v for (i, m, j), v in self.tm.adapters.state().items()}
        tensors.update({f"head/{n}": v for n, v in self.tm.head_state().items()})
        scores = None if self.scores is None else [[i, m, j, v] for (i, m, j), v in self.scores.items()]
        return tensors, {"scores": scores, "rng": rng_state(self._rng)}

    def load_state_dict(self, tensors, state: dict, done: int, same_run: bool, segments=None) -> None:
        if segments:
            raise CheckpointError("the checkpoint holds an update log, which FedTT does not have")
        shapes = {f"cores/{i}.{m}.{j}": s for (i, m, j), s in self.shapes.items()}
        shapes.update({f"head/{n}": s for n, s in self.tm.head_shapes.items()})
        values = checked_tensors(tensors, shapes)
        self.tm.adapters.load({k: values[f"cores/{k[0]}.{k[1]}.{k[2]}"] for k in self.shapes})
        self.tm.set_head({n: values[f"head/{n}"] for n in self.tm.head_shapes})
        scores = strategy_field(state, "scores", self._is_scores, "null or [adapter, matrix, core, score] rows")
        self.scores = None if scores is None else {(i, m, j): float(v) for i, m, j, v in scores}
        set_rng_state(self._rng, state)

    def _is_scores(self, scores) -> bool:
        """FedTT+'s scores as state_dict writes them: one score per core of this model, or None; each finite and in
        [0, SCORE_BOUND], the range a reply's scores are held to (their combination, a distribution, lies inside)."""
        if scores is None:
            return True
        rows_ok = isinstance(scores, list) and all(
            isinstance(row, list)
            and len(row) == 4
            and all(isinstance(x, t) for x, t in zip(row, (int, str, int), strict=False))
            and is_number(row[3])
            and 0 <= row[3] <= SCORE_BOUND
            for row in scores
        )
        return rows_ok and all((row[0], row[1], row[2]) in self.shapes for row in scores)


def setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    """FedTT, or FedTT+ when the run's method has the option "plus" (one setup for both variants)."""
    tm = build(cfg)
    return ServerSetup(tm.loaded.model, FedTT(cfg, tm, recorder, plus=get_method(cfg.method).options["plus"]))
