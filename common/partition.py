"""Which rows each simulated client trains on, and in which order: its share of the train split (iid, a
Dirichlet label skew by flwr_datasets, or the data's natural partition by client), disjoint, covering and
seeded, and the seeded order of its minibatches."""

import os
import warnings
from collections.abc import Sequence
from functools import lru_cache

import datasets
import numpy as np
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from common.data import data_split, load_split
from common.tasks import TaskSpec

PARTITION_SCHEMES = ("iid", "dirichlet")

_PARTITION_CACHE: dict[tuple, datasets.Dataset] = {}


def _min_partition_size(n: int, num_partitions: int) -> int:
    """At least one example per client; at most 10 so small tasks stay splittable."""
    return max(1, min(10, n // (4 * num_partitions)))


def _make_partitioner(scheme: str, n: int, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    if scheme == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    return DirichletPartitioner(
        num_partitions=num_partitions,
        partition_by="label",
        alpha=float(alpha),
        min_partition_size=_min_partition_size(n, num_partitions),
        self_balancing=True,
        seed=seed,
    )


@lru_cache(maxsize=16)
def _all_partitions(
    labels: tuple[int, ...], num_partitions: int, scheme: str, alpha: float, seed: int
) -> tuple[tuple[int, ...], ...]:
    """Every partition at once: Dirichlet draws them jointly, and we verify the cover."""
    n = len(labels)
    # IidPartitioner takes contiguous shards, so shuffle first (with the seed) to make
    # shards random; the "idx" column maps back to positions in `labels`.
    order = np.random.default_rng(seed).permutation(n) if scheme == "iid" else np.arange(n)
    partitioner = _make_partitioner(scheme, n, num_partitions, alpha, seed)
    partitioner.dataset = datasets.Dataset.from_dict({"label": np.asarray(labels)[order], "idx": order})
    try:
        with warnings.catch_warnings():
            # The Dirichlet partitioner warns on every resampling; we report failure.
            warnings.simplefilter("ignore")
            parts = tuple(
                tuple(sorted(np.asarray(partitioner.load_partition(pid)["idx"]).tolist()))
                for pid in range(num_partitions)
            )
    except ValueError as err:
        raise ValueError(
            f"Dirichlet partitioning of {n} examples into {num_partitions} partitions "
            f"with alpha={alpha} (seed {seed}) could not give every partition at least "
            f"{_min_partition_size(n, num_partitions)} examples in flwr_datasets' 11 "
            f"sampling attempts ({err}). Use a larger alpha (e.g. >= 0.3), fewer "
            "partitions, or a different seed."
        ) from None
    flat = [i for part in parts for i in part]
    if len(flat) != n or set(flat) != set(range(n)):
        raise ValueError(
            f"{scheme} partitioning with alpha={alpha} did not produce disjoint "
            "partitions covering the data; use a larger alpha."
        )
    return parts


def partition_indices(
    labels: Sequence[int],
    num_partitions: int,
    partition_id: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> list[int]:
    """Sorted example indices of one client's partition (disjoint, covering, seeded).

    ``iid``: a seeded shuffle cut into near-equal contiguous shards. ``dirichlet``:
    per-label Dirichlet(alpha) label skew (flwr_datasets, self-balancing); alpha is
    ignored for ``iid``.
    """
    n = len(labels)
    if scheme not in PARTITION_SCHEMES:
        raise ValueError(f"Unknown partition scheme {scheme!r}; known schemes: {', '.join(PARTITION_SCHEMES)}")
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id must be in [0, {num_partitions}), got {partition_id}")
    if scheme == "dirichlet" and not alpha > 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_partitions > n:
        raise ValueError(f"Cannot split {n} examples into {num_partitions} partitions (more partitions than examples)")
    key_alpha = float(alpha) if scheme == "dirichlet" else 0.0
    parts = _all_partitions(tuple(int(y) for y in labels), num_partitions, scheme, key_alpha, seed)
    return list(parts[partition_id])


def load_partition(
    task: TaskSpec,
    data_dir: str | None,
    num_partitions: int,
    partition_id: int,
    scheme: str,
    alpha: float,
    seed: int,
) -> datasets.Dataset:
    """One client's share of the train split, cached per arguments."""
    key = (
        task.name,
        os.path.abspath(data_dir) if data_dir else None,
        num_partitions,
        partition_id,
        scheme,
        float(alpha),
        seed,
    )
    if key not in _PARTITION_CACHE:
        train = load_split(task, "train", data_dir)
        labels = np.asarray(train["label"]).tolist()
        indices = partition_indices(labels, num_partitions, partition_id, scheme, alpha, seed)
        _PARTITION_CACHE[key] = train.select(indices)
    return _PARTITION_CACHE[key]


def natural_partition(clients: Sequence[str], num_partitions: int, partition_id: int, column: str) -> list[int]:
    """The rows of partition `partition_id` when each row names its client: the clients in sorted order, client
    i to partition i mod num_partitions (a client's rows stay together: the data's own, natural partition)."""
    names = sorted(set(clients))
    if len(names) < num_partitions:
        raise ValueError(
            f"partitioning = 'natural': data.client-column '{column}' names {len(names)} clients, fewer than the "
            f"{num_partitions} simulated nodes: run with at most {len(names)} nodes, or partition iid"
        )
    mine = {c for i, c in enumerate(names) if i % num_partitions == partition_id}
    return [i for i, c in enumerate(clients) if c in mine]


MAX_RESPONSE_CLASSES = 50  # Dirichlet over an instruction task's responses: a short answer's few values only


def response_classes(responses: Sequence[str]) -> list[int]:
    """An instruction task's responses as the labels a Dirichlet skew draws over: each distinct answer (stripped,
    case-folded) a class, in sorted order. Only a task of few answers has labels this way (a prompt with a
    one-word answer, as scripts/glue_instructions.py writes); free-text responses are refused."""
    keys = [r.strip().casefold() for r in responses]
    classes = sorted(set(keys))
    if len(classes) > MAX_RESPONSE_CLASSES:
        raise ValueError(
            f"partitioning = 'dirichlet' skews an instruction task by its answers, and this one has {len(classes)} "
            f"distinct responses (at most {MAX_RESPONSE_CLASSES}: a short answer such as a label word): use iid, or "
            "natural with data.client-column"
        )
    index = {c: i for i, c in enumerate(classes)}
    return [index[k] for k in keys]


def data_partition(cfg, task: TaskSpec, num_partitions: int, partition_id: int) -> datasets.Dataset:
    """One simulated client's share of a data task's train split (iid, Dirichlet on labels or on an instruction
    task's few answers, or natural)."""
    train = data_split(task, "train", cfg.data)
    if cfg.partitioning == "natural":
        return train.select(natural_partition(train["client"], num_partitions, partition_id, cfg.data.client_column))
    if task.kind == "classification":
        labels = train["label"]
    elif cfg.partitioning == "dirichlet":
        labels = response_classes(train["response"])
    else:
        labels = [0] * len(train)
    indices = partition_indices(labels, num_partitions, partition_id, cfg.partitioning, cfg.dirichlet_alpha, cfg.seed)
    return train.select(indices)


def batch_indices(n: int, batch_size: int, steps: int, seed: int) -> list[list[int]]:
    """Indices of ``steps`` minibatches, walking seeded permutations epoch after epoch.

    Fixed-step local training needs batches that span epochs: the permutations are
    concatenated and cut into ``batch_size`` chunks, so every example is seen once per
    epoch-length of steps (a chunk crossing an epoch boundary may repeat an index).
    With ``n < batch_size`` every batch is the whole set, freshly permuted.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    rng = np.random.default_rng(seed)
    if n < batch_size:
        return [rng.permutation(n).tolist() for _ in range(steps)]
    epochs = -(-steps * batch_size // n)  # ceil division
    stream = [i for _ in range(epochs) for i in rng.permutation(n).tolist()]
    return [stream[s * batch_size : (s + 1) * batch_size] for s in range(steps)]
