"""The run manager: owns the one training run of this process, in a background thread.

Only one run trains at a time (one GPU); a second start is refused with `RunBusy`. State lives in
the run folders, not here: the manager only knows which run its thread is working on, so any
number of pages or CLI calls can watch the same run by reading its folder.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .errors import StudioError
from .runs import RunFolder, list_runs, resolve_run
from .config import TrainConfig
from .recovery import prepare_fix_run
from .training import prepare_run, run_training


class RunBusy(StudioError):
    """A run is already training in this process."""


class RunManager:
    def __init__(self):
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._run: RunFolder | None = None
        self._stop = threading.Event()
        self.last_status: dict | None = None

    # -- queries
    def active(self) -> RunFolder | None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return self._run
            return None

    def live_pids(self) -> set[int]:
        """Pids vouched for: this process, while its thread trains."""
        return {os.getpid()} if self.active() else set()

    def runs(self):
        return list_runs(live_pids=self.live_pids())

    def status(self, run: RunFolder) -> dict:
        return run.status(self.live_pids() if self.active() and self.active().path == run.path else set())

    # -- actions
    def start(self, cfg: TrainConfig, echo: bool = False, plan=None) -> RunFolder:
        """Start a run of ``cfg`` (with ``plan``, a `RunPlan` already shown to the user, or a new one)."""
        cfg.validate()
        with self._lock:
            self._refuse_if_busy()
            run = prepare_run(cfg, plan=plan)
            self._launch(run, resume=False, echo=echo)
            return run

    def resume(self, run: str | Path, echo: bool = False) -> RunFolder:
        """Continue a run from its last checkpoint. A run whose status.json cannot be read counts as
        completed when it saved its adapter or summary (resuming would train past its end and overwrite
        them); otherwise it resumes, its status.json rewritten and the damaged one kept beside it."""
        from .runs import DamagedRunFile, atomic_write_json

        folder = RunFolder(resolve_run(run))
        with self._lock:
            self._refuse_if_busy()
            folder.config()  # a damaged config.json: say so now, not from the training thread
            try:
                state, damaged = folder.status(set()).get("state"), None
            except DamagedRunFile as e:
                state, damaged = None, e
            if damaged is not None and folder.has_final_results():
                raise RunBusy(f"{folder.name}: {damaged.why}; its adapter or summary.json shows it reached its end, "
                              "so it counts as completed and is not resumed", field="status.json",
                              hint="start a new run to train more, or delete this one")
            if state in ("completed",):
                raise RunBusy(f"{folder.name} already completed; start a new run to train more")
            if folder.last_checkpoint() is None:
                raise RunBusy(f"{folder.name} has no checkpoint to resume from"
                              + (f" ({damaged.why})" if damaged is not None else ""))
            if damaged is not None:
                kept = damaged.path.with_name("status.json.damaged")
                os.replace(damaged.path, kept)
                atomic_write_json(damaged.path, {"state": "interrupted", "error": f"{damaged.why} (kept as {kept.name})"})
            folder.set_status("running", phase="resuming")
            self._launch(folder, resume=True, echo=echo)
            return folder

    def apply_fix(self, run: str | Path | RunFolder, fix, reason: str = "", echo: bool = False) -> RunFolder:
        """"Apply and restart": a new run folder with the fix's changed settings, started from the
        old run's last good checkpoint (see `prepare_fix_run`), training in the background.
        ``fix``: a `diagnose.Fix` or its dict; ``reason``: why (the finding's message)."""
        folder = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
        with self._lock:
            self._refuse_if_busy()
            child = prepare_fix_run(folder, fix, reason)
            self._launch(child, resume=False, echo=echo)
            return child

    def stop(self) -> bool:
        """Ask the active run to stop at the end of its current step (it saves a checkpoint)."""
        if self.active() is None:
            return False
        self._stop.set()
        return True

    def wait(self, timeout: float | None = None) -> dict | None:
        t = self._thread
        if t is not None:
            t.join(timeout)
        return self.last_status

    # -- internals
    def _refuse_if_busy(self):
        if self._thread is not None and self._thread.is_alive():
            raise RunBusy(f"a run is already training ({self._run.name}); stop it or wait for it to finish")

    def _launch(self, run: RunFolder, resume: bool, echo: bool):
        self._stop = threading.Event()
        self._run = run
        self.last_status = None
        stop = self._stop

        def target():
            self.last_status = run_training(run, stop, resume=resume, echo=echo)

        self._thread = threading.Thread(target=target, name=f"train-{run.name}", daemon=True)
        self._thread.start()


_manager: RunManager | None = None


def get_manager() -> RunManager:
    """The process's one run manager."""
    global _manager
    if _manager is None:
        _manager = RunManager()
    return _manager
