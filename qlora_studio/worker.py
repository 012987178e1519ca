"""One process of a multi-process run: ``python -m qlora_studio.worker RUN [--resume]``, started N times by
torchrun (``--nproc-per-node N``) or ``accelerate launch`` -- by the studio (`launcher`) or by a job's
launch.sh on another machine (`job`).

Every process runs the same training code as a single-process run (`trainer.train`) with its place in
the run (`world.World`, from torchrun's environment): rank 0 writes the run folder, the others only
train. Before anything heavy the guard (`parallel.check_world`) refuses a launch that is not the plan's.
A stop is asked for by SIGINT/SIGTERM or by the launcher's stop file (`STOP_FILE` in the run folder); the
processes agree on it at the end of a step (`callback`). A process that fails prints one line starting
with `FAILED_LINE` on its standard error -- the launcher reports the first one -- and exits 1.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

STOP_FILE = ".stop"
FAILED_LINE = "qlora-studio worker rank"
EXIT_LAUNCHER_GONE = 3


class StopRequest:
    """A stop flag (as `threading.Event` is) that a signal sets, or the launcher by creating ``path``."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._event = threading.Event()

    def set(self) -> None:
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set() or self.path.exists()


def _join(plan, world) -> None:
    """This process into the run's process group, through accelerate (gloo on the CPU, NCCL on GPUs), before
    the model loads: FSDP's RAM-efficient loading needs the group and its environment (rank 0 reads the
    weights, the others receive them), as `accelerate launch` with the job's config would set it."""
    if plan.parallel == "fsdp":
        from .parallel import fsdp_options

        opts = fsdp_options(plan)
        os.environ.setdefault("ACCELERATE_USE_FSDP", "true")
        os.environ.setdefault("FSDP_VERSION", "2")
        os.environ.setdefault("FSDP_CPU_RAM_EFFICIENT_LOADING", str(opts["cpu_ram_efficient_loading"]).lower())
    if world.multi:
        from accelerate import PartialState

        PartialState(cpu=plan.device == "cpu")


def _own_the_run(run, world):
    """A worker launched outside the studio (a job's launch.sh): rank 0 takes the run's lock itself, so a
    studio on this machine shows the run as trained elsewhere and will not resume it meanwhile."""
    from .errors import TrainingError
    from .ownership import describe, run_lock

    if not world.main or world.launcher_pid:
        return None
    lock = run_lock(run.path)
    holder = lock.acquire(run=run.name)
    if holder is not None:
        raise TrainingError(f"{run.name} is being trained by {describe(holder)}", field="run")
    return lock


def _check(run, world):
    """(config as stored, TrainConfig, plan), after the guard: the launched world must be the plan's."""
    import torch

    from .parallel import check_world
    from .plan import RunPlan
    from .training import _stored_config

    stored, cfg = _stored_config(run)
    plan = RunPlan.from_dict(run.plan()["plan"])
    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP")
    check_world(plan, world, accelerate_fsdp=None if fsdp_env is None else fsdp_env.lower() == "true",
                cuda_devices=torch.cuda.device_count() if plan.device == "cuda" else None)
    return stored, cfg, plan


def _local_data(run, cfg, log) -> None:
    """A job taken to another machine carries its data in ``job/`` (`job.export_job`): used when the path the
    run was planned with does not exist here."""
    if Path(cfg.data).expanduser().is_file():
        return
    carried = run.path / "job" / "data" / Path(cfg.data).name
    if carried.is_file():
        log(f"data {cfg.data} is not on this machine: using the job's copy {carried}")
        cfg.data = str(carried)


def run_worker(run_path: str, resume: bool) -> int:
    from .callback import LauncherGone
    from .compat import import_training_stack
    from .runs import RunFolder, resolve_run
    from .trainer import run_log, train
    from .training import describe_failure, record_failure
    from .world import World

    world = World.from_env()
    run = RunFolder(resolve_run(run_path), writer=world.main)
    log = run_log(run, echo=False)
    stop = StopRequest(run.path / STOP_FILE)
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    lock = None
    try:
        import_training_stack()
        lock = _own_the_run(run, world)
        stored, cfg, plan = _check(run, world)
        _local_data(run, cfg, log)
        _join(plan, world)
        if world.main:
            log(f"{world.size} processes ({plan.parallel}): this is rank 0, which writes the run folder")
        run.set_status("running", phase="loading model", device=plan.device, processes=world.size)
        status = train(run, cfg, stored, stop, resume, log, [], world)
        return 0 if status.get("state") in ("completed", "stopped") else 1
    except LauncherGone as e:
        print(f"{FAILED_LINE} {world.rank} ended: {e}", file=sys.stderr, flush=True)
        os._exit(EXIT_LAUNCHER_GONE)  # at once: the others end at the same step, nothing is saved
    except Exception as e:  # recorded by rank 0; every process says why on its standard error
        msg, kind = describe_failure(run, e, log)
        phase = (run.status().get("phase") if world.main else None) or "loading model"
        record_failure(run, msg, kind, phase)
        print(f"{FAILED_LINE} {world.rank} failed ({kind}): {msg}", file=sys.stderr, flush=True)
        return 1
    finally:
        if lock is not None:
            lock.release()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qlora_studio.worker",
                                description="one process of a multi-process run (started by torchrun or accelerate)")
    p.add_argument("run", help="the run folder (prepared by the studio: config.json and plan.json)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last complete checkpoint")
    args = p.parse_args(argv)
    return run_worker(args.run, args.resume)


if __name__ == "__main__":
    sys.exit(main())
