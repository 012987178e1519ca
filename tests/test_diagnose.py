"""Troubleshooting: faults injected into real tiny-model runs yield the right finding, and the
finding's first fix, applied as a new run, completes. Healthy runs raise no warnings.

Faults are real: an out-of-memory error raised from a TrainerCallback, a learning rate poisoned to
1e30 from a callback (the weights overflow, the loss turns NaN), gibberish rows in the data (a
batch the model cannot predict), a tiny data set with random answers trained long (memorisation),
a learning rate of 1e-7 (nothing moves). Plus unit tests of each detector on synthetic streams.
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from qlora_studio import diagnose as dg
from qlora_studio.diagnose import Diagnoser, Finding, data_findings, diagnose, diagnose_run, oom_findings, underused_findings
from qlora_studio.manager import RunManager
from qlora_studio.runs import RunFolder
from qlora_studio.config import TrainConfig
from qlora_studio.recovery import good_checkpoints
from qlora_studio.training import prepare_run, run_training

from conftest import write_sql_like_data


# ------------------------------------------------------------------ fixtures and helpers


@pytest.fixture(scope="session")
def tiny_learner(tiny_llama, tmp_path_factory) -> Path:
    """The tiny Llama with its final norm scaled x10.

    With random weights of std 0.02 and tied embeddings, the plain tiny model's logits stay within
    about +-1, so LoRA cannot move its loss far from log(vocab) ~ 10.8. Scaling the final norm lets
    the adapters shape the logits: the loss falls from ~13 to ~4.5 in 30 steps on the toy data, which
    is what spikes, memorisation and "healthy" need to be visible at all.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.norm.weight.mul_(10)
    out = tmp_path_factory.mktemp("tiny-learner")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(out)
    return out


def _unique_rows(path: Path) -> list[str]:
    seen, rows = set(), []
    for line in path.read_text().splitlines():
        if line not in seen:
            seen.add(line)
            rows.append(line)
    return rows


@pytest.fixture()
def clean_data(tmp_path) -> Path:
    """The toy SQL-like rows without their duplicates (52 rows): data with nothing to report."""
    toy = write_sql_like_data(tmp_path / "toy.jsonl")
    path = tmp_path / "clean.jsonl"
    path.write_text("\n".join(_unique_rows(toy)) + "\n")
    return path


def _gibberish(rnd: random.Random, words: int) -> str:
    return " ".join("".join(rnd.choice("bcdfghjklmnpqrstvwxz0123456789") for _ in range(rnd.randint(3, 7)))
                    for _ in range(words))


def _adversarial_data(clean: Path, path: Path) -> Path:
    """The clean rows plus 3 rows whose answers are random letter strings, shuffled in."""
    rnd = random.Random(1)
    rows = [json.loads(line) for line in clean.read_text().splitlines()]
    for i in range(3):
        rows.append({"messages": [{"role": "user", "content": f"Show regions with id {70 + i}"},
                                  {"role": "assistant", "content": _gibberish(rnd, 12)}]})
    rnd.shuffle(rows)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _random_answers_data(path: Path) -> Path:
    """10 rows whose answers are 8 random colour words: nothing to generalise, only to memorise."""
    rnd = random.Random(3)
    words = "red blue green black".split()
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Colors of item {i}"},
        {"role": "assistant", "content": " ".join(rnd.choice(words) for _ in range(8))}]}) + "\n" for i in range(10)))
    return path


def _train(callbacks=(), **settings) -> tuple[RunFolder, dict]:
    settings.setdefault("max_seq_len", 64)
    settings.setdefault("eval_fraction", 0.0)
    run = prepare_run(TrainConfig(**settings))
    status = run_training(run, extra_callbacks=list(callbacks))
    return run, status


def _alarms(findings: list[Finding]) -> list[Finding]:
    return [f for f in findings if f.severity in ("warning", "error")]


def _train_records(run: RunFolder) -> list[dict]:
    return [r for r in run.metrics() if r["type"] == "train"]


def _apply_first_fix(run: RunFolder, finding: Finding, index: int = 0) -> tuple[RunFolder, dict]:
    manager = RunManager()
    child = manager.apply_fix(run, finding.fixes[index], reason=finding.message)
    status = manager.wait(600)
    return child, status


def _make_fault_callbacks():
    import torch
    from transformers import TrainerCallback

    class OutOfMemoryAt(TrainerCallback):
        """Raises torch's out-of-memory error at the end of a chosen step, once."""

        def __init__(self, step: int):
            self.step, self.fired = step, False

        def on_step_end(self, args, state, control, **kw):
            if state.global_step == self.step and not self.fired:
                self.fired = True
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")

    class PoisonLearningRate(TrainerCallback):
        """From a chosen step on, the schedule's base learning rate is ``lr`` (the scheduler applies it
        to the next update)."""

        def __init__(self, step: int, lr: float):
            self.step, self.lr = step, lr

        def on_step_begin(self, args, state, control, lr_scheduler=None, **kw):
            if state.global_step + 1 == self.step:
                lr_scheduler.base_lrs = [self.lr] * len(lr_scheduler.base_lrs)

    return OutOfMemoryAt, PoisonLearningRate


# ------------------------------------------------------------------ detectors on synthetic streams


def _stream(losses, lr=2e-4, start=1, evals=()):
    """Train records with a cosine-like lr: warmup over the first step, then flat at ``lr``."""
    recs = [{"type": "train", "step": start + i, "loss": loss, "lr": lr if i else lr / 10, "grad_norm": 1.0}
            for i, loss in enumerate(losses)]
    recs += [{"type": "eval", "step": s, "eval_loss": e} for s, e in evals]
    return sorted(recs, key=lambda r: (r["step"], r["type"] == "eval"))


def _noisy_decay(n, seed=0, start=2.0, end=0.5, noise=0.08):
    rnd = random.Random(seed)
    return [end + (start - end) * math.exp(-i / 15) + rnd.gauss(0, noise) * (end + 0.3) for i in range(n)]


def test_nonfinite_loss_stops_and_names_the_last_good_checkpoint():
    d = Diagnoser({"learning_rate": 2e-4, "batch_size": 4, "total_steps": 50})
    assert d.add_all(_stream([2.0, 1.9, 1.8, 1.7])) == []
    [f] = d.add({"type": "train", "step": 5, "loss": float("nan"), "lr": 2e-4, "grad_norm": float("nan")})
    assert (f.kind, f.severity, f.step) == ("nonfinite", "error", 5) and d.stop_reason is f
    assert f.details["last_good_step"] == 3  # checkpoint 4's weights produced the NaN at step 5
    assert [x.changes for x in f.fixes] == [{"learning_rate": 1e-4}, {"batch_size": 2}, {}]
    assert f.fixes[0].from_step == 3
    assert json.loads(json.dumps(f.to_dict()))["details"]["loss"] == "nan"  # plain JSON, NaN spelled out
    assert d.add({"type": "train", "step": 6, "loss": float("inf"), "lr": 2e-4}) == []  # reported once


def test_zero_loss_is_an_error_and_fp16_overflow_steps_are_a_note_until_they_persist():
    d = Diagnoser({"learning_rate": 2e-4})
    [zero] = d.add({"type": "train", "step": 1, "loss": 0.0, "lr": 2e-4, "grad_norm": 0.0})
    assert (zero.kind, zero.severity) == ("nonfinite", "error") and d.stop_reason is None
    fp16 = Diagnoser({"learning_rate": 2e-4, "precision": "fp16"})
    notes = fp16.add_all([{"type": "train", "step": s, "loss": 2.0, "lr": 2e-4, "grad_norm": float("inf")} for s in (1, 2, 3)])
    assert [(f.severity, f.step) for f in notes] == [("info", 1)] and fp16.stop_reason is None
    fp16.add({"type": "train", "step": 4, "loss": 2.0, "lr": 2e-4, "grad_norm": 0.5})  # the scaler found its level
    persisting = fp16.add_all([{"type": "train", "step": s, "loss": 2.0, "lr": 2e-4, "grad_norm": float("nan")}
                               for s in range(5, 5 + dg.FP16_SKIPPED_STEPS_LIMIT)])
    assert [(f.severity, f.step) for f in persisting if f.kind == "nonfinite"] == [("error", 4 + dg.FP16_SKIPPED_STEPS_LIMIT)]
    bf16 = Diagnoser({"learning_rate": 2e-4, "precision": "bf16"})
    [f] = bf16.add({"type": "train", "step": 1, "loss": 2.0, "lr": 2e-4, "grad_norm": float("inf")})
    assert f.severity == "error" and bf16.stop_reason is f


def test_spike_is_a_robust_jump_and_batch_noise_is_not():
    for seed in range(20):  # healthy, noisy, falling curves: never a spike
        assert diagnose(_stream(_noisy_decay(120, seed)), config={"learning_rate": 2e-4, "total_steps": 120}) == [], seed
    losses = _noisy_decay(60)
    losses[40] = losses[39] * 3
    [f] = diagnose(_stream(losses), config={"learning_rate": 2e-4, "batch_size": 8, "total_steps": 60})
    assert (f.kind, f.severity, f.step) == ("spike", "warning", 41) and f.details["z"] > dg.SPIKE_Z
    assert f.fixes[0].changes == {"learning_rate": 1e-4} and f.fixes[0].from_step == 40
    assert f.fixes[1].changes == {"batch_size": 4} and f.fixes[2].title == "Check the data"
    early = _noisy_decay(60)
    early[3] = 9.0  # within the first steps: too little history to call it
    assert [f.kind for f in diagnose(_stream(early), config={"total_steps": 60})] == []


def test_plateau_only_in_the_main_stage_and_only_when_nothing_was_learned():
    flat = [2.0 + 0.01 * math.sin(i) for i in range(40)]
    [f] = diagnose(_stream(flat, lr=1e-7), config={"learning_rate": 1e-7, "total_steps": 40, "max_steps": 40})
    assert (f.kind, f.severity, f.step) == ("plateau", "warning", 11)
    assert abs(f.details["slope_per_step"]) < 1e-3 and f.details["total_drop"] < dg.PLATEAU_TOTAL_DROP
    assert f.fixes[0].changes == {"learning_rate": 1e-4}  # 1e-7 doubled would still be nothing
    assert f.fixes[1].changes == {"max_steps": 80} and f.fixes[2].changes == {}
    assert diagnose(_stream(flat, lr=2e-4), config={"learning_rate": 2e-4, "epochs": 1, "total_steps": 40})[0].fixes[0].changes == {"learning_rate": 4e-4}
    # learned, then levelled off: converged, not stalled
    assert diagnose(_stream([2.0, 1.2, 0.8] + [0.5] * 37), config={"learning_rate": 2e-4, "total_steps": 40}) == []
    # flat during a long warmup, or with the learning rate already in its tail: slow on purpose
    warmup = [dict(r, lr=2e-4 * min(1.0, r["step"] / 30)) for r in _stream(flat)]  # at 90% of peak from step 27
    assert diagnose(warmup[:35], config={"learning_rate": 2e-4, "total_steps": 40}) == []
    assert [f.step for f in diagnose(warmup, config={"learning_rate": 2e-4, "total_steps": 40})] == [36]
    tail = [dict(r, lr=2e-5) if r["step"] > 10 else r for r in _stream(flat)]
    assert diagnose(tail, config={"learning_rate": 2e-4, "total_steps": 40}) == []


def test_overfitting_needs_eval_rising_twice_while_train_falls():
    losses = [2.0 - 0.03 * i for i in range(40)]
    rising = [(8, 1.5), (16, 1.2), (24, 1.3), (32, 1.45)]
    [f] = diagnose(_stream(losses, evals=rising), config={"learning_rate": 2e-4, "epochs": 3, "total_steps": 40})
    assert (f.kind, f.severity, f.step) == ("overfitting", "warning", 32) and f.details["best_step"] == 16
    assert (f.fixes[0].changes, f.fixes[0].from_step) == ({"max_steps": 16}, 16)
    assert (f.fixes[1].changes, f.fixes[1].from_step) == ({"epochs": 1.2}, 0)
    assert f.fixes[2].changes == {}
    one_rise = [(8, 1.5), (16, 1.2), (24, 1.3), (32, 1.25)]
    assert diagnose(_stream(losses, evals=one_rise), config={"total_steps": 40}) == []
    train_flat = [1.0] * 40  # eval up, train not down: not memorisation
    assert "overfitting" not in [f.kind for f in diagnose(_stream(train_flat, evals=rising), config={"total_steps": 40})]


def test_oom_underused_and_data_findings_from_the_run_files(tmp_path):
    status = {"state": "failed", "error_kind": "oom", "step": 11, "error_step": 12,
              "recoveries": [{"step": 7, "batch_size": [8, 4], "grad_accum": [1, 2], "resumed_from": "checkpoint-6"}]}
    note, err = oom_findings(status, {"batch_size": 4, "grad_accum": 2, "quant": "none", "max_seq_len": 1024})
    assert (note.severity, note.step, err.severity, err.step) == ("info", 7, "error", 12)
    assert [f.changes for f in err.fixes] == [{"batch_size": 2, "grad_accum": 4}, {"quant": "nf4", "double_quant": True},
                                              {"max_seq_len": 512}, {}, {}]
    summary = {"device": "cuda", "peak_memory": {"memory_reserved_mb": 6000}, "gpu_total_mb": 81559, "global_step": 40,
               "memory_estimate": {"estimated_bytes": 7 * 2**30}}
    [f] = underused_findings(summary, {"batch_size": 4, "grad_accum": 1, "max_seq_len": 512}, data_report={"truncated": 3})
    assert (f.kind, f.severity) == ("underused", "info") and f.details["share"] < 0.1
    assert [x.changes for x in f.fixes] == [{"batch_size": 8}, {"max_seq_len": 1024}]
    assert underused_findings(dict(summary, peak_memory={"memory_reserved_mb": 60000}), {}) == []
    assert underused_findings(dict(summary, device="cpu"), {}) == []

    from qlora_studio.data import check_file

    rows = [("q1", "a1"), ("q1", "a1"), ("q1", "other"), ("q2", " "), ("q3", "a3")] + [(f"p{i}", f"x{i}") for i in range(15)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
                            for q, a in rows))
    report = check_file(path).to_dict()
    assert report["quality"]["duplicates"] == 1 and report["quality"]["conflicting_prompts"] == 1
    assert report["quality"]["conflicting_rows"] == 3 and report["quality"]["empty_answers"] == 1
    assert report["quality"]["examples"] == {"duplicates": [2], "conflicting": [[1, 2, 3]], "empty_answers": [4]}
    found = data_findings(report)
    assert [(f.details.get("duplicates"), f.details.get("conflicting_rows"), f.details.get("empty_answers"), f.severity)
            for f in found] == [(1, None, None, "info"), (None, 3, None, "warning"), (None, None, 1, "warning")]
    assert data_findings(dict(report, truncated=5), {"max_seq_len": 256})[-1].fixes[0].changes == {"max_seq_len": 512}


def test_diagnose_cli_contract(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    losses = [2.0 + 0.01 * math.sin(i) for i in range(30)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _stream(losses, lr=1e-7)))
    (folder / "config.json").write_text(json.dumps({"learning_rate": 1e-7, "total_steps": 30, "epochs": 1}))
    for target in (folder, folder / "metrics.jsonl"):
        out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "diagnose", str(target), "--json"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        [f] = json.loads(out.stdout)["findings"]
        assert set(f) >= {"kind", "severity", "step", "message", "fixes"} and f["kind"] in dg.KINDS
        assert (f["kind"], f["severity"]) == ("plateau", "warning")
        assert f["fixes"][0]["title"] and f["fixes"][0]["changes"] == {"learning_rate": 1e-4}
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "diagnose", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no such run" in out.stderr


# ------------------------------------------------------------------ faults in real runs


def test_healthy_tiny_runs_raise_no_alarm(studio_home, tiny_learner, clean_data):
    run, status = _train(model=str(tiny_learner), data=str(clean_data), max_steps=30, batch_size=4,
                         learning_rate=3e-3, max_seq_len=128, eval_fraction=0.1, eval_steps=6, quant="none")
    assert status["state"] == "completed", status.get("error")
    losses = [r["loss"] for r in _train_records(run)]
    assert losses[-1] < 0.5 * losses[0]
    findings = diagnose_run(run.path)
    assert _alarms(findings) == [], [f.message for f in findings]
    assert "finding" not in (run.path / "train.log").read_text()


def test_out_of_memory_fails_cleanly_keeps_the_checkpoint_and_the_fix_completes(studio_home, tiny_llama, clean_data):
    OutOfMemoryAt, _ = _make_fault_callbacks()
    run, status = _train([OutOfMemoryAt(8)], model=str(tiny_llama), data=str(clean_data), max_steps=12, batch_size=4,
                         learning_rate=3e-3, save_steps=3, oom_retries=0)
    assert (status["state"], status["error_kind"], status["error_step"]) == ("failed", "oom", 8)
    assert run.last_checkpoint().name == "checkpoint-6" and status["last_checkpoint"] == "checkpoint-6"
    [f] = _alarms(diagnose_run(run.path))
    assert (f.kind, f.severity, f.step) == ("oom", "error", 8)
    # on the CPU the run kept its 4-bit weights decoded and trained without checkpointing: those go first
    assert [x.title for x in f.fixes][:3] == ["Decode the 4-bit weights at each use", "Turn on gradient checkpointing",
                                              "Micro-batch 2 with gradient accumulation 2"]
    assert [x.changes for x in f.fixes] == [{"decoded_weights": False}, {"gradient_checkpointing": True},
                                            {"batch_size": 2, "grad_accum": 2}, {}, {}]  # NF4 on, 64 tokens: nothing to cut
    child, child_status = _apply_first_fix(run, f, index=2)
    assert child_status["state"] == "completed", child_status.get("error")
    config = child.config()
    assert (config["batch_size"], config["grad_accum"], config["init_step"], config["max_steps"]) == (2, 2, 6, 6)
    assert config["parent_run"] == str(run.path) and config["changes"] == {"batch_size": 2, "grad_accum": 2}
    assert config["reason"] == f.message and config["init_checkpoint"].endswith("checkpoint-6")
    assert "starting from the adapter weights" in (child.path / "train.log").read_text()
    assert _alarms(diagnose_run(child.path)) == []


def test_out_of_memory_recovers_by_itself(studio_home, tiny_llama, clean_data):
    OutOfMemoryAt, _ = _make_fault_callbacks()
    run, status = _train([OutOfMemoryAt(8)], model=str(tiny_llama), data=str(clean_data), max_steps=12, batch_size=4,
                         learning_rate=3e-3, save_steps=3, decoded_weights=False)  # a kept copy would go first
    assert status["state"] == "completed", status.get("error")
    [rec] = status["recoveries"]
    assert (rec["step"], rec["batch_size"], rec["grad_accum"], rec["resumed_from"]) == (8, [4, 2], [1, 2], "checkpoint-6")
    assert (run.config()["batch_size"], run.config()["grad_accum"]) == (4, 1), "the user's settings stay as given"
    plan = run.plan()
    assert (plan["plan"]["batch_size"], plan["plan"]["grad_accum"]) == (2, 2) and plan["recoveries"] == [rec]
    assert [r["step"] for r in _train_records(run)] == list(range(1, 13))  # steps 7-8 redone once, no gaps
    assert "recovering automatically (1 of 3): micro-batch 4 -> 2" in (run.path / "train.log").read_text()
    findings = diagnose_run(run.path)
    assert [(f.kind, f.severity, f.step) for f in findings] == [("oom", "info", 8)]


def test_nan_stops_the_run_rolls_back_and_the_fix_completes(studio_home, tiny_llama, clean_data):
    _, PoisonLearningRate = _make_fault_callbacks()
    run, status = _train([PoisonLearningRate(6, 1e30)], model=str(tiny_llama), data=str(clean_data), max_steps=12,
                         batch_size=4, learning_rate=3e-3, save_steps=3)
    assert (status["state"], status["error_kind"]) == ("failed", "nonfinite"), status
    train = _train_records(run)
    bad = next(r["step"] for r in train if not math.isfinite(r["loss"]))
    assert train[-1]["step"] == bad == 8, "stopped at the first non-finite step"
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["checkpoint-3", "checkpoint-6"], "nothing saved after"
    assert [p.name for p in good_checkpoints(run)] == ["checkpoint-3", "checkpoint-6"]
    assert (run.adapter / "adapter_model.safetensors").read_bytes() == (
        run.checkpoints_dir / "checkpoint-6" / "adapter_model.safetensors").read_bytes(), "rolled back to the last good"
    [f] = _alarms(diagnose_run(run.path))
    assert (f.kind, f.severity, f.step) == ("nonfinite", "error", 8)
    assert f.fixes[0].changes == {"learning_rate": 1.5e-3} and f.fixes[0].from_step == 6
    child, child_status = _apply_first_fix(run, f)
    assert child_status["state"] == "completed", child_status.get("error")
    assert (child.config()["init_step"], child.config()["max_steps"]) == (6, 6)
    child_losses = [r["loss"] for r in _train_records(child)]
    assert all(math.isfinite(x) for x in child_losses)
    assert child_losses[0] < train[0]["loss"] - 0.1, "the fix starts from the trained checkpoint, not from scratch"
    assert _alarms(diagnose_run(child.path)) == []


def test_spike_from_an_adversarial_batch(studio_home, tiny_learner, clean_data, tmp_path):
    data = _adversarial_data(clean_data, tmp_path / "adversarial.jsonl")
    run, status = _train(model=str(tiny_learner), data=str(data), max_steps=30, batch_size=4, learning_rate=3e-3,
                         max_seq_len=128, quant="none")
    assert status["state"] == "completed", status.get("error")
    spikes = [f for f in diagnose_run(run.path) if f.kind == "spike"]
    assert spikes and all(f.severity == "warning" and f.details["z"] >= dg.SPIKE_Z for f in spikes)
    assert _alarms(diagnose_run(run.path)) == spikes
    assert f"finding (warning) spike at step {spikes[0].step}" in (run.path / "train.log").read_text()  # seen live
    child, child_status = _apply_first_fix(run, spikes[0])
    assert child_status["state"] == "completed", child_status.get("error")
    assert child.config()["learning_rate"] == 1.5e-3


def test_overfitting_from_a_tiny_data_set_and_stopping_at_the_best_checkpoint(studio_home, tiny_learner, tmp_path):
    data = _random_answers_data(tmp_path / "tiny.jsonl")
    run, status = _train(model=str(tiny_learner), data=str(data), max_steps=20, batch_size=8, learning_rate=5e-3,
                         eval_fraction=0.2, eval_steps=4, quant="none")
    assert status["state"] == "completed", status.get("error")
    [f] = [f for f in diagnose_run(run.path) if f.kind == "overfitting"]
    best = f.details["best_step"]
    assert f.severity == "warning" and f.fixes[0].changes == {"max_steps": best}
    assert (run.checkpoints_dir / f"checkpoint-{best}").is_dir(), "the best checkpoint survives rotation"
    child, child_status = _apply_first_fix(run, f)
    assert child_status["state"] == "completed", child_status.get("error")
    assert child.config()["max_steps"] == 0 and _train_records(child) == []
    assert child.summary()["eval"]["eval_loss"] == pytest.approx(f.details["best_eval_loss"], rel=1e-3)


def test_plateau_from_a_near_zero_learning_rate_and_the_fix_verb(studio_home, tiny_learner, clean_data):
    run, status = _train(model=str(tiny_learner), data=str(clean_data), max_steps=20, batch_size=4, learning_rate=1e-7,
                         quant="none", name="flat")
    assert status["state"] == "completed", status.get("error")
    [f] = _alarms(diagnose_run(run.path))
    assert (f.kind, f.severity) == ("plateau", "warning") and abs(f.details["total_drop"]) < 0.01
    assert f.fixes[0].changes == {"learning_rate": 1e-4}
    env = dict(os.environ, QLORA_STUDIO_HOME=str(studio_home))
    out = subprocess.run([sys.executable, "-m", "qlora_studio.cli", "fix", "flat"], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr + out.stdout
    child = RunFolder(Path(out.stdout.strip().splitlines()[-1]))
    assert child.name == "flat-fix1" and child.status()["state"] == "completed"
    assert child.config()["learning_rate"] == 1e-4 and child.config()["parent_run"] == str(run.path)
    child_losses = [r["loss"] for r in _train_records(child)]
    assert sum(child_losses[-5:]) < sum(child_losses[:5]), "at 1e-4 it learns"


def test_healthy_embedded_run_raises_no_alarm(studio_home, tmp_path):
    """SmolLM2-135M (4-bit NF4) on 60 rows of the SQL sample task: a real, healthy fine-tune."""
    from qlora_studio.home import resource_dir

    rows = (resource_dir() / "assets" / "sql" / "train.jsonl").read_text().splitlines()[:60]
    data = tmp_path / "sql60.jsonl"
    data.write_text("\n".join(rows) + "\n")
    run, status = _train(model="embedded", data=str(data), max_steps=10, batch_size=2, learning_rate=1e-3,
                         max_seq_len=256, eval_fraction=0.05, eval_steps=5, lora_dropout=0.0, task="sql")
    assert status["state"] == "completed", status.get("error")
    losses = [r["loss"] for r in _train_records(run)]
    assert losses[-1] < 0.6 * losses[0]
    findings = diagnose_run(run.path)
    assert _alarms(findings) == [], [f.message for f in findings]
