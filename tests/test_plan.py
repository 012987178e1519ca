"""One plan, one config: the settings schema, the precision rule, and the RunPlan that the page shows and
the trainer runs."""

import json
import os
import subprocess
import sys

import pytest

from qlora_studio.catalog import load_architecture
from qlora_studio.config import BY_NAME, SETTINGS, TrainConfig, add_flags, flag_overrides
from qlora_studio.errors import ConfigError, StudioError
from qlora_studio.hardware import find_gpu
from qlora_studio.plan import Machine, RunPlan, plan_for, plan_run, precision_for

GiB = 2**30


# ------------------------------------------------------------------ the schema


def test_every_setting_is_declared_once_with_type_default_and_help():
    names = [s.name for s in SETTINGS]
    assert len(names) == len(set(names)) and set(names) == TrainConfig.known()
    assert {"rank", "targets", "batching", "gradient_checkpointing", "optimizer", "device"} <= {s.name for s in SETTINGS if s.auto}
    defaults = TrainConfig(data="x")
    for s in SETTINGS:
        assert s.help and s.kind in ("str", "int", "float", "bool", "choice", "targets"), s
        assert getattr(defaults, s.name) == (s.default if s.name != "data" else "x")
        if s.default is None:
            assert s.auto, f"{s.name}: a None default must mean automatic"


def test_values_are_coerced_and_checked_by_their_declaration():
    cfg = TrainConfig.from_dict({"data": "x", "learning_rate": "2e-4", "rank": 8.0, "gradient_checkpointing": "off",
                                 "targets": "q_proj, v_proj", "batching": "auto", "task": "none"}, source="f.yaml")
    assert cfg.learning_rate == 2e-4 and cfg.rank == 8 and isinstance(cfg.rank, int)
    assert cfg.gradient_checkpointing is False and cfg.targets == ["q_proj", "v_proj"]
    assert cfg.batching is None and cfg.task is None
    bad = [({"rank": 2.5}, "rank: must be a whole number"), ({"rank": 0}, "rank: must be >= 1"),
           ({"learning_rate": 1.5}, "learning_rate: must be > 0 and < 1"), ({"quant": "int3"}, "quant: 'int3' is not one"),
           ({"batch_size": None}, "batch_size: needs a value"), ({"double_quant": "maybe"}, "double_quant: must be true"),
           ({"epochs": float("nan")}, "epochs: must be a number"), ({"eval_fraction": 1}, "eval_fraction: must be"),
           ({"colour": "red"}, "colour: unknown setting")]
    for change, message in bad:
        with pytest.raises(ConfigError, match=message) as e:
            TrainConfig.from_dict({"data": "x", **change}, source="f.yaml")
        assert str(e.value).startswith("f.yaml: ") and e.value.field == next(iter(change))
        assert isinstance(e.value, StudioError)


def test_command_line_flags_come_from_the_schema():
    import argparse

    parser = argparse.ArgumentParser()
    add_flags(parser)
    flags = {a.dest for a in parser._actions if a.option_strings and a.dest != "help"}
    assert flags == {s.name for s in SETTINGS if s.flag_name}
    args = parser.parse_args(["--rank", "8", "--no-double-quant", "--output", "mine", "--batching", "auto"])
    assert flag_overrides(args) == {"rank": "8", "double_quant": False, "name": "mine", "batching": "auto"}
    cfg = TrainConfig.from_dict({"data": "x", **flag_overrides(args)})
    assert (cfg.rank, cfg.double_quant, cfg.name, cfg.batching) == (8, False, "mine", None)
    assert BY_NAME["name"].flag_name == "--output" and BY_NAME["init_adapter"].flag_name is None


# ------------------------------------------------------------------ precision


@pytest.mark.parametrize("device, cc, training, cpu_bf16, expected", [
    ("cpu", None, True, True, "bf16"), ("cpu", None, True, False, "fp32"), ("cpu", None, False, True, "fp32"),
    ("cuda", (6, 1), True, False, "fp32"), ("cuda", (6, 0), True, False, "fp16"), ("cuda", (7, 5), True, True, "fp16"),
    ("cuda", (8, 0), True, False, "bf16"), ("cuda", (8, 9), True, False, "bf16"), ("cuda", (9, 0), False, False, "bf16")])
def test_one_precision_rule(device, cc, training, cpu_bf16, expected):
    assert precision_for(device, cc, training=training, cpu_bf16=cpu_bf16) == expected


def test_this_machine_is_planned_with_its_own_cpu_precision():
    from qlora_studio.hardware import cpu_has_bf16

    machine = Machine.detect("cpu")
    assert machine.cpu_bf16 == cpu_has_bf16()
    plan = plan_for(TrainConfig(data="x", device="cpu"), machine)
    assert plan.precision == ("bf16" if machine.cpu_bf16 else "fp32") and "CPU" in plan.reasons["precision"]


@pytest.mark.parametrize("card, precision", [("GTX 1080", "fp32"), ("T4", "fp16"), ("A100", "bf16"), ("RTX 4090", "bf16")])
def test_the_plan_the_card_and_the_estimator_agree_on_precision(card, precision):
    spec = find_gpu(card)
    arch = load_architecture("Qwen2.5-0.5B")
    plan = plan_run(TrainConfig(data="x", model="Qwen2.5-0.5B"), Machine.for_gpu(spec), arch)
    assert plan.precision == spec.compute_dtype == precision
    assert str(spec.compute_capability[0]) in plan.reasons["precision"]
    assert plan.device == "cuda" and plan.optimizer == "paged_adamw_8bit" and plan.attention == "sdpa"
    assert plan.gradient_checkpointing is True and plan.memory["available_bytes"] == spec.vram_bytes
    from qlora_studio.estimator import estimate

    again = estimate(arch, rank=plan.rank, targets="all", batch=plan.batch_size, seq=plan.max_seq_len,
                     compute_dtype=precision)
    assert plan.memory["estimate_bytes"] == again.total_bytes  # the plan's estimate is the estimator's


def test_attention_on_the_cpu_is_sdpa_per_packed_example_where_it_applies():
    cpu = Machine("cpu", ram_available_bytes=16 * GiB)
    smol = load_architecture("SmolLM2-135M")
    plan = plan_run(TrainConfig(data="x"), cpu, smol)
    assert plan.attention == "packed_sdpa" and "each packed example" in plan.reasons["attention"]
    assert any(line.startswith("attention: packed_sdpa -- SDPA on each packed example") for line in plan.lines())
    padded = plan_run(TrainConfig(data="x", batching="padded"), cpu, smol)
    assert padded.attention == "eager" and "padded" in padded.reasons["attention"]
    gemma2 = plan_run(TrainConfig(data="x"), cpu, load_architecture("Gemma-2-2B"))
    assert gemma2.attention == "eager" and "soft-capping" in gemma2.reasons["attention"]
    unknown = plan_run(TrainConfig(data="x"), cpu, None)
    assert unknown.attention == "eager"
    chosen = plan_run(TrainConfig(data="x", attention="sdpa"), cpu, smol)
    assert chosen.attention == "sdpa" and "attention" not in chosen.reasons
    gpu = plan_run(TrainConfig(data="x"), Machine("cuda", "NVIDIA GeForce RTX 3060", (8, 6), 12 * GiB, 11 * GiB), smol)
    assert gpu.attention == "sdpa"


@pytest.mark.parametrize("key,cpu_value,gpu_value,cpu_why,line", [
    ("cross_entropy", "chunked", "torch", "fp32 copy", "cross-entropy"),
    ("lora_update", "fused", "peft", "rounded once", "LoRA update"),
    ("dropout_masks", "16bit", "torch", "one element at a time", "dropout masks"),
])
def test_cpu_speed_settings_are_automatic_by_device_say_why_and_give_way_to_the_config(key, cpu_value, gpu_value,
                                                                                       cpu_why, line):
    smol = load_architecture("SmolLM2-135M")
    cpu, gpu = Machine("cpu", ram_available_bytes=8 * GiB), Machine("cuda", "RTX 3060", (8, 6), 12 * GiB, 12 * GiB)
    on_cpu = plan_run(TrainConfig(data="x"), cpu, smol)
    assert getattr(on_cpu, key) == cpu_value and cpu_why in on_cpu.reasons[key]
    assert any(text.startswith(f"{line}: {cpu_value} -- ") for text in on_cpu.lines())
    on_gpu = plan_run(TrainConfig(data="x"), gpu, smol)
    assert getattr(on_gpu, key) == gpu_value and on_gpu.reasons[key]
    asked = plan_run(TrainConfig(data="x", **{key: gpu_value}), cpu, smol)
    assert getattr(asked, key) == gpu_value and key not in asked.reasons


def test_a_cpu_plan():
    plan = plan_run(TrainConfig(data="x"), Machine("cpu", ram_available_bytes=16 * GiB, cpu_bf16=True),
                    load_architecture("SmolLM2-135M"))
    assert (plan.device, plan.precision, plan.optimizer, plan.attention, plan.batching) == \
        ("cpu", "bf16", "adamw_torch_fused", "packed_sdpa", "packed")
    avx2 = plan_run(TrainConfig(data="x"), Machine("cpu", ram_available_bytes=16 * GiB), load_architecture("SmolLM2-135M"))
    assert avx2.precision == "fp32" and "no native bf16" in avx2.reasons["precision"]
    assert avx2.memory["estimate_bytes"] > plan.memory["estimate_bytes"]  # fp32 activations are twice as big
    assert plan.targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert plan.rank == 16 and plan.alpha == 32 and "under 3B" in plan.reasons["lora"]
    assert plan.gradient_checkpointing is False  # fits in half the RAM without it
    tight = plan_run(TrainConfig(data="x"), Machine("cpu", ram_available_bytes=GiB // 4), load_architecture("SmolLM2-135M"))
    assert tight.gradient_checkpointing is True and "more than half" in tight.reasons["gradient_checkpointing"]
    with pytest.raises(ConfigError, match="device: cuda"):
        plan_run(TrainConfig(data="x", device="cuda"), Machine("cpu"), load_architecture("SmolLM2-135M"))
    assert RunPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan


def test_a_big_model_on_a_small_card_does_not_fit_and_says_so():
    plan = plan_run(TrainConfig(data="x", model="Qwen2.5-14B", max_seq_len=2048, batch_size=4),
                    Machine.for_gpu(find_gpu("RTX 3060")), load_architecture("Qwen2.5-14B"))
    assert plan.memory["fits"] is False and plan.targets == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert any("does NOT fit" in line for line in plan.lines())


def test_recorded_runs_calibrate_the_plan_and_say_so(studio_home):
    from qlora_studio.estimator import record_measurement

    arch = load_architecture("Qwen2.5-0.5B")
    cfg = TrainConfig(data="x", model="Qwen2.5-0.5B")
    card = Machine("cuda", "NVIDIA GeForce RTX 3060", (8, 6), 12 * GiB, 11 * GiB)
    before = plan_run(cfg, card, arch).memory
    assert "calibration" not in before
    for ratio in (1.10, 1.20, 1.30):
        record_measurement(10**9, int(ratio * 10**9), "NVIDIA GeForce RTX 3060")
    after = plan_run(cfg, card, arch).memory
    assert after["uncalibrated_bytes"] == before["estimate_bytes"]
    assert after["estimate_bytes"] == pytest.approx(1.2 * before["estimate_bytes"], rel=1e-6)
    assert "scaled by 1.200" in after["calibration"] and "3 finished runs" in after["calibration"]
    other = plan_run(cfg, Machine("cuda", "NVIDIA RTX A4000", (8, 6), 16 * GiB, 16 * GiB), arch).memory
    assert "calibration" not in other  # only this card's runs count


def test_an_unknown_model_gets_its_targets_when_it_loads(tmp_path):
    cfg = TrainConfig(data="x", model=str(tmp_path / "model.gguf"))
    plan = plan_for(cfg, Machine("cpu", ram_available_bytes=8 * GiB))
    assert plan.targets == [] and plan.memory is None and "when the model loads" in plan.reasons["lora"]


# ------------------------------------------------------------------ the command line


def _cli(*args, home):
    env = dict(os.environ, QLORA_STUDIO_HOME=str(home))
    return subprocess.run([sys.executable, "-m", "qlora_studio.cli", *args], env=env, capture_output=True, text=True,
                          timeout=300)


def test_plan_and_dry_run_print_the_plan_and_train_nothing(tmp_path):
    out = _cli("plan", "--preset", "cpu-demo", "--json", home=tmp_path)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["settings"]["rank"] == 16 and doc["plan"]["device"] == "cpu" and doc["plan"]["precision"] in ("bf16", "fp32")
    text = _cli("train", "--preset", "cpu-demo", "--dry-run", "--rank", "8", "--gradient-checkpointing", home=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "LoRA: r=8, alpha=16" in text.stdout and "gradient checkpointing: on" in text.stdout
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    bad = _cli("plan", "--preset", "cpu-demo", "--rank", "0", home=tmp_path)
    assert bad.returncode == 2 and "rank: must be >= 1" in bad.stderr and "Traceback" not in bad.stderr


def test_recommend_uses_this_cards_calibration(studio_home):
    from qlora_studio.estimator import record_measurement
    from qlora_studio.hardware import GpuInfo
    from qlora_studio.recommend import recommend

    card = GpuInfo(0, "NVIDIA GeForce RTX 3060", 12 * GiB, 12 * GiB, 0, 0, "550", "12.4", (8, 6))
    plain = recommend(card)
    assert not any("calibrated" in n for n in plain.notes)
    for _ in range(2):
        record_measurement(10**9, int(1.25 * 10**9), card.name)
    calibrated = recommend(card)
    assert any("calibrated: scaled by 1.250" in n and "2 finished runs" in n for n in calibrated.notes)
    # 12 GiB: uncalibrated, Qwen3-8B (the largest open model) fits with headroom; 25% more per estimate and it
    # no longer does, Qwen2.5-7B does
    assert (plain.model, calibrated.model) == ("Qwen3-8B", "Qwen2.5-7B")
    assert calibrated.estimate.total_bytes * 1.25 <= calibrated.usable_bytes
