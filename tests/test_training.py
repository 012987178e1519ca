"""Real QLoRA runs: bitsandbytes 4-bit on the CPU, peft adapters, transformers' Trainer."""

import os
import signal
import subprocess
import sys
import time

import pytest

from qlora_studio.compat import keep_4bit_weights_trainable
from qlora_studio.config import TrainConfig
from qlora_studio.errors import ConfigError
from qlora_studio.manager import RunBusy, RunManager
from qlora_studio.plan import auto_lora
from qlora_studio.presets import load_config_file, load_preset
from qlora_studio.runs import RunFolder, list_runs
from qlora_studio.training import prepare_run, run_training


def _losses(run):
    return [r["loss"] for r in run.metrics() if r["type"] == "train"]


def test_tiny_llama_run_writes_a_complete_run_folder(studio_home, tiny_llama, toy_data):
    cfg = TrainConfig(model=str(tiny_llama), data=str(toy_data), max_steps=8, batch_size=8, learning_rate=3e-3,
                      max_seq_len=64, eval_fraction=0.1, quant="nf4")
    run = prepare_run(cfg)
    status = run_training(run)
    assert status["state"] == "completed", status.get("error")
    config, plan = run.config(), run.plan()
    assert config["data_sha256"] and plan["plan"]["rank"] == 16 and plan["plan"]["optimizer"] == "adamw_torch_fused"
    assert set(config) == set(TrainConfig.known()) | {"data_sha256"}, "config.json holds the settings as given"
    assert config["rank"] is None and config["optimizer"] is None, "automatic stays automatic in config.json"
    assert 0 < plan["model"]["trainable_share"] < 1 and plan["schedule"]["total_steps"] == 8
    train = [r for r in run.metrics() if r["type"] == "train"]
    evals = [r for r in run.metrics() if r["type"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 9))
    assert {"loss", "lr", "grad_norm", "tokens", "tokens_per_s", "epoch", "memory_rss_mb"} <= set(train[-1])
    assert evals and "eval_loss" in evals[-1]
    assert train[-1]["loss"] < train[0]["loss"]
    summary = run.summary()
    assert summary["non_pad_tokens"] == train[-1]["tokens"] > 0
    assert summary["tokens_per_s"] > 0 and summary["train_runtime_s"] > 0 and summary["eval"]["eval_loss"] > 0
    assert summary["memory_estimate"]["estimated_bytes"] > 0 and set(summary["memory_estimate"]["breakdown"]) >= {"weights", "logits"}
    assert (run.adapter / "adapter_config.json").is_file() and (run.adapter / "adapter_model.safetensors").is_file()
    assert run.last_checkpoint() is not None
    assert "trainable" in (run.path / "train.log").read_text()
    import torch

    saved = torch.load(run.last_checkpoint() / "optimizer.pt", weights_only=True)  # the optimizer the plan named
    assert saved["param_groups"][0]["fused"] is True and saved["state"]


@pytest.mark.parametrize("quant", ["nf4", "fp4"])
def test_embedded_model_learns_in_4bit(studio_home, toy_data, quant):
    cfg = TrainConfig(model="embedded", data=str(toy_data), max_steps=6, batch_size=4, learning_rate=1e-3,
                      max_seq_len=64, eval_fraction=0.1, eval_steps=3, quant=quant, lora_dropout=0.0)
    run = prepare_run(cfg)
    status = run_training(run)
    assert status["state"] == "completed", status.get("error")
    losses = _losses(run)
    assert losses[-1] < 0.5 * losses[0], losses
    from qlora_studio.hardware import cpu_has_bf16

    assert run.plan()["plan"]["precision"] == ("bf16" if cpu_has_bf16() else "fp32")


def test_a_4bit_model_stays_trainable_after_eval_mode_generation(embedded_path):
    """bitsandbytes repacks 4-bit weights for CPU inference on the first no-grad eval forward; a
    repacked layer passes no gradient to its input. keep_4bit_weights_trainable undoes and prevents it."""
    import torch

    from qlora_studio.loading import load_base_model

    model = load_base_model(embedded_path, "nf4", "bf16", "cpu")
    layer = model.model.layers[0].self_attn.q_proj
    packed_shape = tuple(layer.weight.shape)
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    repacks = getattr(layer, "support_avx512bf16_for_cpu", False)
    if repacks:  # this CPU has AVX512-BF16: the trap is live
        assert getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    restored = keep_4bit_weights_trainable(model)
    assert restored == (len(model.model.layers) * 7 if repacks else 0)
    assert tuple(layer.weight.shape) == packed_shape
    model.eval()
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3]]))
    assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
    x = torch.randn(2, 576, dtype=torch.bfloat16, requires_grad=True)
    layer.train()
    layer(x).float().pow(2).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_stop_saves_a_checkpoint_and_a_second_start_is_refused(studio_home, tiny_llama, toy_data):
    manager = RunManager()
    cfg = TrainConfig(model=str(tiny_llama), data=str(toy_data), max_steps=400, batch_size=2, max_seq_len=64,
                      eval_fraction=0, save_steps=1000)
    run = manager.start(cfg)
    with pytest.raises(RunBusy):
        manager.start(cfg)
    deadline = time.time() + 120
    while not [r for r in run.metrics() if r["type"] == "train"] and time.time() < deadline:
        time.sleep(0.2)
    assert manager.status(run)["state"] == "running"
    assert manager.stop()
    status = manager.wait(120)
    assert status["state"] == "stopped"
    assert manager.active() is None
    steps = status["step"]
    assert 1 <= steps < 400
    assert run.last_checkpoint().name == f"checkpoint-{steps}"
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert [r.state for r in list_runs()] == ["stopped"]


def test_killed_process_leaves_an_interrupted_run_that_resumes(studio_home, tiny_llama, toy_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndata: {toy_data}\nmax_steps: 60\nbatch_size: 2\nmax_seq_len: 64\n"
                      "eval_fraction: 0\nsave_steps: 3\nlearning_rate: 1.0e-3\n")
    env = dict(os.environ, QLORA_STUDIO_HOME=str(studio_home))
    proc = subprocess.Popen([sys.executable, "-m", "qlora_studio.cli", "train", "--config", str(config), "--output", "killed"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run = RunFolder(studio_home / "runs" / "killed")
    deadline = time.time() + 180
    while time.time() < deadline and not (run.checkpoints_dir / "checkpoint-6").is_dir():
        time.sleep(0.2)
    assert (run.checkpoints_dir / "checkpoint-6").is_dir(), proc.stdout.read() if proc.poll() is not None else "timeout"
    time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    [record] = list_runs()
    assert record.state == "interrupted" and record.resumable
    # A save cut short by a kill (a checkpoint folder without trainer_state.json) is never resumed from.
    torn = run.checkpoints_dir / "checkpoint-999"
    torn.mkdir()
    (torn / "adapter_model.safetensors").write_bytes(b"")
    assert run.last_checkpoint().name != "checkpoint-999"
    ckpt_step = int(run.last_checkpoint().name.split("-")[1])
    manager = RunManager()
    manager.resume("killed")
    status = manager.wait(300)
    assert status["state"] == "completed", status.get("error")
    steps = [r["step"] for r in run.metrics() if r["type"] == "train"]
    assert steps == list(range(1, 61)), "metrics continue from the checkpoint without gaps or repeats"
    assert run.summary()["resumed"] is True and run.summary()["global_step"] == 60
    assert f"resuming from checkpoint-{ckpt_step}" in (run.path / "train.log").read_text()


def test_a_failing_run_is_recorded_and_the_manager_survives(studio_home, toy_data, tmp_path):
    manager = RunManager()
    bad_model = tmp_path / "not-a-model"
    bad_model.mkdir()
    run = manager.start(TrainConfig(model=str(bad_model), data=str(toy_data), max_steps=2))
    status = manager.wait(60)
    assert status["state"] == "failed" and "no config.json" in status["error"]
    assert run.status()["state"] == "failed"
    assert manager.active() is None


def test_config_errors_name_file_line_and_field(tmp_path, toy_data):
    path = tmp_path / "c.yaml"
    path.write_text(f"model: embedded\ndata: {toy_data}\nbatch_size: eight\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3 batch_size: must be a whole number"):
        load_config_file(path)
    path.write_text(f"data: {toy_data}\n\nlearning_rat: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3 learning_rat: unknown setting"):
        load_config_file(path)
    path.write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d+: not valid YAML"):
        load_config_file(path)
    path.write_text(f"settings:\n  data: {toy_data}\n  quant: int3\n")
    with pytest.raises(ConfigError, match=r"c.yaml:3 quant: 'int3' is not one of"):
        load_config_file(path)
    cfg = load_config_file(path, {"quant": "fp4", "learning_rate": 1e-4})
    assert cfg.quant == "fp4" and cfg.learning_rate == 1e-4
    with pytest.raises(ConfigError, match="no preset named"):
        load_preset("../etc/passwd")


def test_cpu_demo_preset_resolves_its_shipped_data():
    cfg = load_preset("cpu-demo")
    assert cfg.model == "embedded" and cfg.task == "sql" and cfg.quant == "nf4"
    assert os.path.isfile(cfg.data) and os.path.isfile(cfg.test_data)


def test_auto_lora_by_size_and_task():
    names = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    attn = ["k_proj", "o_proj", "q_proj", "v_proj"]
    rank, alpha, targets, _ = auto_lora(TrainConfig(data="x"), names, None, int(0.5e9))
    assert targets == sorted(names) and rank == 16 and alpha == 32
    assert auto_lora(TrainConfig(data="x"), names, None, int(7e9))[2] == attn
    assert auto_lora(TrainConfig(data="x"), names, set(attn), int(7e9))[2] == attn, "roles from the architecture"
    assert auto_lora(TrainConfig(data="x", task="sql"), names, None, int(7e9))[2] == sorted(names)
    assert auto_lora(TrainConfig(data="x"), names, None, int(70e9))[0] == 8
    over = auto_lora(TrainConfig(data="x", rank=4, targets=["q_proj", "v_proj"]), names, None, int(7e9))
    assert over[:3] == (4, 8, ["q_proj", "v_proj"])
    with pytest.raises(ConfigError, match="not linear layers"):
        auto_lora(TrainConfig(data="x", targets=["c_attn"]), names, None, int(7e9))
