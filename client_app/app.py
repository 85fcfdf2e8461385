"""ClientApp: one `train` handler that parses the run config and hands the message to the method's client.

CLIENTS maps each method to the module holding its `train(content, cfg, node_config, run_id, node_id)`,
imported only when a run uses it.
"""

from __future__ import annotations

import importlib

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from common.config import parse_run_config

app = ClientApp()

CLIENTS = {
    "fedkrso": "common.fedkrso.client",
    "fedavg": "common.fedavg.client",
    "fedtt": "common.fedtt.client",
    "fedtt-plus": "common.fedtt.client",
    "fedavg-lora": "common.lora.client",
    "fedspzo": "common.fedspzo.client",
    "fedkseed": "common.fedkseed.client",
}


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse_run_config(context.run_config)
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", torch.get_num_threads()))))
    method = importlib.import_module(CLIENTS[cfg.method])
    content = method.train(msg.content, cfg, context.node_config, context.run_id, context.node_id)
    return Message(content, reply_to=msg)
