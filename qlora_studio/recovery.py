"""What a run does when something goes wrong, and runs that continue another one.

- Out of memory (CUDA's, or the CPU allocator's "can't allocate memory"): caught, memory released, and -- up
  to ``oom_retries`` times -- retried from the last checkpoint: a run that kept its 4-bit weights decoded
  (`decoded`, on the CPU) first gives that copy up (the same numbers); after that, each retry has half the
  micro-batch and twice the gradient accumulation (the same effective batch).
  Each recovery changes the run's plan (plan.json), never the user's settings (config.json), and is
  listed in plan.json's and status.json's ``recoveries`` and in train.log.
- NaN/inf loss or grad norm: the callback stops the run at once without saving the poisoned state;
  checkpoints saved after the last good step are set aside, the last good checkpoint's adapter becomes
  the run's adapter (`roll_back_nonfinite`).
- A fix applied to a run (`prepare_fix_run`) starts a new run from a checkpoint's adapter weights
  (``init_adapter``) with a fresh optimizer and schedule.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from .config import TrainConfig
from .errors import TrainingError
from .runs import RunFolder, checkpoint_step, read_metrics_from


def is_oom(e: BaseException) -> bool:
    import torch

    text = str(e).lower()  # CUDA: "CUDA out of memory"; torch's CPU allocator: "can't allocate memory"
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text


def release_memory(device: str | None) -> None:
    """Free what a failed attempt left behind (its frames are gone once the exception is)."""
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def last_logged_step(run: RunFolder) -> int:
    records, _ = read_metrics_from(run.metrics_path)
    steps = [r.get("step", 0) for r in records if r.get("type") == "train"]
    return max(steps) if steps else 0


def truncate_metrics_after(run: RunFolder, step: int) -> None:
    """On resume, drop metric lines logged after the checkpoint we go back to."""
    records, _ = read_metrics_from(run.metrics_path)
    kept = [r for r in records if r.get("step", 0) <= step]
    tmp = run.metrics_path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in kept:
            f.write(json.dumps(r) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, run.metrics_path)


def can_recover(plan: dict) -> bool:
    """Whether `recover_from_oom` has anything left to give up in this plan (plan.json's ``plan``): the kept
    decoded weights, or a micro-batch above 1. The one rule the single- and multi-process loops ask."""
    return bool(plan.get("decoded_weights")) or plan.get("batch_size", 1) > 1


def recover_from_oom(run: RunFolder, error: str, retries: int, log) -> dict:
    """Give up the kept decoded weights if the plan has them, else halve the plan's micro-batch and double
    its accumulation (the effective batch stays), and note it in plan.json, status.json (``recoveries``) and
    train.log; the caller retries from the last checkpoint, or from the start if there is none."""
    step = last_logged_step(run) + 1  # the step that was being computed
    doc = run.plan()
    plan = doc["plan"]
    ckpt = run.last_checkpoint()
    recovery = {"step": step, "error": error, "resumed_from": ckpt.name if ckpt else None, "time": time.time()}
    if plan.get("decoded_weights"):
        plan["decoded_weights"] = False
        recovery["decoded_weights"] = [True, False]
        change = "the 4-bit weights are decoded at each use from now on (their kept copy freed; the same numbers)"
    else:
        b, ga = plan["batch_size"], plan["grad_accum"]
        nb, nga = max(1, b // 2), ga * 2 if b > 1 else ga
        plan.update(batch_size=nb, grad_accum=nga, effective_batch=nb * nga * plan.get("processes", 1))
        recovery.update(batch_size=[b, nb], grad_accum=[ga, nga])
        change = (f"micro-batch {b} -> {nb}, gradient accumulation {ga} -> {nga} (effective batch {b * ga} -> "
                  f"{nb * nga})")
    run.update_plan(plan=plan, recoveries=(doc.get("recoveries") or []) + [recovery])
    recoveries = (run.status().get("recoveries") or []) + [recovery]
    run.set_status("running", phase="recovering from out of memory", recoveries=recoveries)
    log(f"out of memory at step {step}: recovering automatically ({len(recoveries)} of {retries}): {change}; "
        + (f"continuing from {ckpt.name}" if ckpt else "no checkpoint yet, starting over"))
    if ckpt is None:
        truncate_metrics_after(run, 0)
    return recovery


# ------------------------------------------------------------------ NaN / inf


def _adapter_is_finite(folder: Path) -> bool:
    import torch
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(folder / "adapter_model.safetensors"))
    except Exception:
        return False
    return all(bool(torch.isfinite(t).all()) for t in tensors.values())


def good_checkpoints(run: RunFolder, at_or_before: int | None = None) -> list[Path]:
    """Complete checkpoints of a run (oldest first) at or before a step, whose adapter weights are all finite."""
    return [p for step, p in run.checkpoints()
            if (at_or_before is None or step <= at_or_before) and _adapter_is_finite(p)]


ADAPTER_FILES = ("special_tokens_map.json", "chat_template.jinja", "vocab.json", "merges.txt")


def roll_back_nonfinite(run: RunFolder, finding, log) -> Path | None:
    """After a NaN/inf: checkpoints saved after the last good step are set aside (renamed
    ``nonfinite-checkpoint-N``, so resume never picks them), and the last good checkpoint's adapter
    becomes the run's adapter. Returns that checkpoint (None: no good one, the fix starts over)."""
    good_step = finding.details.get("last_good_step", 0)
    for step, p in run.checkpoints(complete=False):
        if step > good_step:
            p.rename(p.with_name("nonfinite-" + p.name))
            log(f"set aside {p.name}: saved after the last good step {good_step}")
    good = good_checkpoints(run, good_step)
    if run.adapter.exists():
        shutil.rmtree(run.adapter)
    if not good:
        log("no checkpoint from before the non-finite values: a fix starts from scratch")
        return None
    run.adapter.mkdir(parents=True)
    for f in good[-1].iterdir():
        if f.is_file() and (f.name.startswith(("adapter_", "tokenizer")) or f.name in ADAPTER_FILES):
            shutil.copy2(f, run.adapter / f.name)
    log(f"rolled back: the run's adapter is now {good[-1].name}, the last good checkpoint")
    return good[-1]


# ------------------------------------------------------------------ fix runs

LAYOUT_SETTINGS = ("model", "rank", "alpha", "targets", "task", "trust_remote_code")


def _fix_length(settings: dict, old: dict, parent_total: int, init_step: int, sets_length: bool) -> None:
    """How long a fix run trains: what the parent had left, counted in the new effective batch."""
    ratio = (old.get("batch_size", 4) * old.get("grad_accum", 1)) / (settings["batch_size"] * settings["grad_accum"])
    if settings.get("max_steps") is not None:
        left = round((settings["max_steps"] - init_step) * ratio)
        settings["max_steps"] = max(0, left) if (left > 0 or sets_length) else round(old["max_steps"] * ratio)
        return
    done = init_step / parent_total * float(old.get("epochs", 1.0)) if parent_total else 0.0
    left = round(float(settings["epochs"]) - done, 4)
    if left > 0:
        settings["epochs"] = left
    elif sets_length:
        settings["max_steps"] = 0
    # else: the whole length again from these weights


def prepare_fix_run(parent, fix, reason: str = "", name: str | None = None) -> RunFolder:
    """A new run folder for "apply as a new run": the parent's settings with the fix's changes.

    It starts from the adapter weights of the parent's newest good checkpoint at or before
    ``fix.from_step`` (None: the newest good one; 0, none there, or a change of model or LoRA layout:
    from scratch), copied into the new folder's ``init_adapter/``. It trains what is left of the
    parent's schedule (in the new effective batch), or -- when nothing is left and the fix does not
    set the length itself -- the parent's whole length again from those weights. config.json records
    ``parent_run``, ``changes``, ``reason``, ``fix`` and ``init_checkpoint``.
    """
    from .diagnose import Fix
    from .home import runs_dir
    from .runs import resolve_run
    from .training import prepare_run

    parent = parent if isinstance(parent, RunFolder) else RunFolder(resolve_run(parent))
    fix = Fix.from_dict(fix) if isinstance(fix, dict) else fix
    if not fix.changes:
        raise TrainingError(f"'{fix.title}' is advice: there is no setting to change")
    known = TrainConfig.known()
    unknown = sorted(k for k in fix.changes if k not in known)
    if unknown:
        raise TrainingError(f"the fix changes unknown settings {unknown}")
    old = parent.config()
    settings = {k: v for k, v in old.items() if k in known}
    settings.update(fix.changes)
    settings.update(name=None, init_adapter=None, init_step=0)

    ckpt = None
    if fix.from_step != 0 and not any(k in fix.changes for k in LAYOUT_SETTINGS):
        good = good_checkpoints(parent, fix.from_step)
        ckpt = good[-1] if good else None
    init_step = checkpoint_step(ckpt) if ckpt else 0
    if ckpt is not None:
        parent_total = (parent.plan().get("schedule") or {}).get("total_steps") or 0
        _fix_length(settings, old, parent_total, init_step, "max_steps" in fix.changes or "epochs" in fix.changes)
        settings["init_adapter"] = str(ckpt)  # checked by validation; the copy below replaces it
        settings["init_step"] = init_step

    cfg = TrainConfig.from_dict(settings, source=f"fix '{fix.title}'")
    if name is None:  # <parent>-fix1, -fix2, ...
        i = 1
        while (runs_dir() / f"{parent.name[:90]}-fix{i}").exists():
            i += 1
        name = f"{parent.name[:90]}-fix{i}"
    lineage = {"parent_run": str(parent.path), "changes": dict(fix.changes), "reason": reason, "fix": fix.to_dict(),
               "init_checkpoint": str(ckpt) if ckpt else None}
    init_files = [f for f in ckpt.iterdir() if f.is_file() and f.name.startswith("adapter_")] if ckpt else []
    return prepare_run(cfg, name, extra=lineage, init_files=init_files)
