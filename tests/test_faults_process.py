"""Fault corpus, processes and signals: Ctrl-C and SIGTERM on the command line, a run owned by one
process, one run per device across processes, importing the stack from two threads at once.

Real processes: the CLI runs in a child in its own process group, and signals go to the group, as a
terminal sends them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlora_studio.config import TrainConfig
from qlora_studio.manager import RunBusy, RunManager
from qlora_studio.ownership import device_lock, run_owner
from qlora_studio.runs import RunError, RunFolder, list_runs


def _config(tmp_path: Path, tiny_llama, toy_data, **over) -> Path:
    settings = dict(model=str(tiny_llama), data=str(toy_data), max_steps=400, batch_size=2, max_seq_len=64,
                    eval_fraction=0, save_steps=1000, learning_rate=1e-3)
    settings.update(over)
    path = tmp_path / f"run-{len(list(tmp_path.glob('run-*.json')))}.json"
    path.write_text(json.dumps(settings))
    return path


def _cli(studio_home: Path, *args: str, log: Path) -> subprocess.Popen:
    """The CLI in a child process of its own process group (as a shell runs a foreground job)."""
    env = dict(os.environ, QLORA_STUDIO_HOME=str(studio_home), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", *args], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def _wait_until(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            pytest.fail(f"the CLI ended (rc {proc.returncode}) early:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out:\n{log.read_text()[-3000:]}")


def _train_steps(run: RunFolder) -> list[int]:
    return [r["step"] for r in run.metrics() if r.get("type") == "train"]


def test_ctrl_c_then_sigterm_stop_the_cli_run_and_save_it(studio_home, tiny_llama, toy_data, tmp_path):
    config = _config(tmp_path, tiny_llama, toy_data)
    run = RunFolder(studio_home / "runs" / "ctrlc")
    log = tmp_path / "train.out"
    proc = _cli(studio_home, "train", "--config", str(config), "--output", "ctrlc", log=log)
    _wait_until(lambda: len(_train_steps(run)) >= 2, proc, log)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole foreground process group
    assert proc.wait(120) == 130, log.read_text()[-3000:]
    status = run.status()
    assert status["state"] == "stopped", status
    step = status["step"]
    assert run.last_checkpoint() is not None and run.last_checkpoint().name == f"checkpoint-{step}"
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert "Traceback" not in log.read_text()

    # SIGTERM (`kill`, a service manager) does the same on `resume`, which continues from that checkpoint.
    log2 = tmp_path / "resume.out"
    proc = _cli(studio_home, "resume", "ctrlc", log=log2)
    _wait_until(lambda: max(_train_steps(run), default=0) >= step + 2, proc, log2)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(120) == 143, log2.read_text()[-3000:]
    status = run.status()
    assert status["state"] == "stopped" and status["step"] > step
    assert run.last_checkpoint().name == f"checkpoint-{status['step']}"
    steps = _train_steps(run)
    assert steps == list(range(1, status["step"] + 1)), "the resumed run continues where the stop left off"


def test_a_run_trained_by_another_process_cannot_be_resumed_or_deleted_until_it_dies(
        studio_home, tiny_llama, toy_data, tmp_path):
    config = _config(tmp_path, tiny_llama, toy_data, save_steps=2)
    run = RunFolder(studio_home / "runs" / "owned")
    log = tmp_path / "owner.out"
    proc = _cli(studio_home, "train", "--config", str(config), "--output", "owned", log=log)
    try:
        _wait_until(lambda: run.last_checkpoint() is not None, proc, log)
        owner = run_owner(run.path)
        assert owner is not None and owner["pid"] == proc.pid
        [record] = list_runs()
        assert record.state == "running"
        from qlora_studio.ui.runs import runs_table

        assert runs_table()[0]["state"][0] == f"training in another process (process {proc.pid} on this machine)"

        with pytest.raises(RunBusy, match=f"owned is training in another process \\(process {proc.pid}"):
            RunManager().resume("owned")
        with pytest.raises(RunError, match="stop it before deleting it"):
            run.delete()
        assert run.path.is_dir()

        # A second CLI on the same studio home and device is refused, leaving no run folder behind.
        second = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "train", "--config", str(config),
                                 "--output", "second"], env=dict(os.environ, QLORA_STUDIO_HOME=str(studio_home)),
                                capture_output=True, text=True, timeout=120)
        assert second.returncode == 2, second.stderr
        assert "is training on cpu in another process" in second.stderr and "--allow-parallel" in second.stderr
        assert not (studio_home / "runs" / "second").exists()
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: the kernel drops the dead process's locks
        proc.wait()

    assert run_owner(run.path) is None
    assert run.status()["state"] == "interrupted"
    manager = RunManager()
    manager.resume("owned")  # the stale owner is gone: resuming is allowed again
    assert run_owner(run.path)["pid"] == os.getpid()
    manager.stop()
    assert manager.wait(120)["state"] == "stopped"
    assert run_owner(run.path) is None
    run.delete()
    assert not run.path.exists()


def test_one_run_per_device_unless_allowed(studio_home, tiny_llama, toy_data):
    other = device_lock("cpu")  # held as another process would hold it (flock: per open file)
    assert other.acquire(run="someone-else") is None
    try:
        cfg = TrainConfig(model=str(tiny_llama), data=str(toy_data), max_steps=2, batch_size=2, max_seq_len=64,
                          eval_fraction=0, name="refused")
        manager = RunManager()
        with pytest.raises(RunBusy, match="someone-else is training on cpu in another process"):
            manager.start(cfg)
        assert not (studio_home / "runs" / "refused").exists()
        run = manager.start(cfg, allow_parallel=True)
        assert manager.wait(240)["state"] == "completed"
        assert run_owner(run.path) is None, "the run lock is released when the run ends"
        assert other.holder()["run"] == "someone-else", "a parallel run leaves the device lock alone"
    finally:
        other.release()
    assert device_lock("cpu").holder() is None


RACE = textwrap.dedent("""
    import sys, threading
    from qlora_studio.config import TrainConfig
    from qlora_studio.training import prepare_run, run_training
    from qlora_studio.loading import load_tokenizer

    model, data, embedded = sys.argv[1:4]
    run = prepare_run(TrainConfig(model=model, data=data, max_steps=1, batch_size=2, max_seq_len=64, eval_fraction=0))
    results = {}
    barrier = threading.Barrier(2)

    def tokenizer():  # the Data tab checking a file with a model's tokenizer
        barrier.wait()
        try:
            results["tokenizer"] = type(load_tokenizer(embedded)).__name__
        except Exception as e:
            results["tokenizer"] = repr(e)

    def training():  # a run starting at the same moment
        barrier.wait()
        results["run"] = run_training(run)

    threads = [threading.Thread(target=tokenizer), threading.Thread(target=training)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print("TOKENIZER", results["tokenizer"])
    print("RUN", results["run"]["state"], results["run"].get("error"))
""")


def test_a_run_starting_while_a_tokenizer_loads_in_another_thread(studio_home, tiny_llama, toy_data, embedded_path):
    """Two threads importing the stack for the first time at once (twice, in fresh processes: the
    race did not show every time)."""
    env = dict(os.environ, QLORA_STUDIO_HOME=str(studio_home))
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", RACE, str(tiny_llama), str(toy_data), str(embedded_path)],
                             env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "TOKENIZER " in out.stdout and "Error" not in out.stdout.split("TOKENIZER ")[1].split("\n")[0], out.stdout
        assert "RUN completed None" in out.stdout, out.stdout
