"""Each method's server setup: its global model (evaluated on the dev split) and its strategy.

The registry (common/methods.py) names one of these functions per method as "server_app.setups:<function>";
each imports its method's code only when called, so a run loads the code of its own method alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord
from flwr.serverapp.strategy import Strategy
from torch import nn

from common.config import RunConfig
from common.records import RunRecorder


@dataclass
class ServerSetup:
    model: nn.Module  # the global model, evaluated on the dev split
    strategy: Strategy
    initial: ArrayRecord  # what Strategy.start gets (empty for methods whose strategy holds the model)
    load: Callable[[ArrayRecord], None] | None = None  # puts a round's global arrays into `model`, if needed


def fedkrso(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.fedkrso.state import build
    from server_app.strategies import FedKRSO

    km = build(cfg)
    return ServerSetup(km.loaded.model, FedKRSO(cfg, km, recorder), ArrayRecord())


def fedavg(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.modeling import load_run_model
    from server_app.strategies import RecordedFedAvg, params_record

    model = load_run_model(cfg).model

    def load(arrays: ArrayRecord) -> None:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)

    return ServerSetup(model, RecordedFedAvg(cfg, recorder), params_record(model), load)


def fedtt(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.fedtt.model import build
    from server_app.fedtt import FedTT

    tm = build(cfg)
    return ServerSetup(tm.loaded.model, FedTT(cfg, tm, recorder, plus=cfg.method == "fedtt-plus"), ArrayRecord())


def fedavg_lora(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.lora.model import build
    from server_app.strategies import RecordedFedAvg

    model, params = build(cfg)

    def load(arrays: ArrayRecord) -> None:
        with torch.no_grad():
            for name, value in arrays.to_torch_state_dict().items():
                params[name].copy_(value)

    return ServerSetup(
        model, RecordedFedAvg(cfg, recorder), ArrayRecord({n: p.detach() for n, p in params.items()}), load
    )


def fedspzo(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.fedspzo.spzo import build
    from server_app.strategies import FedSPZO

    sm = build(cfg)
    return ServerSetup(sm.zo.loaded.model, FedSPZO(cfg, sm, recorder), ArrayRecord())


def fedkseed(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    from common.fedkseed.kseed import build
    from server_app.strategies import FedKSeed

    km = build(cfg)
    return ServerSetup(km.zo.loaded.model, FedKSeed(cfg, km, recorder), ArrayRecord())
