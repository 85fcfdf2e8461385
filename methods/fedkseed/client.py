"""FedKSeed client: catch up by replaying the update log, run S zero-order steps over K seeds, send G.

Forward passes only, like FedSPZO (methods/fedspzo/client.py), but every perturbation covers the whole model.
"""

from __future__ import annotations

from typing import Any

from flwr.app import RecordDict

from common.clientround import ClientRound, Local, Start, Trained
from common.config import RunConfig
from common.seeds import derive_seed
from common.zeroorder import fingerprint, mean_loss
from methods.fedkseed.kseed import build, local_update, replay
from methods.fedkseed.wire import pack_reply, unpack_instruction


class KseedRound(ClientRound):
    def start(self) -> Start:
        self.km = km = build(self.cfg)
        self.instr = instr = unpack_instruction(self.content, self.cfg)
        fp, p = fingerprint(self.cfg, "fedkseed"), self.cfg.kseed.perturbations
        return self.catch_up("fedkseed-state", fp, km.params, instr.server_round, instr.log, lambda e: replay(km, e, p))

    def train(self, local: Local) -> Trained:
        self.km.pert.seconds = 0.0  # count local training only, not the catch-up
        pick = derive_seed("fedkseed-pick", self.cfg.seed, local.server_round, local.data_key)
        result = local_update(self.km, self.cfg, self.instr.lr, local.encoded, local.batches, pick)
        metrics = {**result.calls.metrics(), "perturb-seconds": self.km.pert.seconds}
        return Trained(result.scalars, mean_loss(result.losses), len(local.batches), metrics)

    def reply(self, trained: Trained, metrics: dict[str, float]) -> RecordDict:
        return pack_reply(trained.update, metrics)


def train(content: RecordDict, cfg: RunConfig, node_config: dict[str, Any], run_id: int, node_id: int) -> RecordDict:
    """The whole client side of one FedKSeed round (the ClientApp handler only dispatches here)."""
    return KseedRound(content, cfg, node_config, run_id, node_id).run()
