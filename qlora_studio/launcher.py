"""A run of several processes, launched and watched from the studio (the run manager's thread).

`run_processes` is `training.run_training` for a plan of N processes: it starts torchrun (``python -m
torch.distributed.run --standalone --nproc-per-node N -m qlora_studio.worker RUN``), whose output goes to
the run's ``workers.log``, and waits for it. The workers train and rank 0 writes the run folder; this
process keeps the run's lock (`ownership`), which is how the workers know it is still there (they end
when it is gone). A stop creates the run's stop file (`worker.STOP_FILE`): the workers stop together at
the end of a step and save as a single process does. When the workers fail, the first failure any of
them reported (its rank and message, `worker.FAILED_LINE`), the exit code and the last lines of
workers.log go to status.json as "failed"; an out-of-memory failure is retried from the last checkpoint
with half the micro-batch per process (`recovery.recover_from_oom`), as a single-process run is.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from .runs import RunFolder, read_run_file
from .worker import FAILED_LINE, STOP_FILE
from .world import LAUNCHER_ENV

WORKERS_LOG = "workers.log"
POLL_S = 0.3
_running: set[subprocess.Popen] = set()


def worker_command(run_path: Path, processes: int, resume: bool = False) -> list[str]:
    """torchrun on this machine: one node, ``processes`` workers, a free rendezvous port of its choosing."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
            "--nproc-per-node", str(processes), "-m", "qlora_studio.worker", str(run_path)] + (
        ["--resume"] if resume else [])


@atexit.register
def _end_workers() -> None:
    """This process is exiting (a second Ctrl-C abandons the run): torchrun goes, its workers end at their
    next step when they find the run's lock released."""
    for proc in list(_running):
        if proc.poll() is None:
            proc.kill()


def _attempt(run: RunFolder, processes: int, stop_event: threading.Event, resume: bool, echo: bool) -> int:
    """One launch of the workers; their exit code."""
    (run.path / STOP_FILE).unlink(missing_ok=True)
    # the workers import the same qlora_studio as this process (a checkout run without installing it, too)
    here = str(Path(__file__).resolve().parent.parent)
    path = os.pathsep.join([here] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != here])
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=path, **{LAUNCHER_ENV: str(os.getpid())})
    with open(run.path / WORKERS_LOG, "a", encoding="utf-8") as out:
        out.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {processes} processes"
                  f"{' (resuming)' if resume else ''}\n")
        out.flush()
        proc = subprocess.Popen(worker_command(run.path, processes, resume), env=env, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _running.add(proc)
    shown = (run.path / "train.log").stat().st_size if echo and (run.path / "train.log").exists() else 0
    try:
        while proc.poll() is None:
            if stop_event.is_set() and not (run.path / STOP_FILE).exists():
                (run.path / STOP_FILE).touch()
            shown = _echo(run, shown) if echo else shown
            time.sleep(POLL_S)
    finally:
        _running.discard(proc)
        (run.path / STOP_FILE).unlink(missing_ok=True)
    if echo:
        _echo(run, shown)
    return proc.returncode


def _echo(run: RunFolder, offset: int) -> int:
    """train.log's new lines on this terminal (what a single-process run prints with ``echo``)."""
    try:
        with open(run.path / "train.log", "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except OSError:
        return offset
    end = chunk.rfind(b"\n") + 1
    if end:
        sys.stdout.write(chunk[:end].decode("utf-8", "replace"))
        sys.stdout.flush()
    return offset + end


def _log_lines(run: RunFolder, since: int) -> list[str]:
    try:
        with open(run.path / WORKERS_LOG, "rb") as f:
            f.seek(since)
            return f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return []


def _reported(lines: list[str]) -> dict[int, str]:
    """rank -> the first failure that worker reported itself (`worker.FAILED_LINE`), in the order they came."""
    out: dict[int, str] = {}
    for line in lines:
        if line.startswith(FAILED_LINE):
            rank, _, message = line[len(FAILED_LINE):].strip().partition(" ")
            if rank.isdigit():
                out.setdefault(int(rank), message)
    return out


def _root_cause(lines: list[str]) -> tuple[int, str, str] | None:
    """(rank, exit code, detail) of torchrun's "Root Cause (first observed failure)" summary, if it printed one."""
    try:
        start = max(i for i, line in enumerate(lines) if line.startswith("Root Cause"))
    except ValueError:
        return None
    fields = {}
    for line in lines[start + 1:start + 10]:
        key, sep, value = line.strip().partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    rank = fields.get("rank", "").split(" ")[0]
    if not rank.isdigit():
        return None
    detail = fields.get("traceback", "")
    return int(rank), fields.get("exitcode", "?").split(" ")[0], "" if detail.startswith("To enable") else detail


def _outcome(run: RunFolder, rc: int, since: int) -> tuple[dict, str | None, str | None]:
    """(status, error, kind) after the workers ended. The cause is the rank torchrun saw fail first (else the
    first that reported a failure): rank 0's own record stands when it is the cause (error None unless it is
    an out-of-memory error, which may be retried); another rank's failure is told by its own message, or by
    its exit code or signal; with neither, the exit code and workers.log's last lines."""
    from .recovery import is_oom

    status = read_run_file(run.path / "status.json") or {}
    if rc == 0 and status.get("state") in ("completed", "stopped"):
        return status, None, None
    lines = _log_lines(run, since)
    tail = [line for line in lines if line.strip()][-12:]
    reported, root = _reported(lines), _root_cause(lines)
    rank = root[0] if root else next(iter(reported), None)
    if status.get("state") == "failed" and rank in (None, 0):  # rank 0 recorded why (NaN, disk, its error)
        oom = status.get("error_kind") == "oom"
        return dict(status, exit_code=rc), status.get("error") if oom else None, status.get("error_kind")
    message = reported.get(rank)
    if message:
        error = f"rank {rank} {message} (workers exited with code {rc}; see {WORKERS_LOG})"
    elif root:
        error = (f"rank {rank} ended with exit code {root[1]}" + (f" ({root[2]})" if root[2] else "")
                 + f"; the others were stopped (see {WORKERS_LOG})")
    else:
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        error = f"the worker processes ended with {how}: " + " | ".join(tail[-3:])
    kind = "oom" if message and is_oom(Exception(message)) else "workers"
    return dict(status, log_tail=tail), error, kind


def run_processes(run: RunFolder, stop_event: threading.Event | None = None, resume: bool = False,
                  echo: bool = False) -> dict:
    """Train the run's N processes to the end (see the module docstring); returns the final status. Never
    raises for a failed run."""
    from .recovery import can_recover, recover_from_oom
    from .trainer import run_log
    from .training import record_failure

    stop_event = stop_event or threading.Event()
    log = run_log(run, echo=False)
    cfg_retries = int(run.config().get("oom_retries", 3) or 0)
    recovered = 0
    run.set_status("running", phase="starting processes", clock_start=time.time())
    while True:
        plan = run.plan().get("plan") or {}
        n = int(plan.get("processes", 1))
        log(f"launching {n} processes ({plan.get('parallel')}): {' '.join(worker_command(run.path, n, resume))}")
        since = (run.path / WORKERS_LOG).stat().st_size if (run.path / WORKERS_LOG).exists() else 0
        rc = _attempt(run, n, stop_event, resume, echo)
        status, error, kind = _outcome(run, rc, since)
        if error is None:
            return status
        phase = status.get("phase")
        if phase == "failed":  # rank 0 recorded the failure: its error_step says whether it was training
            phase = "training" if status.get("error_step") else "loading model"
        can_retry = (kind == "oom" and recovered < cfg_retries and can_recover(plan)
                     and not stop_event.is_set() and phase == "training")
        if not can_retry:
            log(f"FAILED: {error}")
            return record_failure(run, error, kind, phase, exit_code=rc, log_tail=status.get("log_tail"))
        recovered += 1
        resume = recover_from_oom(run, error, cfg_retries, log)["resumed_from"] is not None

