"""The local training loop both methods share, and the client's data (its partition, tokenized)."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from common.config import RunConfig, TrainConfig
from common.data import data_split, load_split, task_of
from common.encoding import NOT_INPUTS, encode
from common.partition import batch_indices, data_partition, load_partition
from common.seeds import derive_seed

Encoded = dict[str, torch.Tensor]


def make_optimizer(params: Iterable[torch.Tensor], train: TrainConfig) -> torch.optim.Optimizer:
    params = list(params)
    if train.optimizer == "sgd":
        return torch.optim.SGD(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.Adam(params, lr=train.lr, weight_decay=train.weight_decay)


def batch(encoded: Encoded, idx: Sequence[int]) -> Encoded:
    """The model's inputs for rows `idx`, with padding columns that no row of this batch uses cut off (speed on
    CPU; padding is on the right)."""
    rows = torch.as_tensor(idx, dtype=torch.long)
    mask = encoded["attention_mask"][rows]
    width = int(mask.sum(dim=1).max())
    return {k: (v[rows][:, :width] if v.dim() == 2 else v[rows]) for k, v in encoded.items() if k not in NOT_INPUTS}


def train_steps(
    model: nn.Module,
    encoded: Encoded,
    batches: Sequence[Sequence[int]],
    optimizers: Sequence[torch.optim.Optimizer],
    dropout_seed: int,
) -> list[float]:
    """One optimizer step per batch; returns the training losses.

    Dropout (the model's own, LoRA's) draws from torch's global generator. It is seeded here with
    `dropout_seed` (`dropout_seed()` below: run seed, round, partition) inside `fork_rng`, so a client round
    does not depend on what the worker process ran before it (in simulation a worker runs several clients,
    in whatever order they come), and the process's generator is left as it was. Without it two runs of the
    same benchmark differed by 1-2 accuracy points on SST-2.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(dropout_seed)
        model.train()
        losses = []
        for idx in batches:
            out = model(**batch(encoded, idx))
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            out.loss.backward()
            for opt in optimizers:
                opt.step()
            losses.append(float(out.loss.detach()))
        model.eval()
    return losses


def dropout_seed(cfg: RunConfig, server_round: int, partition_key: Any) -> int:
    """The seed of a client's dropout in a round, like `step_batches`'s batches. A method that trains a round in
    parts derives each part's seed from this one (FedKRSO: `derive_seed(dropout, interval)`)."""
    # the trailing 0 keeps the seeds that docs/results.md's dropout-seeded runs were made with
    return derive_seed("dropout", cfg.seed, server_round, partition_key, 0)


def step_batches(cfg: RunConfig, n: int, server_round: int, partition_key: Any) -> list[list[int]]:
    """This round's minibatches for a client: deterministic in (run seed, round, partition)."""
    seed = int.from_bytes(hashlib.sha256(f"{cfg.seed}/{server_round}/{partition_key}".encode()).digest()[:4], "little")
    return batch_indices(n, cfg.train.batch_size, cfg.train.local_steps, seed)


def encode_run(cfg: RunConfig, ds, task) -> Encoded:
    """`ds` as the run's model reads it (its tokenizer, head kind, max-length and long-response rule)."""
    from common.modeling import load_tokenizer
    from common.runmodel import head_kind

    return encode(ds, load_tokenizer(cfg.model), task, cfg.train.max_length, head_kind(cfg), cfg.data.long_responses)


@functools.lru_cache(maxsize=16)
def _client_encoded(cfg: RunConfig, model: str, data_dir: str, num_partitions: int, partition_id: int) -> Encoded:
    task = task_of(cfg)
    if task.source:  # a task from a file or the Hub
        ds = data_partition(cfg, task, num_partitions, partition_id)
    elif num_partitions > 0:
        ds = load_partition(
            task, data_dir, num_partitions, partition_id, cfg.partitioning, cfg.dirichlet_alpha, cfg.seed
        )
    else:  # the node's own data folder: all of its train split
        ds = load_split(task, "train", data_dir)
    return encode_run(cfg, ds, task)


@functools.lru_cache(maxsize=4)
def _own_file_encoded(cfg: RunConfig, path: str) -> Encoded:
    from common.data import data_rows
    from common.datafiles import Columns, DataError, infer_kind

    kind = cfg.task_kind if cfg.task_kind != "auto" else infer_kind(data_rows(path), Columns.of(cfg.data), path)
    if kind == "classification" and not cfg.data.labels.strip():
        raise DataError(
            f"this node reads its own data file '{path}': set data.labels (the labels in order), so that every "
            "node numbers the labels the same way whatever its own file holds"
        )
    task = task_of(cfg)
    return encode_run(cfg, data_split(task, "train", cfg.data, own_file=path), task)


def node_view(cfg: RunConfig, node_config: dict[str, Any]) -> RunConfig:
    """The run's configuration as a node reads it: a node given its own `data-file` that does not have the
    server's task file derives the task (its kind, columns) from its own file instead."""
    import dataclasses

    from common.datafiles import HUB_PREFIX, is_data_task

    own = node_config.get("data-file")
    if own and is_data_task(cfg.task) and not cfg.task.startswith(HUB_PREFIX) and not os.path.isfile(cfg.task):
        return dataclasses.replace(cfg, task=str(own))
    return cfg


def check_partitions(cfg: RunConfig, num_partitions: int) -> None:
    """Split the run's train split into `num_partitions` once, as every simulated client will, before a round
    is run: a split that cannot be made (a Dirichlet draw that leaves a client too few examples, more clients
    than examples, too many distinct answers) would otherwise fail on every client in every round of a run
    that still "completes". Raises ConfigError saying what to change. A task on the Hub is not read here."""
    from common.datafiles import HUB_PREFIX
    from common.methodspec import ConfigError

    task = task_of(cfg)
    if str(cfg.task).startswith(HUB_PREFIX):
        return
    try:
        if task.source:
            data_partition(cfg, task, num_partitions, 0)
        else:
            load_partition(task, cfg.data_dir, num_partitions, 0, cfg.partitioning, cfg.dirichlet_alpha, cfg.seed)
    except FileNotFoundError:
        raise
    except ValueError as err:
        raise ConfigError(f"the {num_partitions} clients' data cannot be split: {err}") from None


def client_data(cfg: RunConfig, node_config: dict[str, Any]) -> tuple[Encoded, str]:
    """The node's training data and a key naming it.

    Simulation (and a fleet sharing one dataset) gives `partition-id` / `num-partitions` in the node
    config: the node takes that partition of the task's train split (from the run's `data-dir` for a
    built-in task). A device can instead be given its own data in its node config: `data-file`, a file of
    the run's data task (all of it is the node's training data), or `data-dir`, a GLUE-layout folder
    holding its own data of a built-in task. A node config may carry both: `data-file` serves the runs on
    a data task, partitions or `data-dir` the runs on a built-in one.
    """
    from common.datafiles import is_data_task

    if "data-file" in node_config and is_data_task(cfg.task):
        path = os.path.abspath(str(node_config["data-file"]))
        return _own_file_encoded(node_view(cfg, node_config), path), f"file:{path}"
    if "data-dir" in node_config:
        data_dir = str(node_config["data-dir"])
        return _client_encoded(cfg, cfg.model, data_dir, 0, 0), f"dir:{data_dir}"
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "this node has no data: start the SuperNode with --node-config "
            "'partition-id=N num-partitions=M', \"data-file='/path/to/own.jsonl'\" or \"data-dir='/path/to/glue'\""
        )
    pid, num = int(node_config["partition-id"]), int(node_config["num-partitions"])
    return _client_encoded(cfg, cfg.model, cfg.data_dir, num, pid), f"part:{pid}/{num}"


def node_threads(node_config: dict[str, Any], environ: dict[str, str] | None = None) -> int:
    """The CPU threads a node trains with: its node config's `num-threads`; else OMP_NUM_THREADS where it is
    set (Flower's simulation: Ray sets it in each ClientApp actor to `client-resources-num-cpus`, so that the
    simulated clients running at once share the cores one thread each); else every core this process may run
    on (a container's or a pinned SuperNode's cpuset included): a device's training uses all of its cores."""
    env = os.environ if environ is None else environ
    if "num-threads" in node_config:
        wanted = int(node_config["num-threads"])
        if wanted < 1:
            raise ValueError(f"num-threads in the node config must be >= 1, got {wanted}")
        return wanted
    if env.get("OMP_NUM_THREADS", "").strip().isdigit() and int(env["OMP_NUM_THREADS"]) > 0:
        return int(env["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def dev_examples(cfg: RunConfig, task):
    """The task's dev split, its first eval.max-examples rows (0: all of it)."""
    ds = data_split(task, "dev", cfg.data) if task.source else load_split(task, "dev", cfg.data_dir)
    if cfg.eval.max_examples and cfg.eval.max_examples < len(ds):
        ds = ds.select(range(cfg.eval.max_examples))
    return ds


@functools.lru_cache(maxsize=4)
def dev_encoded(cfg: RunConfig) -> Encoded:
    """The task's dev split (first eval.max-examples rows), encoded: the server's evaluation set."""
    task = task_of(cfg)
    return encode_run(cfg, dev_examples(cfg, task), task)
