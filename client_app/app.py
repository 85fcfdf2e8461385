"""ClientApp: one `train` handler that parses the run config and hands the message to the method's client."""

from __future__ import annotations

import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from common.config import parse_run_config

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = parse_run_config(context.run_config)
    torch.set_num_threads(max(1, int(context.node_config.get("num-threads", torch.get_num_threads()))))
    if cfg.method == "fedkrso":
        from common.fedkrso.client import train as method_train

        content = method_train(msg.content, cfg, context.node_config, context.run_id, context.node_id)
    else:
        from common.fedavg.client import train as method_train

        content = method_train(msg.content, cfg, context.node_config)
    return Message(content, reply_to=msg)
