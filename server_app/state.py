"""What a strategy's checkpointed state is made of, and how a strategy resumes from it: the checks of its
JSON fields (strategy_field and the is_* checks), Flower records as tensors and configs and back, the model
tensors a checkpoint brings back (checked_tensors, CHECKPOINT_BOUND), the client-sampling RNG's state, the
model digest a replayed update log must reproduce, and Continued (rounds T+1..N of a resumed run).

The strategies (methods/<method>/server.py, server_app/updatelog.py) import these; the checkpoint's file
format that holds their state (writing, reading, segments, digests, records) is server_app/checkpoint.py,
which builds on this module (CheckpointError, is_configs, is_sha256, is_int) and not the other way round.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.serverapp.strategy import Strategy

from common.config import ConfigError
from common.wire import VALUE_BOUND, instruction_bound

# The model-like values a checkpoint brings back (FedTT cores and head, FedAvg's global arrays): the global model,
# aggregated from replies each within common.wire.VALUE_BOUND, held to the bound the clients hold that model to
# when it is sent to them (the reply bound with the slack for the aggregate's rounding). The log methods' values
# come back through their instruction's checked unpacking (restore), with the same bound.
CHECKPOINT_BOUND = instruction_bound(VALUE_BOUND)


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from; the message says which file and what is wrong with it."""


def is_int(value: Any, low: int = 0) -> bool:
    """An int (not a bool) of at least `low`: a round, a count, a run id."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and bool(np.isfinite(value))


def is_configs(value: Any) -> bool:
    """ConfigRecords as records_to_state writes them: {record: {key: scalar or list of scalars}}."""
    scalar = (str, int, float, bool, bytes)
    return isinstance(value, dict) and all(
        isinstance(rec, dict)
        and all(
            isinstance(v, scalar) or (isinstance(v, list) and all(isinstance(x, scalar) for x in v))
            for v in rec.values()
        )
        for rec in value.values()
    )


def is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def is_digest(value: Any) -> bool:
    """A model_digest: {tensor name: [sum, sum of squares]}, finite numbers."""
    return isinstance(value, dict) and all(
        isinstance(v, list) and len(v) == 2 and all(is_number(x) for x in v) for v in value.values()
    )


def is_node_rounds(value: Any) -> bool:
    """The node_round map: {"<node id>": round >= 0}."""
    return isinstance(value, dict) and all(k.isdigit() and is_int(r) for k, r in value.items())


def strategy_field(state: Mapping[str, Any], key: str, ok: Callable[[Any], bool], what: str) -> Any:
    """state[key] of a strategy's checkpointed state, checked by `ok`; CheckpointError naming the key if not."""
    if key not in state:
        raise CheckpointError(f"its strategy state lacks '{key}' ({what})")
    if not ok(state[key]):
        raise CheckpointError(f"its strategy state's '{key}' is not {what}: {str(state[key])[:80]}")
    return state[key]


def records_to_state(content: RecordDict) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """A Flower RecordDict as tensors ("<record>/<key>") and JSON (its ConfigRecords)."""
    tensors: dict[str, np.ndarray] = {}
    configs: dict[str, dict[str, Any]] = {}
    for name, rec in content.items():
        if isinstance(rec, ArrayRecord):
            tensors.update({f"{name}/{k}": np.ascontiguousarray(a.numpy()) for k, a in rec.items()})
        elif isinstance(rec, ConfigRecord):
            configs[name] = dict(rec)
        else:
            raise TypeError(f"record '{name}' ({type(rec).__name__}) has no checkpoint form")
    return tensors, configs


def state_to_records(tensors: Mapping[str, np.ndarray], configs: Mapping[str, Mapping[str, Any]]) -> RecordDict:
    """The inverse of `records_to_state`."""
    arrays: dict[str, dict[str, Array]] = {}
    for key, value in tensors.items():
        name, sep, sub = key.partition("/")
        if not sep:
            raise CheckpointError(f"checkpoint tensor '{key}' is not '<record>/<key>'")
        arrays.setdefault(name, {})[sub] = Array(np.ascontiguousarray(value))
    content = RecordDict({name: ArrayRecord(a) for name, a in arrays.items()})
    for name, cfg in configs.items():
        content[name] = ConfigRecord(dict(cfg))
    return content


def checked_tensors(
    tensors: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, torch.Tensor]:
    """Exactly the tensors of `shapes`, float32, finite and within CHECKPOINT_BOUND (a checkpoint of this model),
    as torch tensors. A checkpoint is input like a reply: its checksum only proves it is what a writer wrote."""
    if set(tensors) != set(shapes):
        missing, extra = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
        raise CheckpointError(
            f"the checkpoint's tensors are not this model's (missing {missing[:3]}, unexpected {extra[:3]}): "
            "it was written for another model or method"
        )
    out = {}
    for name, shape in shapes.items():
        t = tensors[name]
        if t.dtype != np.float32 or tuple(t.shape) != tuple(shape) or not np.isfinite(t).all():
            raise CheckpointError(
                f"checkpoint tensor '{name}' is {t.dtype} {tuple(t.shape)}, expected finite float32 {tuple(shape)}"
            )
        if t.size and (largest := float(np.abs(t).max())) > CHECKPOINT_BOUND:
            raise CheckpointError(
                f"checkpoint tensor '{name}' holds |value| {largest:.3g}, above the bound {CHECKPOINT_BOUND:g} that the "
                "replies it was aggregated from are held to: it was edited or written by a broken server"
            )
        out[name] = torch.from_numpy(np.array(t, copy=True))
    return out


def rng_state(rng: random.Random) -> list:
    """A random.Random's state as JSON."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _is_rng_state(state: Any) -> bool:
    """A random.Random state as rng_state writes it: version 3, 624 words and a position, a gauss or None."""
    if not (isinstance(state, list) and len(state) == 3 and state[0] == 3 and isinstance(state[1], list)):
        return False
    internal, gauss = state[1], state[2]
    if len(internal) != 625 or not all(is_int(w) and w < 2**32 for w in internal) or internal[-1] > 624:
        return False
    return gauss is None or (isinstance(gauss, float) and np.isfinite(gauss))


def set_rng_state(rng: random.Random, state: Mapping[str, Any]) -> None:
    """Restore `rng` from a strategy state's "rng" (checked first: a bad state raises CheckpointError)."""
    version, internal, gauss = strategy_field(state, "rng", _is_rng_state, "a client-sampling RNG state")
    rng.setstate((version, tuple(internal), gauss))


def model_digest(tensors: Mapping[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per tensor [sum, sum of squares] in float64: what a replay from the pretrained model must reproduce."""
    out = {}
    for name, t in tensors.items():
        d = t.detach().to(torch.float64)
        out[name] = [float(d.sum()), float((d * d).sum())]
    return out


def check_model_digest(expected: Mapping[str, list[float]], tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse a replayed model that is not the one the checkpoint was written from (other model files)."""
    got = model_digest(tensors)
    if set(got) != set(expected):
        raise CheckpointError("the checkpoint's model digest names other tensors than this model has: other model")
    for name, (s, q) in expected.items():
        gs, gq = got[name]
        if not (np.isclose(gs, s, rtol=1e-4, atol=1e-3) and np.isclose(gq, q, rtol=1e-4, atol=1e-3)):
            raise CheckpointError(
                f"replaying the checkpoint's update log from the pretrained model does not give the model it was "
                f"written from ({name}: sum {gs:.6g} vs {s:.6g}): the files at 'model' differ from the run's"
            )


class Continued(Strategy):
    """The method's strategy for rounds T+1..N of a resumed run, under Flower's own Strategy.start.

    Strategy.start numbers the rounds it runs 1..num_rounds; a resumed run passes num_rounds = N - T and
    this wrapper hands the method's strategy round T + r for Flower's round r, so seeds, data order, the
    update log and the records carry on exactly as in a run that was never stopped.
    """

    def __init__(self, inner: Strategy, done: int) -> None:
        self.inner, self.done = inner, done

    def summary(self) -> None:
        self.inner.summary()

    def configure_train(self, server_round, arrays, config, grid):
        return self.inner.configure_train(server_round + self.done, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        return self.inner.aggregate_train(server_round + self.done, replies)

    def configure_evaluate(self, server_round, arrays, config, grid):
        return self.inner.configure_evaluate(server_round + self.done, arrays, config, grid)

    def aggregate_evaluate(self, server_round, replies):
        return self.inner.aggregate_evaluate(server_round + self.done, replies)
