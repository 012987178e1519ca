"""What a run says it is doing (status.json's phase), how often it evaluates, and a stop that lands in
the middle of an evaluation. Tiny Llama runs with a real Trainer; the test's own callbacks only watch,
or press Stop at a chosen moment."""

from __future__ import annotations

import json
import threading

from qlora_studio.config import TrainConfig
from qlora_studio.runs import RunFolder
from qlora_studio.training import prepare_run, run_training


def _cfg(tiny_llama, toy_data, **over) -> TrainConfig:
    settings = dict(model=str(tiny_llama), data=str(toy_data), max_steps=12, batch_size=2, max_seq_len=64,
                    eval_fraction=0.5, eval_steps=1, save_steps=1000, learning_rate=1e-3)
    settings.update(over)
    return TrainConfig(**settings)


def _watcher(run: RunFolder, stop: threading.Event | None = None, stop_at_batch: int | None = None):
    from transformers import TrainerCallback

    class Watch(TrainerCallback):
        phases: list = []
        batches = 0

        def on_prediction_step(self, args, state, control, **kw):
            status = json.loads((run.path / "status.json").read_text())
            Watch.phases.append((status.get("phase"), status.get("eval_total")))
            Watch.batches += 1
            if stop is not None and Watch.batches == stop_at_batch:
                stop.set()

    return Watch


def test_a_stop_during_an_evaluation_abandons_it_and_saves_a_checkpoint(studio_home, tiny_llama, toy_data):
    run = prepare_run(_cfg(tiny_llama, toy_data, max_steps=10, eval_steps=5))
    stop = threading.Event()
    watch = _watcher(run, stop, stop_at_batch=3)  # the third batch of the first evaluation (at step 5)
    status = run_training(run, stop, extra_callbacks=[watch()])
    assert status["state"] == "stopped", status
    assert status["step"] == 5
    assert run.last_checkpoint().name == "checkpoint-5"
    assert (run.adapter / "adapter_model.safetensors").is_file()
    assert not [r for r in run.metrics() if r["type"] == "eval"], "the abandoned evaluation left no record"
    assert watch.batches == 3, "the evaluation ended with the next batch (the studio's callback comes first)"
    log = (run.path / "train.log").read_text()
    assert "stop requested during an evaluation: abandoned it; saving a checkpoint at step 5" in log
    # the run continues from there like any stopped run
    status = run_training(run, resume=True)
    assert status["state"] == "completed" and status["step"] == 10


def test_evaluation_is_shown_and_never_takes_more_time_than_training(studio_home, tiny_llama, toy_data):
    run = prepare_run(_cfg(tiny_llama, toy_data))  # 16 eval batches after every 1-batch step, if nothing paced it
    watch = _watcher(run)
    status = run_training(run, extra_callbacks=[watch()])
    assert status["state"] == "completed"
    assert {p for p, _ in watch.phases} <= {"evaluating", "final evaluation"} and ("evaluating", 16) in watch.phases
    evals = [r["step"] for r in run.metrics() if r["type"] == "eval"]
    assert evals[0] == 1 and evals[-1] == 12 and len(evals) < 12, evals
    [adjust] = [a for a in run.plan()["adjustments"] if a.get("setting") == "eval_steps"]
    assert "an evaluation takes" in adjust["why"]
    assert "evaluating only after as much time training" in (run.path / "train.log").read_text()
    final = run.status()
    assert final["phase"] == "completed" and final.get("eval_done") is None
    assert final["training_since"] >= final["clock_start"] and final["training_from_step"] == 0
