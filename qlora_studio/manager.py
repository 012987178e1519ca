"""The run manager: owns the one training run of this process, in a background thread (which trains a run
of one process itself, and launches and watches the worker processes of a multi-process run, `launcher`).

Only one run trains at a time in a process, and (see `ownership`) one per device across processes
unless ``allow_parallel``; a run folder is trained by one process only. A refused start or resume
raises `RunBusy`. State lives in the run folders, not here: the manager only knows which run its
thread is working on, so any number of pages or CLI calls can watch the same run by reading its folder.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

from .diskspace import DiskFull, check_before_save
from .errors import StudioError
from .ownership import Lock, describe, device_lock, run_lock
from .runs import RunFolder, list_runs, resolve_run
from .config import TrainConfig
from .recovery import prepare_fix_run
from .training import prepare_run, run_training


class RunBusy(StudioError):
    """A run is already training (in this process, or on the device, or in this folder elsewhere)."""


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
    def start(self, cfg: TrainConfig, echo: bool = False, plan=None, allow_parallel: bool = False) -> RunFolder:
        """Start a run of ``cfg`` (with ``plan``, a `RunPlan` already shown to the user, or a new one).
        ``allow_parallel``: train even while another process trains on the same device."""
        from .plan import plan_for

        cfg.validate()
        with self._lock:
            self._refuse_if_busy()
            plan = plan or plan_for(cfg)
            device = self._take_device(plan.device, allow_parallel, cfg.name or "a new run")
            try:
                run = prepare_run(cfg, plan=plan)
                owner = self._take_run(run)
            except BaseException:
                device.release()
                raise
            self._launch(run, resume=False, echo=echo, locks=(owner, device))
            return run

    def resume(self, run: str | Path, echo: bool = False, allow_parallel: bool = False) -> RunFolder:
        """Continue a run from its last checkpoint (see `_check_resumable`)."""
        folder = RunFolder(resolve_run(run))
        with self._lock:
            self._refuse_if_busy()
            owner = self._take_run(folder)
            try:
                self._check_resumable(folder)
                device = self._take_device((folder.plan().get("plan") or {}).get("device", "cpu"), allow_parallel, folder.name)
            except BaseException:
                owner.release()
                raise
            folder.set_status("running", phase="resuming")
            self._launch(folder, resume=True, echo=echo, locks=(owner, device))
            return folder

    def apply_fix(self, run: str | Path | RunFolder, fix, reason: str = "", echo: bool = False,
                  allow_parallel: bool = False) -> RunFolder:
        """"Apply as a new run": a new run folder with the fix's changed settings, started from the
        old run's last good checkpoint (see `prepare_fix_run`), training in the background.
        ``fix``: a `diagnose.Fix` or its dict; ``reason``: why (the finding's message)."""
        folder = run if isinstance(run, RunFolder) else RunFolder(resolve_run(run))
        with self._lock:
            self._refuse_if_busy()
            device = self._take_device((folder.plan().get("plan") or {}).get("device", "cpu"), allow_parallel,
                                       f"a fix of {folder.name}")
            try:
                child = prepare_fix_run(folder, fix, reason)
                owner = self._take_run(child)
            except BaseException:
                device.release()
                raise
            self._launch(child, resume=False, echo=echo, locks=(owner, device))
            return child

    def stop(self) -> bool:
        """Ask the active run to stop at the end of its current step (it saves a checkpoint)."""
        run = self.active()
        if run is None:
            return False
        self._stop.set()
        phase = run.status(self.live_pids()).get("phase") or "training"
        if not phase.startswith("stopping"):  # shown at once; the training thread says what it waits for next
            run.set_status("running", phase="stopping" if phase == "training" else f"stopping: {phase}")
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

    @staticmethod
    def _check_resumable(folder: RunFolder) -> None:
        """Refuse a run that cannot be resumed. A run whose status.json cannot be read counts as completed
        when it saved its adapter or summary (resuming would train past its end and overwrite them);
        otherwise it resumes, its status.json rewritten and the damaged one kept beside it. Half-written
        checkpoints are removed, and the disk must have room for the next one."""
        from .runs import DamagedRunFile, atomic_write_json

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
        folder.remove_torn_checkpoints()
        RunManager._check_processes(folder)
        problem = check_before_save(folder.path, folder.plan().get("plan") or {}, folder.last_checkpoint())
        if problem:
            raise DiskFull(f"cannot resume {folder.name}: {problem}", hint="free some space first")
        if damaged is not None:
            kept = damaged.path.with_name("status.json.damaged")
            os.replace(damaged.path, kept)
            atomic_write_json(damaged.path, {"state": "interrupted", "error": f"{damaged.why} (kept as {kept.name})"})

    @staticmethod
    def _check_processes(folder: RunFolder) -> None:
        """A run of several processes resumes here only where they can run (a job's run brought back from a
        bigger machine cannot): the workers' own guard, asked before launching them."""
        from .parallel import check_world
        from .plan import RunPlan
        from .world import World

        doc = folder.plan().get("plan") or {}
        if int(doc.get("processes") or 1) <= 1:
            return
        import torch

        plan = RunPlan.from_dict(doc)
        check_world(plan, World(size=plan.processes, local_size=plan.processes),
                    cuda_devices=torch.cuda.device_count() if plan.device == "cuda" else None)

    @staticmethod
    def _take_run(run: RunFolder) -> Lock:
        lock = run_lock(run.path)
        holder = lock.acquire(run=run.name)
        if holder is not None:
            raise RunBusy(f"{run.name} is training in another process ({describe(holder)}); watch it in the Runs "
                          "tab, or stop that process first", field="run")
        return lock

    @staticmethod
    def _take_device(device: str, allow_parallel: bool, what: str) -> Lock:
        lock = device_lock(device)
        if allow_parallel:
            return lock  # not taken: releasing it is a no-op
        holder = lock.acquire(run=what)
        if holder is not None:
            raise RunBusy(f"{holder.get('run', 'a run')} is training on {device} in another process "
                          f"({describe(holder)}); wait for it to finish or stop it",
                          hint="to train both at once anyway (each slower, and together they may not fit in "
                               "memory), pass --allow-parallel on the command line")
        return lock

    def _launch(self, run: RunFolder, resume: bool, echo: bool, locks: tuple[Lock, ...] = ()):
        self._stop = threading.Event()
        self._run = run
        self.last_status = None
        stop = self._stop
        from .compat import import_training_stack

        import_training_stack()  # here, before any other thread can import half of it

        processes = int((run.plan().get("plan") or {}).get("processes", 1))

        def target():
            try:
                if processes > 1:  # worker processes under torchrun, watched from this thread
                    from .launcher import run_processes

                    self.last_status = run_processes(run, stop, resume=resume, echo=echo)
                else:
                    self.last_status = run_training(run, stop, resume=resume, echo=echo)
            finally:
                for lock in locks:
                    lock.release()

        self._thread = threading.Thread(target=target, name=f"train-{run.name}", daemon=True)
        self._thread.start()


_manager: RunManager | None = None


def get_manager() -> RunManager:
    """The process's one run manager."""
    global _manager
    if _manager is None:
        _manager = RunManager()
    return _manager
