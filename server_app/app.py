"""ServerApp: validate the run config, build the method's strategy, run it, write the records.

Each method's registry entry (common/methods.py) names its `setup` function (methods/<method>/server.py): it builds
the server's model and strategy. The ServerApp itself knows nothing of any method.
"""

from __future__ import annotations

import os
import time
from logging import ERROR, INFO
from typing import Any

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

import methods  # noqa: F401 - registers every method (methods/__init__.py)
from common.config import ConfigError, RunConfig, check_paths, check_resume, parse_run_config
from common.data import TaskSpec, task_of
from common.evaluation import evaluate
from common.files import DiskFull
from common.methods import get_method
from common.modeling import load_tokenizer
from common.records import RunRecorder, format_table
from common.runfolder import check_not_written, hold_run_folder
from common.training import dev_encoded
from server_app import checkpoint
from server_app.round import ServerSetup
from server_app.state import CheckpointError, Continued

app = ServerApp()


def build_setup(cfg: RunConfig, recorder: RunRecorder) -> ServerSetup:
    """The method's global model and strategy, built by the setup function its registry entry names."""
    return get_method(cfg.method).load_server()(cfg, recorder)


def run_name(cfg: RunConfig) -> str:
    return cfg.run_name or f"{cfg.method}-{task_of(cfg).name}-{time.strftime('%Y%m%d-%H%M%S')}"


def resume(setup: ServerSetup, saved: checkpoint.ServerState, run_id: int) -> None:
    """Put a checkpoint's state into a freshly built setup's strategy (each strategy owns its global model).

    Whatever does not fit raises the CheckpointError that names the file; the strategies check their fields
    (server_app.state.strategy_field), and anything they miss is caught here rather than surfacing as a KeyError."""
    try:
        same_run = saved.run_id == run_id
        setup.strategy.load_state_dict(
            saved.tensors, saved.strategy, saved.round, same_run=same_run, segments=saved.log
        )
    except CheckpointError as exc:
        raise CheckpointError(f"resume-from: '{saved.path}': {exc}") from exc
    except (AttributeError, IndexError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(
            f"resume-from: '{saved.path}' holds a strategy state this {setup.strategy.__class__.__name__} cannot "
            f"read ({exc!r}); resume from another copy or start a fresh run"
        ) from exc


def run(grid: Grid, cfg: RunConfig, run_id: int = 0) -> dict:
    """One federated run; returns its summary. Everything that can be refused is refused before round 1.

    After every completed round the server state goes to `<records>/checkpoint.safetensors`
    (server_app/checkpoint.py); with `resume-from` the run starts from such a state instead and runs the
    rounds after it. The run folder's lock is held from before its records are checked until the summary is
    written (common.runfolder.hold_run_folder): a second server on the same folder is refused.
    """
    check_paths(cfg)
    if cfg.data_dir and not os.path.isdir(cfg.data_dir):
        raise ConfigError(
            f"data-dir '{cfg.data_dir}' is not a folder: point it at a GLUE-layout folder, or leave it empty for the Hub"
        )
    task = task_of(cfg)  # a data task's file is read and checked here, before any training
    name = run_name(cfg)
    saved = read_resumed(cfg) if cfg.resume_from else None  # before anything is written: a refusal leaves no folder
    dev = dev_encoded(cfg)  # missing files fail here, before any training
    folder = os.path.join(cfg.results_dir, name)
    with hold_run_folder(folder, run_id):  # one writer per run folder, from here to the summary
        in_place = saved is not None and os.path.samefile(checkpoint.records_folder(cfg.resume_from), folder)
        if in_place:  # read again under the lock: the checkpoint as its last writer left it
            saved = read_resumed(cfg, held=True)
        return run_held(grid, cfg, run_id, name, task, dev, saved)


def read_resumed(cfg: RunConfig, held: bool = False) -> checkpoint.ServerState:
    """The checkpoint `resume-from` names, checked against this run's config; refused while a server writes its
    folder (resuming a run that is still going would fork it), unless this server is the one (`held`)."""
    if not held:
        check_not_written(checkpoint.records_folder(cfg.resume_from))
    saved = checkpoint.read(cfg.resume_from)
    check_resume(cfg, saved.config, saved.round)
    return saved


def run_held(
    grid: Grid, cfg: RunConfig, run_id: int, name: str, task: TaskSpec, dev: Any, saved: checkpoint.ServerState | None
) -> dict:
    """`run` once this server holds the run folder's lock; `saved`: the checkpoint it resumes from, or None."""
    recorder = RunRecorder(cfg.results_dir, name, cfg.to_flat(), saved.records if saved else None)
    setup = build_setup(cfg, recorder)
    done, strategy = 0, setup.strategy
    if saved is not None:
        resume(setup, saved, run_id)
        done, strategy = saved.round, Continued(setup.strategy, saved.round)
        log(INFO, "resuming from %s: round %d done, rounds %d..%d to run", cfg.resume_from, done, done + 1,
            cfg.num_server_rounds)  # fmt: skip
    state_path = os.path.join(recorder.dir, checkpoint.FILENAME)

    def evaluate_fn(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if flower_round == 0 and done:
            return None  # round `done` was evaluated and recorded by the run that wrote the checkpoint
        server_round = flower_round + done
        due = server_round % cfg.eval.every == 0 or server_round == cfg.num_server_rounds
        result = None
        if due:
            clock = time.perf_counter()
            result = evaluate(setup.model, dev, task, cfg.eval.batch_size, cfg.eval, load_tokenizer(cfg.model))
            result["eval-seconds"] = time.perf_counter() - clock
        try:
            rec = recorder.end_round(server_round, result)
            if server_round > 0:
                start = time.perf_counter()
                tensors, state = setup.strategy.state_dict()
                checkpoint.write(
                    state_path,
                    checkpoint.ServerState(
                        server_round, cfg.to_flat(), tensors, state, written=recorder.digests(), run_id=run_id,
                    ),  # the records' row counts and digests, not their rows: the write does not grow with the round
                )  # fmt: skip
                log(INFO, "round %d: checkpoint %s (%.1f MB) written in %.2f s", server_round, state_path,
                    os.path.getsize(state_path) / 2**20, time.perf_counter() - start)  # fmt: skip
        except DiskFull as exc:  # the previous checkpoint and rows are whole (common/files.py): say how to go on
            held = recorder.dir if server_round - 1 > done else cfg.resume_from if done else None
            then = (
                f"continue the run with resume-from='{held}' (its checkpoint of round {server_round - 1} is whole)"
                if held
                else "start the run again under its name (it stopped before its first checkpoint)"
            )
            raise DiskFull(exc.path, then, exc.needed) from exc
        log(
            INFO,
            "round %d: accuracy %s, %d bytes down, %d up, %d clients",
            server_round,
            rec["accuracy"],
            rec["bytes_down"],
            rec["bytes_up"],
            rec["clients"],
        )
        return MetricRecord(result) if result else None

    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(),  # each strategy holds its own global model
        num_rounds=cfg.num_server_rounds - done,
        timeout=cfg.round_timeout,
        evaluate_fn=evaluate_fn,
    )
    summary = recorder.finish()
    log(INFO, "records in %s\n%s", recorder.dir, format_table(recorder.rounds))
    return summary


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run(grid, parse_run_config(context.run_config), context.run_id)
    except ConfigError as exc:  # on a fleet, the run's log (`flwr log RUN_ID`) is where its user reads why
        log(ERROR, "run refused: %s", exc)
        raise
