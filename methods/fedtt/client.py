"""FedTT / FedTT+ client: load the global adapters and head, train the round's cores and the head, reply.

Clients keep no state between rounds: the instruction carries every core (frozen ones included), so a
node that missed rounds or lost its disk needs nothing else.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from common.clientround import ClientRound, Local, Start, Trained
from common.config import RunConfig
from common.training import batch, dropout_seed, make_optimizer, train_steps
from methods.fedtt.model import build
from methods.fedtt.tt import gradient_scores
from methods.fedtt.wire import pack_reply, unpack_instruction


class TTRound(ClientRound):
    def start(self) -> Start:
        self.tm = tm = build(self.cfg)
        self.shapes = tm.adapters.shapes()
        self.instr = instr = unpack_instruction(self.content, self.shapes, tm.head_shapes)
        tm.adapters.load(instr.cores)
        tm.set_head(instr.head)
        return Start(instr.server_round, instr.server_round - 1)

    def train(self, local: Local) -> Trained:
        tm = self.tm
        trainable = tm.adapters.set_trainable(self.instr.selected)  # FedTT+: the others stay frozen, no grads
        opt = make_optimizer([*trainable, *tm.head.values()], self.cfg.train)
        dropout = dropout_seed(self.cfg, local.server_round, local.data_key)
        losses = train_steps(tm.loaded.model, local.encoded, local.batches, [opt], dropout)
        return Trained(None, sum(losses) / len(losses), len(losses))

    def finish(self, local: Local, trained: Trained) -> Trained:
        if self.instr.want_scores:  # FedTT+'s gradient rule: the cores' scores on the last batch
            measured = gradient_scores(self.tm.loaded.model, self.tm.adapters, batch(local.encoded, local.batches[-1]))
            trained.update = [measured[k] for k in self.shapes]
        return trained

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        cores = self.tm.adapters.state(self.instr.selected)
        return pack_reply(cores, self.shapes, self.tm.head_state(), trained.update, metrics)


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedTT / FedTT+ round (the ClientApp handler only dispatches here)."""
    return TTRound(content, cfg, node_config, run_id, node_id).run()
