"""Golden prompts: a few held-out prompts answered while a run trains, so its answers can be watched as
they improve, and the best checkpoint chosen by the task metric rather than by loss alone.

* Which prompts: ``golden_prompts`` (default 3) of the rows training holds out (never a training row),
  chosen by `choose_golden` (different reference answers first, so a classification set shows several
  labels) and written to ``<run>/golden.json`` when the run starts. The file is read again at each
  evaluation: editing it (its ``prompts``: ``messages`` and ``reference``) changes the prompts from the
  next evaluation on; a resumed run keeps it.
* When: at every evaluation (each ``eval_steps``, and the final one at the end of the run), greedy replies of
  at most ``golden_max_new_tokens`` tokens (less when the references are short: `taskeval.reply_budget`),
  one batch, appended to ``<run>/samples.jsonl``: one line per prompt, ``{"step", "line", "prompt",
  "reply", "reference", "score", "metric", "seconds"}`` (``seconds``: the time that step's batch took).
* What it costs: at most ``golden_time_share`` (default 0.25) of the training time so far. Before each
  batch `sample_allowance` compares the time samples have taken, plus the next batch at the measured cost
  per prompt (the first evaluation answers one prompt alone to measure it), with that share of the
  training time: past it the batch is reduced to fewer prompts, then skipped, and train.log says why. summary.json's ``golden`` states the prompts, the reply length, the
  seconds spent, their share of the training time, and the evaluations skipped.
* The best checkpoint: with a task metric (`metrics.choose_metric` on the held-out answers), the score of
  the golden prompts at each evaluation picks the best step (ties: the lower eval loss). Checkpoint
  rotation then keeps the newest checkpoint, the one with the lowest eval loss and the best by the task
  metric (`prune_checkpoints`); summary.json's ``best`` names the step, the figure and why.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext
from pathlib import Path

from .errors import StudioError
from .metrics import MetricChoice, MetricError, choose_metric, score
from .runs import RunFolder, atomic_write_json, checkpoint_step, read_metrics_from
from .taskeval import EvalExample, eval_db, reply_budget, to_eval_example

GOLDEN_FILE = "golden.json"
SAMPLES_FILE = "samples.jsonl"


class GoldenError(StudioError):
    """golden.json cannot be read as golden prompts."""


def choose_golden(examples: list[EvalExample], n: int) -> list[EvalExample]:
    """``n`` of the held-out examples, in their order, examples with a reference not seen yet first."""
    seen, first, rest = set(), [], []
    for e in examples:
        key = e.reference.strip().casefold()
        (rest if key in seen else first).append(e)
        seen.add(key)
    return (first + rest)[:n]


def write_golden(run: RunFolder, prompts: list[EvalExample]) -> None:
    atomic_write_json(run.path / GOLDEN_FILE, {
        "note": "held-out prompts answered at each evaluation; edit messages or reference to change them",
        "prompts": [p.to_dict() for p in prompts]})


def read_golden(path: Path) -> list[EvalExample]:
    """The prompts of a golden.json; `GoldenError` naming the file and the field when one is malformed."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GoldenError(f"{path}: not readable as JSON ({e})", field="prompts") from None
    prompts = doc.get("prompts") if isinstance(doc, dict) else None
    if not isinstance(prompts, list):
        raise GoldenError(f"{path}: prompts: expected a list", field="prompts")
    out = []
    for i, p in enumerate(prompts):
        where = f"{path}: prompts[{i}]"
        msgs = p.get("messages") if isinstance(p, dict) else None
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                and isinstance(m.get("content"), str) for m in msgs):
            raise GoldenError(f"{where}.messages: expected a list of {{role, content}} messages", field="messages",
                              hint="roles are system, user and assistant; the last one is usually the user's")
        if not isinstance(p.get("reference", ""), str):
            raise GoldenError(f"{where}.reference: expected text", field="reference")
        out.append(EvalExample(int(p.get("line") or 0), msgs, p.get("reference", "")))
    return out


def sample_allowance(n: int, spent_s: float, train_s: float, per_prompt_s: float | None,
                     share: float) -> tuple[int, str | None]:
    """(prompts to answer now, why fewer than ``n``): the samples so far (``spent_s``) plus this batch at
    ``per_prompt_s`` each (unknown before the first batch) stay within ``share`` of ``train_s``."""
    if share <= 0:
        return 0, "golden_time_share is 0"
    if per_prompt_s is None:
        return n, None
    budget = share * train_s - spent_s
    k = min(n, int(budget // per_prompt_s)) if per_prompt_s > 0 else n
    if k >= n:
        return n, None
    told = (f"golden prompts have taken {spent_s:.1f} s of {train_s:.1f} s of training and may take "
            f"{share:.0%}; {per_prompt_s:.1f} s per prompt")
    return (k, f"reduced to {k} of {n} prompts: {told}") if k >= 1 else (0, f"skipped: {told}")


def truncate_samples_after(run: RunFolder, step: int) -> None:
    """On resume, drop sample lines written after the checkpoint the run goes back to."""
    path = run.path / SAMPLES_FILE
    if not path.exists():
        return
    kept = [r for r in read_metrics_from(path)[0] if r.get("step", 0) <= step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(path)


def prune_checkpoints(run: RunFolder, keep_steps: set[int]) -> list[str]:
    """Delete complete checkpoints other than the newest and those of ``keep_steps``; their names."""
    ckpts = run.checkpoints()
    if not ckpts:
        return []
    keep = set(keep_steps) | {ckpts[-1][0]}
    gone = []
    for step, path in ckpts:
        if step not in keep:
            shutil.rmtree(path, ignore_errors=True)
            gone.append(path.name)
    return gone


def best_step(scores: dict[int, dict]) -> int | None:
    """The step with the highest task score (ties: the lower eval loss, then the earlier step)."""
    scored = [(s, v) for s, v in scores.items() if v.get("value") is not None]
    if not scored:
        return None
    return max(scored, key=lambda sv: (sv[1]["value"], -(sv[1].get("eval_loss") or math.inf), -sv[0]))[0]


def best_summary(run: RunFolder, golden=None) -> dict | None:
    """summary.json's ``best``: the best step by the task metric when there is one, else by eval loss."""
    evals = [r for r in run.metrics() if r.get("type") == "eval" and isinstance(r.get("eval_loss"), (int, float))]
    by_loss = min(evals, key=lambda r: (r["eval_loss"], r["step"])) if evals else None
    step = best_step(golden.scores) if golden is not None and golden.choice is not None else None
    if step is not None:
        s = golden.scores[step]
        out = {"step": step, "by": golden.choice.primary, "value": s["value"], "prompts": s["n"],
               "eval_loss": s.get("eval_loss"),
               "why": f"the highest {golden.choice.primary} on the golden prompts ({s['value']:.2f} of "
                      f"{s['n']} prompts at step {step}; ties go to the lower eval loss)"
                      + (f"; the lowest eval loss was at step {by_loss['step']}" if by_loss and by_loss["step"] != step
                         else "")}
    elif by_loss is not None:
        step = by_loss["step"]
        out = {"step": step, "by": "eval_loss", "value": by_loss["eval_loss"], "eval_loss": by_loss["eval_loss"],
               "why": "the lowest eval loss (no task metric was scored while training)"}
    else:
        return None
    ckpt = run.checkpoints_dir / f"checkpoint-{step}"
    out["checkpoint"] = ckpt.name if ckpt.is_dir() else None
    return out


# ------------------------------------------------------------------ the callback


def golden_callback(run: RunFolder, cfg, tokenizer, data, plan, log):
    """The `GoldenCallback` of a run, or None (with the reason logged) when it has none to answer."""
    if cfg.golden_prompts <= 0:
        return None
    if not data.heldout:
        log("golden prompts: none (no held-out rows: eval_fraction is 0 or the data is too small)")
        return None
    held = [e for e in map(to_eval_example, data.heldout) if e is not None]
    if not held:
        log("golden prompts: none (plain text rows have no prompt and answer)")
        return None
    path = run.path / GOLDEN_FILE
    if not path.exists():
        write_golden(run, choose_golden(held, cfg.golden_prompts))
    choice = db = None
    try:
        db = eval_db(cfg.to_dict())
        choice = choose_metric(cfg.eval_metric, [e.reference for e in held], task=cfg.task, db=db)
    except MetricError as e:
        log(f"golden prompts are answered but not scored: {e.user_text()}")
    max_new = min(cfg.golden_max_new_tokens, reply_budget(tokenizer, [e.reference for e in held],
                                                          cfg.golden_max_new_tokens))
    log(f"golden prompts: {cfg.golden_prompts} held-out prompts ({path.name}) answered at each evaluation, "
        f"at most {max_new} new tokens each, within {cfg.golden_time_share:.0%} of the training time"
        + (f"; scored by {choice.primary} ({choice.reason})" if choice else ""))
    return golden_callback_class()(run, tokenizer, choice, db, max_new, cfg.golden_prompts, cfg.golden_time_share,
                                   plan, log)


_CLASS = None


def golden_callback_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    from transformers import TrainerCallback

    class GoldenCallback(TrainerCallback):
        def __init__(self, run: RunFolder, tokenizer, choice: MetricChoice | None, db, max_new_tokens: int, n: int,
                     share: float, plan, log):
            self.run, self.tok, self.choice, self.db, self.log = run, tokenizer, choice, db, log
            self.max_new_tokens, self.n, self.share, self.plan = max_new_tokens, n, share, plan
            self.prompts: list[EvalExample] = []
            self.spent = 0.0  # seconds of samples in this attempt
            self.samples = 0  # batches answered
            self.per_prompt: float | None = None
            self.start = None
            self.skipped: list[dict] = []
            self.answered: set[int] = set()  # steps already sampled or skipped in this attempt
            self.scores: dict[int, dict] = {}  # step -> {"value", "n", "eval_loss"}
            for r in read_metrics_from(run.path / SAMPLES_FILE)[0]:  # a resumed run: the steps it has scored
                if isinstance(r.get("step"), int) and r.get("step_score") is not None:
                    self.scores[r["step"]] = {"value": r["step_score"], "n": r.get("prompts", 1),
                                              "eval_loss": r.get("eval_loss")}

        @property
        def prunes(self) -> bool:
            """Whether this callback rotates checkpoints (the Trainer's rotation keeps only the best by loss)."""
            return self.choice is not None

        def on_train_begin(self, args, state, control, **kw):
            self.start = time.time()

        def _prompts(self) -> list[EvalExample]:
            try:
                self.prompts = read_golden(self.run.path / GOLDEN_FILE)
            except GoldenError as e:
                self.log(f"golden prompts: {e.user_text()}; keeping the previous ones")
            return self.prompts

        def on_evaluate(self, args, state, control, model=None, metrics=None, **kw):
            step = state.global_step
            if model is None or step in self.answered:
                return
            self.answered.add(step)
            prompts = self._prompts()
            if not prompts:
                return
            t0, replies = time.time(), []
            self.run.set_status("running", phase="answering the golden prompts")
            try:
                self._answer(step, prompts, t0, replies, model, metrics)
            finally:
                self.run.set_status("running", phase="saving checkpoint" if control.should_save else "training")

        def _answer(self, step, prompts, t0, replies, model, metrics):
            if self.per_prompt is None and self.share > 0:  # the first prompt alone measures what one costs
                replies = self._generate(model, [prompts[0].prompt])
                self.per_prompt = time.time() - t0
            train_s = t0 - (self.start or t0) - self.spent
            k, why = sample_allowance(len(prompts) - len(replies), self.spent + time.time() - t0, train_s,
                                      self.per_prompt, self.share)
            if why:
                self.log(f"golden prompts at step {step}: " + (f"the first answered, the rest {why}" if replies and not k
                                                               else why))
            if k:
                replies += self._generate(model, [p.prompt for p in prompts[len(replies):len(replies) + k]])
            k = len(replies)
            if k == 0:
                self.skipped.append({"step": step, "reason": why})
                return
            prompts = prompts[:k]
            seconds = time.time() - t0
            self.spent += seconds
            self.samples += 1
            self.per_prompt = seconds / k
            values, step_score = [None] * k, None
            if self.choice is not None:
                figures, values = score(self.choice.metric, replies, [p.reference for p in prompts], db=self.db)
                step_score = figures[self.choice.primary]
            eval_loss = (metrics or {}).get("eval_loss")
            with open(self.run.path / SAMPLES_FILE, "a", encoding="utf-8") as f:
                for p, reply, value in zip(prompts, replies, values):
                    f.write(json.dumps({"step": step, "line": p.line, "prompt": p.question, "reply": reply,
                                        "reference": p.reference, "score": value,
                                        "metric": self.choice.primary if self.choice else None,
                                        "step_score": step_score, "prompts": k, "eval_loss": eval_loss,
                                        "seconds": round(seconds, 3), "time": time.time()}) + "\n")
            if step_score is not None:
                self.scores[step] = {"value": step_score, "n": k, "eval_loss": eval_loss}
            self.log(f"golden prompts at step {step}: {k} repl{'y' if k == 1 else 'ies'} in {seconds:.1f} s"
                     + (f", {self.choice.primary} {step_score:.2f}" if step_score is not None else ""))

        def _generate(self, model, conversations: list[list[dict]]) -> list[str]:
            import torch

            from .chat import generate_batch
            from .compat import keep_4bit_weights_trainable

            was_training = model.training
            model.eval()
            autocast = (torch.autocast(self.plan.device, dtype=self.plan.torch_dtype)
                        if self.plan.precision in ("bf16", "fp16") else nullcontext())
            try:
                with autocast:
                    return generate_batch(model, self.tok, conversations, max_new_tokens=self.max_new_tokens,
                                          batch_size=len(conversations))
            finally:
                keep_4bit_weights_trainable(model)  # a no-grad eval forward may have repacked 4-bit weights
                if was_training:
                    model.train()

        def on_save(self, args, state, control, **kw):
            if not self.prunes:
                return
            keep = {s for s in (best_step(self.scores),) if s is not None}
            if state.best_model_checkpoint:  # the lowest eval loss (the Trainer's metric_for_best_model)
                keep.add(checkpoint_step(Path(state.best_model_checkpoint)))
            prune_checkpoints(self.run, keep)

        def summary(self) -> dict:
            train_s = time.time() - (self.start or time.time()) - self.spent
            return {"prompts": len(self.prompts) or self.n, "max_new_tokens": self.max_new_tokens, "metric": self.choice.primary
                    if self.choice else None, "evaluations": self.samples, "seconds": round(self.spent, 2),
                    "share_of_training": round(self.spent / train_s, 4) if train_s > 0 else None,
                    "time_share_limit": self.share, "skipped": self.skipped}

    _CLASS = GoldenCallback
    return _CLASS
