"""Fault corpus, a full disk: the studio home on a small real file system (a tmpfs mounted for the test,
which needs root; skipped with the reason elsewhere), filled up before a run and in the middle of one."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_studio.config import TrainConfig
from qlora_studio.diskspace import DiskFull
from qlora_studio.manager import RunManager
from qlora_studio.runs import RunFolder, list_runs
from qlora_studio.training import prepare_run, run_training


@pytest.fixture()
def small_disk(tmp_path, monkeypatch, session_home):
    """A 100 MB file system holding the studio home."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    monkeypatch.setenv("QLORA_STUDIO_HOME", str(disk / "home"))
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Write a file that leaves ``leave`` bytes free (another program filling the disk)."""
    path = disk / f"filler-{len(list(disk.glob('filler-*')))}"
    todo = shutil.disk_usage(disk).free - leave
    with open(path, "wb") as f:
        while todo > 0:
            n = min(todo, 1 << 20)
            try:
                f.write(b"\1" * n)
                f.flush()
            except OSError:
                break
            todo -= n
    return path


def _cfg(tiny_llama, toy_data, **over) -> TrainConfig:
    settings = dict(model=str(tiny_llama), data=str(toy_data), max_steps=9, batch_size=2, max_seq_len=64,
                    eval_fraction=0, save_steps=3, learning_rate=1e-3)
    settings.update(over)
    return TrainConfig(**settings)


def _filler_callback(disk: Path, at_step: int, leave: int, event: str):
    from transformers import TrainerCallback

    class FillTheDisk(TrainerCallback):
        filler = None

        def _maybe(self, state):
            if state.global_step == at_step and self.filler is None:
                FillTheDisk.filler = fill(disk, leave)

        def on_step_end(self, args, state, control, **kw):
            if event == "step_end":
                self._maybe(state)

        def on_save(self, args, state, control, **kw):
            if event == "save":
                self._maybe(state)

    return FillTheDisk


def test_a_run_is_refused_on_a_full_disk_with_the_space_it_needs(small_disk, tiny_llama, toy_data):
    fill(small_disk, leave=2 * 2**20)
    with pytest.raises(DiskFull, match=r"disk full: a run of .* needs about [\d,]+ MB free in .*; [\d,]+ MB is free"):
        RunManager().start(_cfg(tiny_llama, toy_data, name="no-room"))
    assert not (small_disk / "home" / "runs" / "no-room").exists()
    # The command line says the same, as a message, and leaves no folder either.
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "train", "--model", str(tiny_llama), "--data",
                          str(toy_data), "--max-steps", "2", "--output", "cli-no-room"],
                         capture_output=True, text=True, timeout=180, env=dict(os.environ))
    assert out.returncode == 2 and "disk full" in out.stderr and "Traceback" not in out.stderr, out.stderr
    assert not (small_disk / "home" / "runs" / "cli-no-room").exists()


def test_no_room_for_the_next_checkpoint_stops_the_run_resumably(small_disk, tiny_llama, toy_data):
    run = prepare_run(_cfg(tiny_llama, toy_data, name="tight"))
    # After checkpoint-3 is saved, another program leaves 1 MB: checkpoint-6 cannot fit.
    cb = _filler_callback(small_disk, at_step=3, leave=2**20, event="save")
    status = run_training(run, extra_callbacks=[cb()])
    assert status["state"] == "failed" and status["error_kind"] == "disk_full", status
    assert "a checkpoint needs about" in status["error"] and "resume from checkpoint-3" in status["error"]
    assert [p.name for _, p in run.checkpoints(complete=False)] == ["checkpoint-3"], "no half-written checkpoint"
    [record] = list_runs()
    assert record.state == "failed" and record.resumable
    with pytest.raises(DiskFull, match="cannot resume tight"):
        RunManager().resume("tight")

    cb.filler.unlink()  # the user frees space and resumes
    manager = RunManager()
    manager.resume("tight")
    status = manager.wait(300)
    assert status["state"] == "completed", status
    assert [r["step"] for r in run.metrics() if r["type"] == "train"] == list(range(1, 10))


def test_a_disk_that_fills_during_a_save_leaves_a_truthful_failed_status(small_disk, tiny_llama, toy_data):
    run = prepare_run(_cfg(tiny_llama, toy_data, name="torn"))
    # Step 6 passes the free-space check, then the disk fills up under the Trainer's save.
    cb = _filler_callback(small_disk, at_step=6, leave=256 * 1024, event="step_end")
    status = run_training(run, extra_callbacks=[cb()])
    assert status["state"] == "failed" and status["error_kind"] == "disk_full", status
    assert "disk full" in status["error"] and "resume from the last checkpoint" in status["error"]
    saved = json.loads((run.path / "status.json").read_text())
    assert saved["state"] == "failed" and saved["error_kind"] == "disk_full"
    assert run.last_checkpoint().name == "checkpoint-3"
    assert [p.name for _, p in run.checkpoints(complete=False)] == ["checkpoint-3"], "the torn checkpoint is gone"

    cb.filler.unlink()
    status = run_training(run, resume=True)
    assert status["state"] == "completed", status
    assert (run.adapter / "adapter_model.safetensors").is_file()


def test_a_checkpoint_with_a_cut_short_trainer_state_is_never_offered(tmp_path):
    run = RunFolder(tmp_path / "r")
    for step, state in ((3, '{"global_step": 3}'), (6, '{"global_st')):
        (run.checkpoints_dir / f"checkpoint-{step}").mkdir(parents=True)
        (run.checkpoints_dir / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    assert run.last_checkpoint().name == "checkpoint-3"
    assert run.remove_torn_checkpoints() == ["checkpoint-6"]
    assert not (run.checkpoints_dir / "checkpoint-6").exists()
