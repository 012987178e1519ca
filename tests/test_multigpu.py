"""More than one process: the plan, the guard, the FSDP2 settings as accelerate reads them, a job for another
machine, and real 2-process data-parallel QLoRA runs of the tiny Llama on the CPU (torchrun, gloo, 4-bit
bitsandbytes): both ranks end with identical adapters, rank 0 alone writes the run folder, a kill of the
launching process and a stop both leave a run that resumes, and the losses are a single process's.

FSDP cannot run here (no GPU: accelerate falls back to DDP on the CPU); what can be checked without one is:
its plan and memory, its accelerate config (accelerate's own loader and launcher environment), the plugin
and TrainingArguments built from it, and the 4-bit storage dtype equal to the compute dtype."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qlora_studio.catalog import load_architecture
from qlora_studio.config import TrainConfig
from qlora_studio.errors import ConfigError
from qlora_studio.hardware import find_gpu
from qlora_studio.parallel import WorldMismatch, accelerate_config, check_world, fsdp_options
from qlora_studio.plan import Machine, plan_run
from qlora_studio.runs import RunFolder
from qlora_studio.worker import FAILED_LINE
from qlora_studio.world import World

GiB = 2**30


def _train(run: RunFolder) -> list[dict]:
    return [r for r in run.metrics() if r.get("type") == "train"]


# ------------------------------------------------------------------ the plan


def test_the_plan_splits_the_effective_batch_and_knows_the_memory_per_gpu():
    cpu = Machine("cpu", ram_available_bytes=16 * GiB)
    arch = load_architecture("SmolLM2-135M")
    plan = plan_run(TrainConfig(data="x", processes=2, batch_size=4, grad_accum=2), cpu, arch)
    assert (plan.processes, plan.parallel, plan.batch_size, plan.grad_accum, plan.effective_batch) == (2, "ddp", 4, 1, 8)
    assert "gloo" in plan.reasons["processes"] and "effective batch 8 kept" in plan.reasons["processes"]
    assert any(line.startswith("processes: 2 (ddp)") for line in plan.lines())
    one = plan_run(TrainConfig(data="x", batch_size=4, grad_accum=2), cpu, arch)
    assert (one.processes, one.parallel, one.effective_batch) == (1, "single", 8)
    assert plan.memory["per_gpu"]["ddp"] > one.memory["estimate_bytes"]  # DDP's buckets: the gradients again
    odd = plan_run(TrainConfig(data="x", processes=2, batch_size=3, grad_accum=2), cpu, arch)
    assert (odd.batch_size, odd.grad_accum) == (3, 1)
    with pytest.raises(ConfigError, match="cannot be split evenly over 3") as e:
        plan_run(TrainConfig(data="x", processes=3, batch_size=4, grad_accum=2), cpu, arch)
    assert e.value.field == "processes"
    with pytest.raises(ConfigError, match="fsdp needs CUDA GPUs"):
        plan_run(TrainConfig(data="x", processes=2, parallel="fsdp"), cpu, arch)

    cards = Machine.for_gpu(find_gpu("RTX 4090"), count=2)
    with pytest.raises(ConfigError, match="4 asked for, but the plan is for 2 GPUs"):
        plan_run(TrainConfig(data="x", processes=4), cards, arch)
    small = plan_run(TrainConfig(data="x", model="Qwen2.5-7B", processes=2, batch_size=2, grad_accum=4),
                     cards, load_architecture("Qwen2.5-7B"))
    assert small.parallel == "ddp" and small.memory["fits"] and "fits" in small.reasons["parallel"]
    big_arch = load_architecture("Qwen2.5-72B")
    big = plan_run(TrainConfig(data="x", model="Qwen2.5-72B", processes=4, batch_size=2, grad_accum=4,
                               max_seq_len=1024), Machine.for_gpu(find_gpu("A100-40GB"), count=4), big_arch)
    per = big.memory["per_gpu"]
    assert big.parallel == "fsdp" and per["fsdp"] < 32 * GiB < 40 * GiB < per["ddp"], per
    assert big.memory["estimate_bytes"] == per["fsdp"] and big.memory["fits"]
    assert "does not fit one GPU" in big.reasons["parallel"] and "golden prompts are not answered" in big.reasons["parallel"]
    assert big.quant_storage == big.precision == "bf16"  # FSDP-QLoRA: 4-bit packed in the compute dtype
    assert big.optimizer == "adamw_torch"  # paged 8-bit AdamW cannot save under FSDP
    assert big.batching == "grouped" and "no FSDP process holds" in big.reasons["batching"]
    weights_one = plan_run(TrainConfig(data="x", model="Qwen2.5-72B"), Machine.for_gpu(find_gpu("A100-40GB")),
                           big_arch).memory["breakdown"]["weights"]
    assert big.memory["breakdown"]["weights"] < 0.4 * weights_one  # a quarter of the base, plus what is gathered
    roomy = plan_run(TrainConfig(data="x", model="Qwen2.5-72B", processes=2, batch_size=2, grad_accum=4),
                     Machine.for_gpu(find_gpu("A100-80GB"), count=2), big_arch)
    assert roomy.parallel == "ddp"  # a copy fits an 80 GB card: data parallel, the faster
    with pytest.raises(ConfigError, match="paged_adamw_8bit fails"):
        plan_run(TrainConfig(data="x", model="Qwen2.5-72B", processes=2, parallel="fsdp", optimizer="paged_adamw_8bit"),
                 cards, big_arch)


def test_gpus_and_nproc_flags_and_the_train_form(capsys):
    import argparse

    from qlora_studio.config import add_flags, flag_overrides

    parser = argparse.ArgumentParser()
    add_flags(parser)
    assert flag_overrides(parser.parse_args(["--gpus", "2", "--parallel", "fsdp"])) == {"processes": "2",
                                                                                      "parallel": "fsdp"}
    assert flag_overrides(parser.parse_args(["--nproc", "4"])) == {"processes": "4"}
    from qlora_studio.ui.train import FORM_SETTINGS, form_groups

    assert "parallel" not in form_groups(1) and "parallel" in form_groups(2)
    assert "processes" not in {s.name for s in FORM_SETTINGS}  # this machine has no two GPUs

    from qlora_studio.cli import main

    totals = {}
    for gpus, parallel in ((1, "ddp"), (4, "ddp"), (4, "fsdp")):
        assert main(["estimate", "--model", "Qwen2.5-72B", "--gpus", str(gpus), "--parallel", parallel, "--json"]) == 0
        totals[gpus, parallel] = json.loads(capsys.readouterr().out)
    assert totals[4, "fsdp"]["total_bytes"] < 0.6 * totals[1, "ddp"]["total_bytes"] < totals[4, "ddp"]["total_bytes"]
    assert "FSDP over 4" in totals[4, "fsdp"]["assumptions"][-1] and "DDP" in totals[4, "ddp"]["assumptions"][-1]


# ------------------------------------------------------------------ FSDP2 without a GPU


def _fsdp_plan():
    return plan_run(TrainConfig(data="x", model="Qwen2.5-72B", processes=8, batch_size=2, grad_accum=4, parallel="fsdp"),
                    Machine.for_gpu(find_gpu("A100-80GB"), count=8), load_architecture("Qwen2.5-72B"))


def test_the_fsdp_config_is_read_by_accelerate_and_builds_the_plugin(tmp_path, monkeypatch):
    import yaml
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env
    from transformers import TrainingArguments

    plan = _fsdp_plan()
    assert plan.parallel == "fsdp"
    path = tmp_path / "accelerate_config.yaml"
    path.write_text(yaml.safe_dump(accelerate_config(plan)))
    loaded = load_config_from_file(str(path))  # accelerate's own loader
    assert str(loaded.distributed_type).endswith("FSDP") and loaded.num_processes == 8
    assert loaded.fsdp_config["fsdp_version"] == 2 and loaded.mixed_precision == "bf16"

    # What `accelerate launch --config_file` hands the processes, and the plugin each one builds from it.
    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "qlora_studio.worker", "RUN"])
    args, *_ = _validate_launch_command(args)
    env = prepare_multi_gpu_env(args)
    assert env["ACCELERATE_USE_FSDP"] == "true" and env["FSDP_VERSION"] == "2"
    for key, value in env.items():
        if key.startswith(("FSDP_", "ACCELERATE_")):
            monkeypatch.setenv(key, value)
    from_env = FullyShardedDataParallelPlugin()
    assert from_env.fsdp_version == 2 and from_env.cpu_ram_efficient_loading is True
    assert from_env.activation_checkpointing is True and from_env.reshard_after_forward is True

    # What the worker gives the Trainer: the same settings, through TrainingArguments.
    targs = TrainingArguments(output_dir=str(tmp_path / "out"), fsdp=True, fsdp_config=fsdp_options(plan),
                              use_cpu=True, report_to="none")
    plugin = FullyShardedDataParallelPlugin(**targs.fsdp_plugin_args)
    assert plugin.fsdp_version == 2 and plugin.auto_wrap_policy is not None
    assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT") == str(from_env.state_dict_type).endswith(
        "FULL_STATE_DICT") is True
    assert plugin.activation_checkpointing == from_env.activation_checkpointing


def test_4bit_weights_are_stored_in_the_compute_dtype_for_fsdp(tiny_llama):
    import torch

    from qlora_studio.loading import load_base_model

    model = load_base_model(tiny_llama, "nf4", "bf16", "cpu", quant_storage="bf16")
    layer = model.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ == "Linear4bit" and layer.weight.dtype == torch.bfloat16
    quant = model.config.quantization_config
    assert quant.bnb_4bit_quant_storage == quant.bnb_4bit_compute_dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits.float()).all()


def test_the_guard_refuses_a_world_that_is_not_the_plan(studio_home, tiny_llama, toy_data, capsys):
    plan = plan_run(TrainConfig(data="x", processes=2), Machine("cpu", ram_available_bytes=16 * GiB))
    check_world(plan, World(rank=0, size=2, local_size=2))
    with pytest.raises(WorldMismatch, match="1 process launched, but the run was planned for 2"):
        check_world(plan, World())
    with pytest.raises(WorldMismatch, match="accelerate was launched with FSDP, but the run was planned for ddp"):
        check_world(plan, World(size=2, local_size=2), accelerate_fsdp=True)
    fsdp = _fsdp_plan()
    with pytest.raises(WorldMismatch, match="8 processes on this machine but only 4 GPUs"):
        check_world(fsdp, World(size=8, local_size=8), cuda_devices=4)

    # The worker started without torchrun (one process) on a 2-process run: refused before loading anything.
    from qlora_studio.training import prepare_run
    from qlora_studio.worker import main

    run = prepare_run(TrainConfig(model=str(tiny_llama), data=str(toy_data), processes=2, max_steps=2, batch_size=2,
                                  max_seq_len=64))
    assert main([str(run.path)]) == 1
    assert f"{FAILED_LINE} 0 failed (WorldMismatch)" in capsys.readouterr().err
    status = run.status()
    assert status["state"] == "failed" and "planned for 2" in status["error"] and status["error_kind"] == "WorldMismatch"


# ------------------------------------------------------------------ a job for another machine


def test_a_run_exported_as_a_job(studio_home, toy_data, capsys):
    from accelerate.commands.config.config_args import load_config_from_file

    from qlora_studio.cli import main

    code = main(["job", "--data", str(toy_data), "--model", "Qwen2.5-72B", "--gpus", "8", "--gpu", "A100-40GB",
                 "--nodes", "2", "--batch-size", "2", "--grad-accum", "4", "--output", "big-job"])
    out = capsys.readouterr().out
    assert code == 0, out
    run = RunFolder(studio_home / "runs" / "big-job")
    assert Path(out.strip().splitlines()[-1]) == run.path
    job = run.path / "job"
    assert {p.name for p in job.iterdir()} >= {"accelerate_config.yaml", "config.json", "plan.json", "launch.sh", "data",
                                               "job.json"}
    assert (job / "data" / toy_data.name).read_bytes() == toy_data.read_bytes()
    plan = json.loads((job / "plan.json").read_text())["plan"]
    assert (plan["processes"], plan["parallel"], plan["quant_storage"]) == (8, "fsdp", "bf16")
    cfg = load_config_from_file(str(job / "accelerate_config.yaml"))
    assert cfg.num_processes == 8 and cfg.num_machines == 2 and cfg.fsdp_config["fsdp_version"] == 2
    described = json.loads((job / "job.json").read_text())
    assert described["commands"]["multi_node"].startswith(
        "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --rdzv-id big-job")
    assert described["commands"]["single_node"].startswith("accelerate launch --config_file big-job/job/")
    assert "torchrun --nnodes 2" in out and "accelerate launch" in out
    assert subprocess.run(["bash", "-n", str(job / "launch.sh")]).returncode == 0
    status = run.status()
    assert status["state"] == "interrupted" and status["phase"] == "exported job"
    from qlora_studio.manager import RunManager

    with pytest.raises(WorldMismatch, match="8 processes on this machine but only 0 GPUs"):
        RunManager._check_processes(run)  # brought back unfinished: not resumed on a machine without the GPUs
    with pytest.raises(ConfigError, match="6 processes cannot be split evenly over 4 machines"):
        from qlora_studio.job import export_job

        export_job(TrainConfig(data=str(toy_data), processes=6, batch_size=6), gpu="A100-80GB", nodes=4)


# ------------------------------------------------------------------ real 2-process runs on the CPU


def _settings(tiny_llama, toy_data, **over) -> dict:
    settings = dict(model=str(tiny_llama), data=str(toy_data), max_steps=12, batch_size=4, grad_accum=2,
                    max_seq_len=64, learning_rate=1e-2, lora_dropout=0.0, eval_fraction=0.1, eval_steps=6,
                    save_steps=3, golden_prompts=1, golden_max_new_tokens=8, seed=7)
    settings.update(over)
    return settings


def _wait(predicate, what: str, proc=None, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"ended early (rc {proc.returncode}) while waiting for {what}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _worker_pid(rank: int) -> int | None:
    """The pid of this process's worker of ``rank`` (by its environment: torchrun's RANK, our launcher's pid)."""
    want = {f"RANK={rank}".encode(), f"QLORA_STUDIO_LAUNCHER_PID={os.getpid()}".encode()}
    for proc in Path("/proc").iterdir():
        try:
            env = set((proc / "environ").read_bytes().split(b"\0"))
        except (OSError, ValueError):
            continue
        if proc.name.isdigit() and want <= env and b"qlora_studio.worker" in (proc / "cmdline").read_bytes():
            return int(proc.name)
    return None


def test_two_processes_train_as_one_resume_after_a_kill_and_stop_together(studio_home, tiny_llama, toy_data, tmp_path):
    from qlora_studio.manager import RunManager
    from qlora_studio.training import prepare_run, run_training

    t0 = time.time()
    single = prepare_run(TrainConfig(**_settings(tiny_llama, toy_data, name="single", golden_prompts=0)))
    assert run_training(single)["state"] == "completed"
    t_single = time.time() - t0

    # The 2-process run, from the command line; its launcher killed (-9) after the checkpoint of step 3.
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps(_settings(tiny_llama, toy_data, processes=2)))
    run = RunFolder(studio_home / "runs" / "ddp")
    log = tmp_path / "cli.out"
    env = dict(os.environ, QLORA_STUDIO_HOME=str(studio_home), PYTHONUNBUFFERED="1")
    t1 = time.time()
    cli = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "train", "--config", str(config), "--output", "ddp"],
                           env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    _wait(lambda: (run.checkpoints_dir / "checkpoint-3" / "trainer_state.json").is_file(), "checkpoint-3", cli)
    rank0 = run.status()["pid"]
    assert rank0 != cli.pid and run.plan()["plan"]["processes"] == 2
    cli.send_signal(signal.SIGKILL)
    cli.wait()
    _wait(lambda: not _pid_alive(rank0), "the workers to notice their launcher is gone", timeout=120)
    assert run.status()["state"] == "interrupted"
    assert run.last_checkpoint() is not None and not (run.adapter / "adapter_model.safetensors").exists()

    # Resumed from the app's manager (2 processes again); its rank 1 killed: the run fails and says which, how.
    manager = RunManager()
    manager.resume("ddp")
    # rank 1 killed as soon as it runs: waiting for steps first raced the end of the run on a quiet machine (the
    # first launch may have saved checkpoint-9 before its workers noticed their launcher was gone)
    pids = []
    rank0_lines = lambda: (run.path / "train.log").read_text().count("this is rank 0, which writes the run folder")  # noqa: E731
    _wait(lambda: rank0_lines() == 2 and (pids.append(_worker_pid(1)) or pids[-1]), "the resumed run's ranks")
    os.kill(pids[-1], signal.SIGKILL)
    failed = manager.wait(240)
    assert failed["state"] == "failed" and failed["error_kind"] == "workers", failed
    assert failed["error"].startswith("rank 1 ended with exit code -9") and "SIGKILL" in failed["error"], failed["error"]
    assert failed["exit_code"] != 0 and failed["log_tail"] and run.status()["state"] == "failed"
    from qlora_studio.runs import RunRecord

    assert RunRecord.from_folder(run).resumable

    # Resumed again and stopped while its processes start: every process stops at the same step, the first
    # after the resume (waiting for a step before asking raced the run's end: the tiny model's last steps
    # take less than the launcher's poll); then resumed to the end.
    manager.resume("ddp")
    resumed_from = max(s for s, _ in run.checkpoints())
    assert resumed_from <= 9, f"the first launch saved checkpoint-{resumed_from}: no steps left to stop in"
    assert manager.stop()
    stopped = manager.wait(240)
    assert stopped["state"] == "stopped", stopped
    assert stopped["step"] == resumed_from + 1 and run.last_checkpoint().name == f"checkpoint-{stopped['step']}"
    manager.resume("ddp")
    final = manager.wait(300)
    t_ddp = time.time() - t1
    assert final["state"] == "completed", final

    # Rank 0 alone wrote the run folder: one record per step, one summary; both replicas ended identical.
    steps = [r["step"] for r in _train(run)]
    assert steps == list(range(1, 13)), steps
    summary = run.summary()
    replicas = summary["processes"]
    assert replicas["count"] == 2 and replicas["adapters_identical"] is True
    assert [r["rank"] for r in replicas["ranks"]] == [0, 1] and len({r["adapter_sha256"] for r in replicas["ranks"]}) == 1
    assert (run.adapter / "adapter_model.safetensors").is_file() and summary["eval"]["eval_loss"] > 0
    logged = (run.path / "train.log").read_text()
    # One line per launch (train, resume, resume, resume): rank 0's alone.
    assert logged.count("this is rank 0, which writes the run folder") == 4
    assert "stop requested" in logged and "resuming from checkpoint-" in logged
    assert (run.path / "workers.log").is_file() and not (run.path / ".stop").exists()

    # The same effective batch on one process: the same losses, step by step, within noise.
    a, b = [r["loss"] for r in _train(single)], [r["loss"] for r in _train(run)]
    worst = max(abs(x - y) / x for x, y in zip(a, b))
    print(f"\nsingle {t_single:.0f} s, 2 processes (4 launches: killed, failed, stopped, completed) {t_ddp:.0f} s; "
          f"losses single {a[0]:.4f} -> {a[-1]:.4f}, 2 processes {b[0]:.4f} -> {b[-1]:.4f}; worst step diff {worst:.2%}")
    assert b[-1] < b[0] - 0.4 and worst < 0.05, list(zip(a, b))


def test_an_exported_job_runs_with_its_own_torchrun_command(studio_home, tiny_llama, toy_data, tmp_path, capsys):
    """The job's multi-node command (c10d rendezvous), run here as another machine would run it: no studio
    process launches it, so rank 0 owns the run itself; the folder is then a completed run like any other."""
    import shlex
    import socket

    from qlora_studio.cli import main
    from qlora_studio.runs import list_runs

    config = tmp_path / "job.json"
    config.write_text(json.dumps(_settings(tiny_llama, toy_data, max_steps=4, eval_fraction=0.0, golden_prompts=0)))
    assert main(["job", "--config", str(config), "--gpus", "2", "--output", "job-run", "--json"]) == 0
    described = json.loads(capsys.readouterr().out)
    assert (described["processes"], described["parallel"]) == (2, "ddp")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = shlex.split(described["commands"]["multi_node"].replace("HOST:29500", f"127.0.0.1:{port}"))
    assert command[:3] == ["torchrun", "--nnodes", "1"]
    env = {k: v for k, v in os.environ.items() if k != "QLORA_STUDIO_LAUNCHER_PID"}
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", *command[1:]], cwd=studio_home / "runs",
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    run = RunFolder(studio_home / "runs" / "job-run")
    assert run.status()["state"] == "completed" and [r["step"] for r in _train(run)] == [1, 2, 3, 4]
    assert run.summary()["processes"]["adapters_identical"] is True
    assert {r.name: r.state for r in list_runs()}["job-run"] == "completed"
    from qlora_studio.ownership import run_owner

    assert run_owner(run.path) is None  # rank 0 held the run while it trained, and let it go


def test_the_launcher_reads_which_rank_failed_and_why(tmp_path):
    """workers.log as torchrun and the workers write it: the rank torchrun saw fail first is the cause; its own
    message says why, and an out-of-memory one is retried like a single process's."""
    from qlora_studio.launcher import WORKERS_LOG, _outcome
    from qlora_studio.runs import atomic_write_json

    run = RunFolder(tmp_path)
    atomic_write_json(tmp_path / "status.json", {"state": "failed", "error": "RuntimeError: Connection closed by peer",
                                                 "error_kind": "RuntimeError", "phase": "failed"})
    root = ["Root Cause (first observed failure):", "[0]:", "  time      : 2026-12-03_18:21:31", "  host      : localhost",
            "  rank      : 1 (local_rank: 1)", "  exitcode  : 1 (pid: 20271)", "  error_file: <N/A>",
            "  traceback : To enable traceback see: https://pytorch.org/docs/stable/elastic/errors.html"]
    (tmp_path / WORKERS_LOG).write_text("\n".join([
        f"{FAILED_LINE} 1 failed (oom): OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        f"{FAILED_LINE} 0 failed (RuntimeError): RuntimeError: Connection closed by peer", *root]) + "\n")
    status, error, kind = _outcome(run, 1, 0)
    assert kind == "oom" and error.startswith("rank 1 failed (oom): OutOfMemoryError: CUDA out of memory"), error
    assert status["log_tail"][-1].startswith("  traceback")
    # Rank 0 the cause (its own record stands), and nothing reported but an exit code.
    (tmp_path / WORKERS_LOG).write_text("\n".join(root).replace("rank      : 1", "rank      : 0") + "\n")
    assert _outcome(run, 1, 0)[1:] == (None, "RuntimeError")
    atomic_write_json(tmp_path / "status.json", {"state": "running", "phase": "training"})
    (tmp_path / WORKERS_LOG).write_text("torchrun: some last words\n")
    status, error, kind = _outcome(run, -9, 0)
    assert kind == "workers" and error == "the worker processes ended with signal 9: torchrun: some last words"
