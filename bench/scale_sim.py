"""bench/scale.py's measurement 4 (its docstring says what and how): one simulation through `flwr run`."""

from __future__ import annotations

import os
import threading
import time

from bench.scale_setup import run_config


def simulation(nodes: int, rounds: int, model: str, work: str, per_round: int = 10) -> dict:
    """Measurement 4: one `flwr run` simulation (scripts/simulate.py) of FedKRSO on the tiny model."""
    import psutil

    from scripts import simulate

    fraction = per_round / nodes
    overrides = run_config("fedkrso", model, work, f"simulation-{nodes}", rounds, **{"fraction-train": fraction})
    overrides["min-clients"] = min(per_round, nodes)
    home: dict[str, str] = {}
    real_env = simulate.flwr_env

    def flwr_env(flwr_home, state_dir):  # the Flower home names this run's processes
        home["path"] = flwr_home
        return real_env(flwr_home, state_dir)

    peak = {"mb": 0.0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.5):
            if "path" not in home:
                continue
            total = 0
            for proc in psutil.process_iter(["pid"]):
                try:
                    if proc.environ().get("FLWR_HOME") == home["path"]:
                        total += proc.memory_info().rss
                except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
            peak["mb"] = max(peak["mb"], total / 2**20)

    sampler = threading.Thread(target=sample, daemon=True)
    simulate.flwr_env = flwr_env
    sampler.start()
    start = time.perf_counter()
    try:
        result = simulate.simulate(overrides, nodes, quiet=True, timeout=900)
    finally:
        simulate.flwr_env = real_env
        stop.set()
        sampler.join()
    wall = time.perf_counter() - start
    rows = simulate.read_rounds(result["records"]) if os.path.exists(result["records"]) else []
    trained = [r for r in rows if r["round"] > 0]
    print(f"simulation of {nodes} nodes: {result['status']} in {wall:.0f} s", flush=True)
    return {
        "nodes": nodes,
        "rounds": rounds,
        "method": "fedkrso",
        "fraction_train": fraction,
        "status": result["status"],
        "wall_seconds": wall,
        "clients_per_round": [r["clients"] for r in trained],
        "round_seconds": [r["seconds"] for r in trained],
        "slowest_client_train_seconds": [r.get("client_train_seconds_max") for r in trained],
        "runner_peak_rss_mb": peak["mb"],
    }
