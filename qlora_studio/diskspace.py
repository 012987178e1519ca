"""Disk space: what a run will write, checked before it starts and before each checkpoint, and a
status write that still works when the disk is full.

- `run_bytes(plan)`: what a run needs free before it starts -- the checkpoints the Trainer keeps
  (``save_total_limit``, one more while it rotates), the final adapter, and the logs.
- `checkpoint_bytes(plan)`: one checkpoint (the LoRA weights in fp32, the optimizer's state, the
  tokenizer files); `check_before_save` compares it, or the size of the run's last real checkpoint,
  with the free space before each save.
- `reserve(folder)` / `release_reserve(folder)`: each run folder keeps ``.reserve``, a small file
  written when the run is created. When a write fails for lack of space, the reserve is deleted so
  that the run's "failed: disk full" status can still be written (see `runs.RunFolder.set_status`).
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from .errors import StudioError

RESERVE = ".reserve"
RESERVE_BYTES = 256 * 1024
KEPT_CHECKPOINTS = 2  # the Trainer's save_total_limit (see trainer._training_args)
TOKENIZER_AND_STATE_BYTES = 8 * 2**20  # tokenizer files, scheduler, RNG and trainer state in a checkpoint
LOGS_BYTES = 32 * 2**20  # metrics, train.log, status and plan files over a long run
UNKNOWN_CHECKPOINT_BYTES = 64 * 2**20  # a model whose shape the estimator does not know


class DiskFull(StudioError):
    """Not enough free disk space for what a run is about to write."""


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MB"


def free_bytes(path: Path) -> int:
    """Free space on the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(path).resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def checkpoint_bytes(plan: dict) -> int:
    """One checkpoint of a run with this plan (`RunPlan.to_dict()`): adapters and optimizer state as
    the memory estimate counts them, plus the small files."""
    parts = ((plan or {}).get("memory") or {}).get("breakdown") or {}
    if not parts.get("adapters"):
        return UNKNOWN_CHECKPOINT_BYTES
    return int(parts["adapters"] + parts.get("optimizer", 0) + TOKENIZER_AND_STATE_BYTES)


def adapter_bytes(plan: dict) -> int:
    parts = ((plan or {}).get("memory") or {}).get("breakdown") or {}
    return int(parts.get("adapters") or UNKNOWN_CHECKPOINT_BYTES) + TOKENIZER_AND_STATE_BYTES


def run_bytes(plan: dict) -> int:
    """Free space a run needs before it starts."""
    return (KEPT_CHECKPOINTS + 1) * checkpoint_bytes(plan) + adapter_bytes(plan) + LOGS_BYTES


def check_before_run(folder: Path, plan: dict) -> None:
    """Raise `DiskFull` unless ``folder``'s disk has room for the whole run."""
    need, free = run_bytes(plan), free_bytes(folder)
    if free < need:
        raise DiskFull(f"disk full: a run of {plan.get('model', 'this model')} needs about {_mb(need)} free in "
                       f"{folder} (checkpoints, adapter, logs); {_mb(free)} is free",
                       hint="free some space (delete old runs in the Runs tab) or set QLORA_STUDIO_HOME to a "
                            "larger disk")


def check_before_save(run_path: Path, plan: dict, last_checkpoint: Path | None) -> str | None:
    """None if a checkpoint fits, else the message why not. The last real checkpoint's size, when there
    is one, is the measure; else the plan's estimate."""
    need = folder_bytes(last_checkpoint) if last_checkpoint is not None else checkpoint_bytes(plan)
    need += RESERVE_BYTES
    free = free_bytes(run_path)
    if free >= need:
        return None
    return f"disk full: a checkpoint needs about {_mb(need)} in {run_path}, {_mb(free)} is free"


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether an exception (or one it was raised from) is a write that found no space: ENOSPC or a
    quota, or a library's message for it (torch.save and safetensors wrap the OSError)."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def reserve(folder: Path) -> None:
    """Write the folder's reserve file (best effort: without space there is nothing to reserve)."""
    path = Path(folder) / RESERVE
    if path.is_file() and path.stat().st_size >= RESERVE_BYTES:
        return
    try:
        with open(path, "wb") as f:
            f.write(b"\0" * RESERVE_BYTES)
            f.flush()
    except OSError:
        Path(path).unlink(missing_ok=True)


def release_reserve(folder: Path) -> bool:
    """Delete the reserve so a small write can succeed; whether there was one."""
    path = Path(folder) / RESERVE
    if not path.exists():
        return False
    path.unlink()
    return True
