"""The fleet of docker-compose.yml, two ways: its commands as host processes in network namespaces (no Docker
engine), or the file itself on a real engine. Both are driven through the flwr CLI the same way.

    python -m scripts.fleet --methods fedkrso,fedavg -c "task='rte' num-server-rounds=2 data-dir='/abs/glue'"
    python -m scripts.fleet.docker --glue-dir /abs/glue -c "method='fedkrso' task='rte' num-server-rounds=2"

- `compose.py`: docker-compose.yml read as compose reads it (interpolation, override files) -> services;
- `checks.py`: what both commands check before anything starts (the run config, the data folder);
- `flwr_cli.py`: the flwr CLI's config.toml, environment and answers;
- `driver.py`: `FleetDriver`, what both fleets share: submit a run, watch it, its status, stop it;
- `wire.py`: per-round wire bytes beside the messages (wire.jsonl), the idle polling, the report table;
- `netns.py`: network namespaces, bridges and their clean-up; `edge.py`: a pod shaped like an edge device;
- `namespaces.py`: `NamespaceFleet`, the compose file's commands in network namespaces;
- `docker.py`: `ComposeFleet`, the compose file on a real Docker engine, and its command;
- `cli.py`: the namespace fleet's command (`python -m scripts.fleet`, `fedsubspace fleet`).
"""

from __future__ import annotations

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


class FleetError(RuntimeError):
    pass
