"""FedSPZO client: catch up by replaying the update log, run S split-perturbation steps, send the scalars.

Forward passes only: no autograd graph, no optimizer state, no copy of the parameters. The node keeps the
perturbed parameters of the global model on its disk (common.nodestore) between rounds.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from common.clientround import ClientRound, Local, Start, Trained
from common.config import RunConfig
from common.zeroorder import fingerprint, mean_loss
from methods.fedspzo.spzo import build, local_update, replay
from methods.fedspzo.wire import pack_reply, unpack_instruction


class SpzoRound(ClientRound):
    def start(self) -> Start:
        self.sm = sm = build(self.cfg)
        self.instr = instr = unpack_instruction(self.content, self.cfg)
        fp = fingerprint(self.cfg, "fedspzo")
        return self.catch_up("fedspzo-state", fp, sm.params, instr.server_round, instr.log, lambda e: replay(sm, e))

    def train(self, local: Local) -> Trained:
        for pert in self.sm.perturbations:
            pert.seconds = 0.0  # count local training only, not the catch-up
        result = local_update(self.sm, self.cfg, self.instr.rho, self.instr.lr, local.encoded, local.batches)
        perturb = sum(pert.seconds for pert in self.sm.perturbations)
        return Trained(
            result, mean_loss(result.losses), len(local.batches), {**result.calls.metrics(), "perturb-seconds": perturb}
        )

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        return pack_reply(trained.update.g1, trained.update.g2, metrics)


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedSPZO round (the ClientApp handler only dispatches here)."""
    return SpzoRound(content, cfg, node_config, run_id, node_id).run()
