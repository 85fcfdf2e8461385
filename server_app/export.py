"""A run's global model out as a Hugging Face folder: `fedsubspace export`.

    fedsubspace export results/<run> exported/ [--round N] [--force]

`export` rebuilds the server's global model from the run's checkpoint exactly as a resumed run does
(server_app.app: build_setup, then resume), in a scratch records folder (the run folder is only read), and
hands it to the method's exporter (its MethodSpec's `export`): common.export.full_weights for the methods that
train the model's own weights, methods/fedavg_lora/export.py (LoRA merged, plus the peft adapter) and
methods/fedtt/export.py (the TT adapters, which cannot be merged). The folder holds config.json, the tokenizer,
model.safetensors, generation_config.json for a causal LM, and fedsubspace-export.json (which run, which round,
the check that it answers as the server's model does: common.export.check_export).

"At any recorded round": the checkpoint holds the last completed round. The update-log methods rebuild their
model by replaying the log, so an earlier round N is the log replayed to N, where the checkpoint holds nothing
else of the model (FedSPZO, FedKSeed); FedKRSO's checkpoint also holds the last round's classification head,
which the log does not, and the other methods keep the last round's numbers only.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from common.export import MARKER, MODELING, ExportError, check_export, unwrap

# ---------------------------------------------------------------- the server's model, rebuilt


@dataclass
class Rebuilt:
    cfg: Any  # common.config.RunConfig
    setup: Any  # server_app.round.ServerSetup: setup.model is the global model of `round`
    round: int
    last_round: int  # the checkpoint's last completed round


def earlier_round_problem(method: str, saved, wanted: int) -> str | None:
    """Why round `wanted` of this checkpoint cannot be rebuilt, or None. Only an update log replayed to
    `wanted` gives an earlier round, and only where the checkpoint holds nothing else of the model."""
    last = saved.round
    if wanted == last:
        return None
    if not 0 <= wanted <= last:
        return f"--round {wanted}: the run's last completed round is {last}; give a round in 0..{last}"
    if saved.log is None:
        return (
            f"{method} keeps only the last round's global model: round {last} is the only one exportable "
            f"(leave out --round, or give --round {last})"
        )
    if saved.tensors:
        names = sorted({k.split("/", 1)[0] for k in saved.tensors})
        return (
            f"{method}'s update log rebuilds every round, but its checkpoint holds the {', '.join(names)} of the "
            f"last round only: round {last} is the only one exportable (leave out --round, or give --round {last})"
        )
    return None


def rebuild(run_dir: str, workdir: str, wanted: int | None = None) -> Rebuilt:
    """The server's global model of `run_dir` at round `wanted` (default: the last completed one), built as a
    resumed run builds it; the strategy's scratch records go to `workdir`, the run folder is only read."""
    from common.config import ConfigError, parse_run_config
    from common.records import RunRecorder
    from server_app import checkpoint
    from server_app.app import build_setup, resume

    if not os.path.isdir(run_dir):
        raise ExportError(f"RUN_DIR '{run_dir}' is not a folder: give a run's records folder, e.g. results/<run>")
    if not os.path.isfile(os.path.join(run_dir, checkpoint.FILENAME)):
        raise ExportError(
            f"RUN_DIR '{run_dir}' holds no {checkpoint.FILENAME}: a run writes it after each completed round; "
            "give the records folder of a run that completed at least one round"
        )
    try:
        saved = checkpoint.read(run_dir)
    except checkpoint.CheckpointError as exc:
        raise ExportError(str(exc).replace("resume-from: ", "RUN_DIR: ", 1)) from exc
    method = str(saved.config.get("method", "?"))
    target = saved.round if wanted is None else wanted
    problem = earlier_round_problem(method, saved, target)
    if problem:
        raise ExportError(problem)
    try:
        cfg = parse_run_config(saved.config)
        setup = build_setup(cfg, RunRecorder(workdir, "export", cfg.to_flat()))
        if target == saved.round:
            resume(setup, saved, saved.run_id)
        else:
            replay(setup, saved, target)
    except ConfigError as exc:  # the run's model moved, a checkpoint of other code: say so, exit 2
        raise ExportError(f"RUN_DIR '{run_dir}': {exc}") from exc
    return Rebuilt(cfg, setup, target, saved.round)


def replay(setup, saved, rounds: int) -> None:
    """The global model of round `rounds` < T: the checkpoint's update log replayed through its round `rounds`
    (the strategy's own checked unpacking, LogStrategy.restore). The segments were checked and chained whole
    by checkpoint.read; the model digest the checkpoint holds is round T's, so it cannot check this round."""
    from server_app.state import state_to_records

    contents = [state_to_records(dict(s.tensors), s.configs) for s in saved.log[:rounds]]
    entries = [e for content in contents for e in setup.strategy.restore(content)]
    if [e.round for e in entries] != list(range(1, rounds + 1)):
        raise ExportError(f"the run's update log does not hold rounds 1..{rounds}")


# ---------------------------------------------------------------- from the server's module to transformers'


# ---------------------------------------------------------------- the command


def check_out_dir(out_dir: str, run_dir: str, force: bool) -> None:
    """Refuse an OUT_DIR that would overwrite a run's records, or anything but a previous export."""
    from common.runfolder import held_records

    out, run = os.path.realpath(out_dir), os.path.realpath(run_dir)
    if out == run or run.startswith(out + os.sep) or out.startswith(run + os.sep):
        raise ExportError(
            f"OUT_DIR '{out_dir}' is, holds or lies inside the run folder '{run_dir}': the run folder is never "
            "written to; give a folder outside it, e.g. exported/<run name>"
        )
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ExportError(f"OUT_DIR '{out_dir}' is a file: give a new or empty folder")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    held = held_records(out_dir)
    if held:
        raise ExportError(
            f"OUT_DIR '{out_dir}' holds a run's records ({', '.join(held)}): a run folder is never overwritten, "
            "even with --force; give another folder"
        )
    if not force:
        raise ExportError(f"OUT_DIR '{out_dir}' exists and is not empty: give a new folder, or --force to replace it")
    if not os.path.isfile(os.path.join(out_dir, MARKER)):
        raise ExportError(
            f"OUT_DIR '{out_dir}' is not empty and holds no {MARKER} (not an export): --force replaces only a "
            "previous export; give a new or empty folder"
        )


def export(
    run_dir: str, out_dir: str, round: int | None = None, force: bool = False, check: bool = True
) -> dict[str, Any]:
    """Write the global model of `run_dir` (at `round`, default the last completed) to `out_dir`; returns
    what fedsubspace-export.json records. The folder is written beside `out_dir` and renamed into place once
    whole and checked: a failed export leaves `out_dir` as it was."""
    from common.methods import get_method

    check_out_dir(out_dir, run_dir, force)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".export-", dir=parent) as work:
        built = rebuild(run_dir, os.path.join(work, "records"), round)
        staged = os.path.join(work, "model")
        os.makedirs(staged)
        spec = get_method(built.cfg.method)
        info = dict(load_exporter(spec)(built.setup, built.cfg, staged))
        info.update(
            run=os.path.abspath(run_dir), method=built.cfg.method, round=built.round, last_round=built.last_round,
            model=built.cfg.model, task=built.cfg.task, remote_code=os.path.isfile(os.path.join(staged, MODELING)),
        )  # fmt: skip
        if check:
            info["max_output_difference"] = check_export(unwrap(built.setup.model), staged)
        with open(os.path.join(staged, MARKER), "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, sort_keys=True)
        if os.path.isdir(out_dir):
            shutil.rmtree(out_dir)  # empty, or a previous export under --force (check_out_dir)
        os.replace(staged, out_dir)
    return info


def load_exporter(spec) -> Callable[..., Mapping[str, Any]]:
    """The method's exporter, `export(setup, cfg, folder) -> info` (its MethodSpec's `export`)."""
    import importlib

    module_name, _, function = spec.export.partition(":")
    return getattr(importlib.import_module(module_name), function)


def export_command(run_dir: str, out_dir: str, round: int | None, force: bool) -> int:
    try:
        info = export(run_dir, out_dir, round, force)
    except ExportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    how = " (its own modeling file: load with trust_remote_code=True)" if info["remote_code"] else ""
    print(
        f"{out_dir}: {info['method']} round {info['round']} of {info['last_round']}, {info['kind']}{how}; "
        f"logits and hidden states equal the server's model's to {info['max_output_difference']:.1e}"
    )
    return 0
