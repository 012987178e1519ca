"""The studio's `TrainerCallback`: what a run writes while it trains, and what it shows it is doing.

- metrics.jsonl: one record per logged step (``{"type": "train", ...}``) or evaluation (``"eval"``);
- status.json's ``phase``: "training", "evaluating" (with ``eval_done`` / ``eval_total`` batches),
  "saving checkpoint", or "stopping: ..." as soon as a stop is asked for; ``training_since`` /
  ``training_from_step`` let a page compute an ETA from the first step;
- the evaluation cadence: an evaluation is skipped while less time has been spent training since the
  last one than that one took, so a run never spends more time evaluating than training (the first
  skip is logged and recorded in plan.json's ``adjustments``);
- a stop request: at the end of the step (a checkpoint and the adapter are saved; a scheduled
  evaluation is skipped), or in the middle of an evaluation, which is abandoned (`StopDuringEvaluation`;
  `trainer.train` saves the checkpoint);
- free disk space before each checkpoint (`diskspace.check_before_save`);
- each record fed to a `Diagnoser`: findings go to train.log, and a NaN/inf stops the run at once
  without evaluating or saving the poisoned state;
- in a run of several processes (`world.World`), the same decisions on every process at every step: a
  stop asked of any of them (its flag, the launcher's stop file, a signal) stops all at the end of the
  same step, rank 0 decides evaluations and saves (its pace, its disk check) and the others follow, and
  all of them end at once, without saving, when the studio process that launched them is gone. Only rank
  0 writes (`RunFolder.writer`); a stop during an evaluation waits for its end there.
"""

from __future__ import annotations

import threading
import time

from .diskspace import check_before_save
from .runs import RunFolder

STATUS_EVERY_S = 2.0  # evaluation progress is written to status.json at most this often


class StopDuringEvaluation(Exception):
    """Raised from inside an evaluation when the user asks the run to stop."""


class LauncherGone(Exception):
    """The studio process that launched a run's processes (and owns the run) has ended: they end too."""


def peak_memory_mb(device: str) -> dict:
    if device == "cuda":
        import torch

        return {"memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20,
                "memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20}
    try:  # the process's peak resident memory (Linux)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return {"memory_rss_mb": int(line.split()[1]) / 1024}
    except OSError:
        pass
    return {}


def log_finding(log, finding) -> None:
    log(f"finding ({finding.severity}) {finding.kind} at step {finding.step}: {finding.message}")
    for i, fix in enumerate(finding.fixes, 1):
        log(f"  fix {i}: {fix.title}" + (f" {fix.changes}" if fix.changes else ""))


def callback_class():
    from transformers import TrainerCallback

    class StudioCallback(TrainerCallback):
        """See the module docstring. ``self.nonfinite`` holds the NaN/inf finding that stopped a run,
        ``self.disk_full`` why a save was refused, ``self.stopped`` whether the user stopped it."""

        def __init__(self, run: RunFolder, stop_event: threading.Event, device: str, log=print, diagnoser=None,
                     eval_batches: int | None = None, world=None):
            from .world import World

            self.world = world or World()
            self.last_eval_step = None  # the step of this attempt's last evaluation
            self.run = run
            self.stop_event = stop_event
            self.device = device
            self.log = log
            self.diagnoser = diagnoser
            self.eval_batches = eval_batches
            self.last_time = None
            self.last_tokens = 0
            self.stopped = False
            self.nonfinite = None
            self.disk_full = None
            self.start_time = None
            self.trained_since_eval = 0.0  # seconds spent in training steps since the last evaluation
            self.last_eval_s = None  # how long the last evaluation took
            self.eval_started = None
            self.eval_done = 0
            self.status_at = 0.0
            self.evals_skipped = 0
            self.step_started = None

        # -- status
        def _phase(self, phase: str, **fields) -> None:
            if self.stop_event.is_set():
                phase = f"stopping: {phase}" if phase != "training" else "stopping"
            self.run.set_status("running", phase=phase, **fields)

        # -- training
        def on_train_begin(self, args, state, control, **kw):
            self.last_time = self.start_time = time.time()
            self.last_tokens = state.num_input_tokens_seen
            self.run.set_status("running", phase="training", max_steps=state.max_steps, step=state.global_step,
                                training_since=self.start_time, training_from_step=state.global_step,
                                started_at=self.run.status().get("started_at") or time.time())

        def on_step_begin(self, args, state, control, **kw):
            self.step_started = time.time()

        def on_log(self, args, state, control, logs=None, **kw):
            logs = dict(logs or {})
            now = time.time()
            rec = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), "time": now}
            if "eval_loss" in logs:
                self.last_eval_step = state.global_step
                rec["type"] = "eval"
                rec.update({k: v for k, v in logs.items() if k.startswith("eval_")})
            elif "loss" in logs:
                rec["type"] = "train"
                rec["loss"] = logs["loss"]
                rec["lr"] = logs.get("learning_rate")
                rec["grad_norm"] = logs.get("grad_norm")
                tokens = state.num_input_tokens_seen
                dt = now - (self.last_time or now)
                rec["tokens"] = tokens
                rec["tokens_per_s"] = (tokens - self.last_tokens) / dt if dt > 0 else None
                rec.update(peak_memory_mb(self.device))
                self.last_time, self.last_tokens = now, tokens
            else:
                return
            self.run.append_metrics(rec)
            if rec["type"] == "train":
                grad = rec["grad_norm"]
                self.log(f"step {rec['step']}/{state.max_steps} loss {rec['loss']:.4f} lr {rec['lr']:.3g} "
                         f"grad_norm {'-' if grad is None else f'{grad:.3g}'} tok/s {rec['tokens_per_s'] or 0:.0f}")
            else:
                self.log(f"eval at step {rec['step']}: eval_loss {rec['eval_loss']:.4f}")
            self._diagnose(rec, state, control)

        def _diagnose(self, rec, state, control):
            if self.diagnoser is None:
                return
            for finding in self.diagnoser.add(rec):
                log_finding(self.log, finding)
            if self.diagnoser.stop_reason is not None and self.nonfinite is None:
                self.nonfinite = self.diagnoser.stop_reason
                control.should_training_stop = True
                control.should_save = False  # the weights after this step are not worth keeping
                control.should_evaluate = False
                self.log(f"stopping at step {state.global_step}: non-finite values; nothing more is saved")

        def _agreed_stop(self) -> bool:
            """Whether any process was asked to stop (one collective per step when there are several)."""
            if not self.world.multi:
                return self.stop_event.is_set()
            stop, gone = self.world.all_max([int(self.stop_event.is_set()), int(self._launcher_gone())])
            if gone:
                raise LauncherGone("the studio process that launched this run ended: stopping without saving "
                                   "(the run resumes from its last checkpoint)")
            return bool(stop)

        def _launcher_gone(self) -> bool:
            if not (self.world.main and self.world.launcher_pid):
                return False
            from .ownership import run_owner

            owner = run_owner(self.run.path)
            return owner is None or owner.get("pid") != self.world.launcher_pid

        def on_step_end(self, args, state, control, **kw):
            if self.step_started is not None:
                self.trained_since_eval += time.time() - self.step_started
            if self._agreed_stop() and not self.stopped:
                self.stopped = True
                control.should_training_stop = True
                control.should_save = True
                control.should_evaluate = False  # stopping stays quick: the last evaluation stands
                self.log(f"stop requested: saving a checkpoint at step {state.global_step}")
            if control.should_evaluate and not control.should_training_stop:
                self._pace_evaluation(state, control)
            problem = None
            if control.should_save and self.world.main:  # before the Trainer writes it: is there room?
                problem = check_before_save(self.run.path, self.run.plan().get("plan") or {},
                                            self.run.last_checkpoint())
            if self.world.multi:  # rank 0's pace and disk decide for every process
                flags = self.world.from_main([int(control.should_training_stop), int(control.should_save),
                                              int(control.should_evaluate), int(problem is not None)])
                control.should_training_stop, control.should_save, control.should_evaluate = map(bool, flags[:3])
                if flags[3] and problem is None:
                    problem = "no room on rank 0's disk for the next checkpoint"
            if problem:
                self.disk_full = f"{problem}; stopped at step {state.global_step} without saving it"
                control.should_save = control.should_evaluate = False
                control.should_training_stop = True
                self.log(self.disk_full)
            if control.should_evaluate:
                self.eval_started, self.eval_done = time.time(), 0
                self._phase("evaluating", step=state.global_step, eval_done=0, eval_total=self.eval_batches)
            elif control.should_save:
                self._phase("saving checkpoint", step=state.global_step)
            return control

        def _pace_evaluation(self, state, control):
            """Skip an evaluation due while training since the last one took less time than it did."""
            if self.last_eval_s is None or self.trained_since_eval >= self.last_eval_s:
                return
            control.should_evaluate = False
            self.evals_skipped += 1
            if self.evals_skipped == 1:
                msg = (f"an evaluation takes {self.last_eval_s:.1f} s, more than the training between two of "
                       f"them: evaluating only after as much time training (first skipped at step {state.global_step})")
                self.log(msg)
                doc = self.run.plan()
                self.run.update_plan(adjustments=list(doc.get("adjustments") or []) + [
                    {"setting": "eval_steps", "step": state.global_step, "why": msg}])

        # -- evaluation
        def on_prediction_step(self, args, state, control, **kw):
            if (self.stop_event.is_set() and self.eval_started is not None and state.global_step > 0
                    and not self.world.multi):  # several processes evaluate together: they stop after it
                raise StopDuringEvaluation()
            self.eval_done += 1
            now = time.time()
            if now - self.status_at >= STATUS_EVERY_S and self.eval_started is not None:
                self.status_at = now
                self._phase("evaluating", eval_done=self.eval_done, eval_total=self.eval_batches)

        def on_evaluate(self, args, state, control, **kw):
            if self.eval_started is not None:
                self.last_eval_s = time.time() - self.eval_started
            self.eval_started = None
            self.trained_since_eval = 0.0
            self._phase("saving checkpoint" if control.should_save else "training", eval_done=None, eval_total=None)

        def on_save(self, args, state, control, **kw):
            self._phase("training")

    return StudioCallback
