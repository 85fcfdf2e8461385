"""ClientApp: one `train` handler that parses the run config and hands the message to the method's client.

Each method's registry entry (common/methods.py) names the module holding its `train(content, cfg, node_config,
run_id, node_id)`, imported only when a run uses it. An instruction the method's wire format refuses (common.wire,
"Instructions": malformed, non-finite or absurd values, a foreign learning rate, replaced seeds) is answered
with an error reply, code INSTRUCTION_REFUSED and the reason, before the node's state is touched; the server
counts it as a failure of that node and the ClientApp goes on serving later rounds.
"""

from __future__ import annotations

import logging

import torch
from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import parse_run_config
from common.methods import get_method
from common.training import node_threads
from common.wire import INSTRUCTION_REFUSED, WireError

app = ClientApp()
log = logging.getLogger(__name__)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse_run_config(context.run_config)
    torch.set_num_threads(node_threads(context.node_config))
    method = get_method(cfg.method).load_client()
    try:
        content = method.train(msg.content, cfg, context.node_config, context.run_id, context.node_id)
    except WireError as exc:
        log.warning("Node %d refused the %s instruction: %s", context.node_id, cfg.method, exc)
        return Message(error=Error(INSTRUCTION_REFUSED, f"instruction refused: {exc}"), reply_to=msg)
    return Message(content, reply_to=msg)
