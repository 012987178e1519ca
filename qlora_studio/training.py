"""A run from start to end: its folder, its plan, and the attempts that train it.

The pieces, in the order a run uses them:
1. `config.TrainConfig` -- the settings as the user gave them (a preset, a file, the form, flags).
2. `prepare_run` -- the data's rows checked (`data.load_examples`: a file with no usable row is
   refused before any folder exists), then the run folder: config.json (those settings), plan.json
   (`plan.plan_for`: every decision, with its reason) and status.json, before anything heavy runs.
3. `run_training` -- the attempts: `trainer.train` executes the plan (`loading` for the model,
   `batching` for packed batches, `compat` for other libraries' quirks); an out-of-memory error is
   retried with a smaller micro-batch (`recovery`), any other failure is recorded, never raised.
"""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from pathlib import Path

from .config import TrainConfig
from .diskspace import DiskFull, check_before_run, is_disk_full, reserve
from .errors import StudioError, TrainingError
from .home import runs_dir
from .plan import RunPlan, plan_for
from .runs import RunFolder


def prepare_run(cfg: TrainConfig, name: str | None = None, extra: dict | None = None, init_files=(),
                plan: RunPlan | None = None) -> RunFolder:
    """Create the run folder and write its settings, its plan and its status (before anything heavy runs).

    ``extra``: more keys for config.json (a fix run's lineage); ``init_files``: adapter files to start
    from, copied into the folder's ``init_adapter/``; ``plan``: an already computed plan (else
    `plan_for`)."""
    from .data import DataError, load_examples, row_char_limit
    from .runs import new_run_dir

    data_path = Path(cfg.data).expanduser()
    if not data_path.is_file():
        raise TrainingError(f"data: {cfg.data}: no such file", field="data")
    try:  # the rows, before there is a run folder to leave behind (the tokenizer checks them again)
        report = load_examples(data_path, cfg.data_format, row_char_limit(cfg.max_seq_len))[1]
    except DataError as e:
        e.field = e.field or "data"
        raise
    plan = plan or plan_for(cfg)
    check_before_run(runs_dir(), plan.to_dict())
    run = None
    try:
        run = RunFolder(new_run_dir(cfg.model, cfg.data, name or cfg.name))
        _write_new_run(run, cfg, data_path, report.sha256, plan, extra, init_files)
    except OSError as e:  # never leave a half-made folder behind
        if run is not None:
            shutil.rmtree(run.path, ignore_errors=True)
        if is_disk_full(e):
            raise DiskFull(f"disk full while creating a run folder in {runs_dir()} ({e.strerror or e})",
                           hint="free some space (delete old runs in the Runs tab) and start again") from e
        raise
    return run


def _write_new_run(run: RunFolder, cfg: TrainConfig, data_path: Path, data_sha256: str, plan: RunPlan,
                   extra: dict | None, init_files) -> None:
    reserve(run.path)  # first: the space a "disk full" status needs later (see `diskspace`)
    settings = cfg.to_dict()
    settings["data"] = str(data_path.resolve())
    for key in ("test_data", "eval_db"):
        if getattr(cfg, key):
            settings[key] = str(Path(getattr(cfg, key)).expanduser().resolve())
    if init_files:
        dest = run.path / "init_adapter"
        dest.mkdir()
        for f in init_files:
            shutil.copy2(f, dest / Path(f).name)
        settings["init_adapter"] = str(dest)
    settings["data_sha256"] = data_sha256
    settings.update(extra or {})
    run.write_config(settings)
    run.write_plan({"plan": plan.to_dict(), "adjustments": [], "recoveries": []})
    run.set_status("running", created_at=time.time(), phase="queued")


def _stored_config(run: RunFolder) -> tuple[dict, TrainConfig]:
    stored = run.config()
    known = TrainConfig.known()
    cfg = TrainConfig.from_dict({k: v for k, v in stored.items() if k in known}, source=str(run.path / "config.json"))
    if "plan" not in run.plan():  # a run folder from before plans were stored
        run.write_plan({"plan": plan_for(cfg).to_dict(), "adjustments": [], "recoveries": []})
    return stored, cfg


def run_training(run: RunFolder, stop_event: threading.Event | None = None, resume: bool = False,
                 echo: bool = False, extra_callbacks: list | None = None) -> dict:
    """Train the run described by its folder; returns the final status.

    Never raises for a failed run: the failure is recorded in status.json (and the traceback in
    train.log), so the caller -- a UI thread or the CLI -- survives it. An out-of-memory error
    during training is retried (see `recovery.recover_from_oom`) up to ``oom_retries`` times.
    ``extra_callbacks``: more `TrainerCallback`s for the Trainer (tests inject faults with them).
    """
    from .compat import import_training_stack
    from .recovery import can_recover, recover_from_oom, release_memory
    from .trainer import run_log, train

    import_training_stack()
    stop_event = stop_event or threading.Event()
    log = run_log(run, echo)
    reserve(run.path)  # again: a run that failed for lack of space gave its reserve up
    clock_start = time.time()  # the page's one clock for this start (or resume) of the run
    recovered = 0
    while True:
        cfg = device = None
        try:
            stored, cfg = _stored_config(run)
            device = run.plan()["plan"]["device"]
            run.set_status("running", phase="loading model", device=device, clock_start=clock_start)
            return train(run, cfg, stored, stop_event, resume, log, list(extra_callbacks or []))
        except Exception as e:  # recorded, not raised: the app and other runs must survive it
            msg, kind = describe_failure(run, e, log)
            oom = kind == "oom"
            phase = run.status().get("phase")
        release_memory(device)  # outside the except block: the traceback is gone
        planned = run.plan().get("plan") or {}
        can_retry = (oom and cfg is not None and phase == "training" and recovered < cfg.oom_retries
                     and can_recover(planned) and not stop_event.is_set())
        if not can_retry:
            if oom and cfg is not None and not can_recover(planned) and phase == "training":
                log("out of memory with a micro-batch of 1: no automatic recovery left; see the fixes "
                    "(`qlora-studio diagnose`)")
            return record_failure(run, msg, kind, phase)
        recovered += 1
        resume = recover_from_oom(run, msg, cfg.oom_retries, log)["resumed_from"] is not None


def describe_failure(run: RunFolder, e: BaseException, log) -> tuple[str, str]:
    """(message, kind) of an attempt's exception -- kind "oom", "disk_full" or the exception's type -- logged
    with its traceback (call it from the ``except`` block)."""
    from .recovery import is_oom

    oom, full = is_oom(e), is_disk_full(e)
    msg = f"{type(e).__name__}: {e}" if not isinstance(e, StudioError) else str(e)
    kind = "oom" if oom else "disk_full" if full else type(e).__name__
    if full:
        torn = run.remove_torn_checkpoints() if run.writer else []  # half-written, useless, and holding space
        msg = (f"disk full while {run.status().get('phase') or 'training'} in {run.path}"
               + (f" (removed the half-written {', '.join(torn)})" if torn else "")
               + f"; free some space, then resume from the last checkpoint. ({msg})")
    log(("OUT OF MEMORY: " if oom else "FAILED: ") + msg)
    log(traceback.format_exc())
    return msg, kind


def record_failure(run: RunFolder, msg: str, kind: str, phase: str | None, **more) -> dict:
    """status.json of a failed run: the error, the last step it logged and the checkpoint it resumes from."""
    from .recovery import last_logged_step

    ckpt = run.last_checkpoint()
    done = last_logged_step(run)
    return run.set_status("failed", error=msg, error_kind=kind, finished_at=time.time(), phase="failed", step=done,
                          error_step=done + 1 if phase == "training" else 0,
                          last_checkpoint=ckpt.name if ckpt else None, **more)
