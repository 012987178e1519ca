"""Findings over a run's metrics, each with fixes the user can apply.

A pure module: no torch, no UI. It reads the records of ``metrics.jsonl`` (train and eval lines),
plus whatever else is known about the run (config.json, status.json, summary.json,
data_report.json), and returns `Finding`s. Each finding carries `Fix`es, in the order the field
recommends them; a fix is a set of changed settings (TrainConfig field -> new value) and where the
new run starts from (see `Fix.from_step`), or, with no changes, a piece of advice.

Kinds and what triggers them (the thresholds and why are in each detector's docstring):

- ``nonfinite``   a NaN/inf loss or grad norm, or a loss of exactly 0.0, in the raw per-step values
- ``spike``       a loss far above the recent level (robust z-score: median level, MAD of step-to-step noise)
- ``plateau``     the loss not moving while the learning rate is in its main stage
- ``overfitting`` eval loss rising over two evaluations while train loss falls
- ``oom``         the run ran out of memory (from status.json), or recovered from it by itself
- ``underused``   on CUDA, the measured peak memory far below what the card has
- ``data``        duplicates, conflicting answers, empty answers, truncated examples

`Diagnoser` (here) takes records one at a time (the training callback and the live UI use it); the
run-level findings (``oom``, ``underused``, ``data``) are in `run_checks`; `diagnose` runs both over a
whole run; `diagnose_run` reads a run folder. `Finding` and `Fix` are in `finding`.

A healthy run yields no ``warning`` or ``error`` findings: every detector is tuned so that normal
batch-to-batch noise, the warmup and the end of the cosine schedule do not raise alarms.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .errors import StudioError
from .finding import (KINDS, Finding, Fix, _check_data, _finite, _fmt, _halve_lr, _mad,  # noqa: F401
                      _num, _round_sig, _Settings, _smaller_batch, settings_view, theil_sen_slope)
from .run_checks import data_findings, oom_findings, underused_findings

GUIDE_PATH = Path(__file__).with_name("guide.md")  # the plain-words troubleshooting guide (Help tab)

# Spike: a loss is a spike when it stands SPIKE_Z robust standard deviations of step-to-step noise
# above the recent level (see `Diagnoser._check_spike`), and at least SPIKE_MIN_JUMP above it
# relative to the level (so a curve with almost no noise cannot turn a tiny wobble into a "spike").
SPIKE_WINDOW = 50
SPIKE_MIN_WINDOW = 8
SPIKE_LEVEL_POINTS = 5
SPIKE_Z = 6.0
SPIKE_MIN_JUMP = 0.10
SPIKE_QUIET_STEPS = 5  # after a spike is reported, the next few steps belong to the same event

# Plateau: judged over a window of the last PLATEAU_WINDOW_FRACTION of the run (at least
# PLATEAU_MIN_WINDOW train steps, at most PLATEAU_MAX_WINDOW) taken entirely in the main stage of the
# schedule: after warmup (the learning rate has reached 90% of its peak) and before the cosine tail
# (the learning rate has fallen below 25% of its peak).
PLATEAU_MIN_WINDOW = 10
PLATEAU_MAX_WINDOW = 50
PLATEAU_WINDOW_FRACTION = 0.15
PLATEAU_WINDOW_DROP = 0.01  # the window's trend line falls by less than 1% of the loss ...
PLATEAU_TOTAL_DROP = 0.03  # ... and the loss is within 3% of where the run started
MAIN_STAGE_LR = (0.9, 0.25)

# Overfitting: eval loss up at two evaluations in a row, OVERFIT_MIN_RISE above the best so far,
# while the train loss over the same steps is lower than over the steps before.
OVERFIT_MIN_RISE = 0.01

# Non-finite grad norms on fp16: the loss scaler skips a step when the scaled gradients overflow and
# lowers its scale, so a few such steps are normal; this many in a row is not.
FP16_SKIPPED_STEPS_LIMIT = 10

USUAL_LORA_LR = 1e-4


# ------------------------------------------------------------------ the incremental diagnoser


def record_kind(record) -> str | None:
    """"train", "eval" or None (not a metric record): the record's ``type``, or, for a line without one
    (metrics written by other tools: step, loss, learning_rate or lr, grad_norm; eval lines with
    eval_loss), what its keys say it is."""
    if not isinstance(record, dict):
        return None
    kind = record.get("type")
    if kind is not None:
        return kind if kind in ("train", "eval") else None
    if "eval_loss" in record:
        return "eval"
    return "train" if "loss" in record else None


def _step(record: dict, default: int) -> int:
    """The record's step as a whole number (``default`` when absent, zero or not a finite number)."""
    step = _num(record.get("step"))
    return int(step) if step and math.isfinite(step) else default



class Diagnoser:
    """Findings over a stream of metric records, as they arrive.

    ``add(record)`` returns the findings that record brought (usually none); ``findings`` holds all
    so far. ``stop_reason`` is the first finding that should stop training (a NaN/inf), or None.
    """

    def __init__(self, config: dict | None = None):
        self.settings = _Settings(config)
        self.train: list[dict] = []  # {"step", "loss", "lr", "grad_norm"} as numbers (NaN kept)
        self.evals: list[dict] = []  # {"step", "eval_loss"}
        self.findings: list[Finding] = []
        self.stop_reason: Finding | None = None
        self._last_spike_step: int | None = None
        self._plateau_done = False
        self._overfit_done = False
        self._nonfinite_done = False
        self._zero_done = False
        self._fp16_skips = 0
        self._fp16_noted = False
        self._peak_lr_seen = 0.0
        self._warmup_over_at: int | None = None  # index into self.train

    # -- feeding
    def add(self, record: dict) -> list[Finding]:
        kind = record_kind(record)
        if kind == "train":
            new = self._add_train(record)
        elif kind == "eval":
            new = self._add_eval(record)
        else:
            new = []
        self.findings.extend(new)
        return new

    def add_all(self, records) -> list[Finding]:
        new = []
        for r in records:
            new.extend(self.add(r))
        return new

    def _add_train(self, record: dict) -> list[Finding]:
        lr = record.get("lr") if record.get("lr") is not None else record.get("learning_rate")
        row = {"step": _step(record, len(self.train) + 1), "loss": _num(record.get("loss")),
               "lr": _num(lr), "grad_norm": _num(record.get("grad_norm"))}
        out = []
        bad = self._check_nonfinite(row)
        if bad:
            out.append(bad)
            if bad.severity == "error" and bad.details.get("stop") and self.stop_reason is None:
                self.stop_reason = bad
        if _finite(row["loss"]) and row["loss"] != 0.0:
            spike = self._check_spike(row)
            if spike:
                out.append(spike)
        self.train.append(row)
        if _finite(row["lr"]):
            self._peak_lr_seen = max(self._peak_lr_seen, row["lr"])
            if self._warmup_over_at is None and row["lr"] >= MAIN_STAGE_LR[0] * self._peak_lr():
                self._warmup_over_at = len(self.train) - 1
        if not self._plateau_done:
            plateau = self._check_plateau()
            if plateau:
                self._plateau_done = True
                out.append(plateau)
        return out

    def _add_eval(self, record: dict) -> list[Finding]:
        value = _num(record.get("eval_loss"))
        if value is None:
            return []
        self.evals.append({"step": _step(record, 0), "eval_loss": value})
        if self._overfit_done:
            return []
        found = self._check_overfitting()
        if found:
            self._overfit_done = True
            return [found]
        return []

    # -- helpers over the stream
    def _peak_lr(self) -> float:
        """The schedule's peak: the configured learning rate (or the highest seen, if none configured)."""
        configured = self.settings.config.get("learning_rate")
        return float(configured) if _finite(configured) else self._peak_lr_seen

    def _last_finite_loss(self) -> dict | None:
        for row in reversed(self.train):
            if _finite(row["loss"]):
                return row
        return None

    def _last_good_checkpoint_step(self, bad_step: int) -> int:
        """The newest step whose checkpoint can be trusted when step ``bad_step`` went bad.

        A checkpoint at step s holds the weights after s updates; the loss logged at step s+1 is the
        first computed with them. So checkpoint s is good only if step s+1 was still finite:
        s <= bad_step - 2.
        """
        return max(0, bad_step - 2)

    # -- detectors
    def _check_nonfinite(self, row: dict) -> Finding | None:
        """NaN/inf in the raw per-step loss or grad norm, or a loss of exactly 0.0.

        - Non-finite loss: an error that stops the run (the weights are, or are about to be, ruined).
        - Non-finite grad norm with a finite loss: on bf16/fp32 the same error. On fp16 the loss
          scaler skips such steps and lowers its scale, so a few are normal (a note); more than
          FP16_SKIPPED_STEPS_LIMIT in a row is the same error.
        - Loss exactly 0.0: an error (nothing is learned: the trained tokens are all masked or the
          loss underflowed); it does not stop the run, since it does not damage the weights.
        """
        s = self.settings
        loss, gn, step = row["loss"], row["grad_norm"], row["step"]
        fp16 = s.precision == "fp16"
        loss_bad = loss is not None and not math.isfinite(loss)
        gn_bad = gn is not None and not math.isfinite(gn)
        if gn_bad and not loss_bad and fp16:
            self._fp16_skips += 1
            if self._fp16_skips < FP16_SKIPPED_STEPS_LIMIT:
                if self._fp16_noted:
                    return None
                self._fp16_noted = True
                return Finding("nonfinite", "info", step,
                               f"At step {step} the gradients overflowed in fp16 and the loss scaler skipped the "
                               "update. A few skipped steps are normal on fp16 cards while the scaler finds its level.",
                               [], {"grad_norm": gn, "loss": loss})
            gn_bad = True
        elif not gn_bad:
            self._fp16_skips = 0
        if (loss_bad or (gn_bad and (not fp16 or self._fp16_skips >= FP16_SKIPPED_STEPS_LIMIT))) and not self._nonfinite_done:
            self._nonfinite_done = True
            last = self._last_finite_loss()
            what = f"the loss became {_fmt(loss)}" if loss_bad else f"the gradient norm became {_fmt(gn)}"
            if gn_bad and not loss_bad and fp16:
                what += f" for {self._fp16_skips} steps in a row"
            since = f" (the last finite loss was {_fmt(last['loss'])} at step {last['step']})" if last else ""
            good = self._last_good_checkpoint_step(step)
            start = (f"the newest checkpoint at or before step {good}" if good else "scratch")
            fixes = [_halve_lr(s, good, "too large a step size is the usual cause of numbers blowing up; "
                                        f"the new run starts from {start}, before the weights went bad")]
            smaller = _smaller_batch(s, good)
            if smaller:
                fixes.append(smaller)
            fixes.append(_check_data("a broken example (empty or garbled answer, extreme length) can produce "
                                     "a NaN on its own; look at `qlora-studio data check`"))
            if fp16:
                lr = _round_sig(s.learning_rate / 4)
                fixes.append(Fix(f"fp16 card: lower the learning rate to a quarter ({lr:g})", {"learning_rate": lr},
                                 "fp16 overflows above 65504; smaller updates keep activations in range. Keep the "
                                 "compute dtype at fp16 with loss scaling (bf16 needs a card of compute capability 8.0+)",
                                 good))
            return Finding("nonfinite", "error", step,
                           f"At step {step} {what}{since}. Training was stopped so the damaged weights are not "
                           f"saved; a fix restarts from {start}.",
                           fixes, {"loss": loss, "grad_norm": gn, "last_good_step": good, "stop": True})
        if loss == 0.0 and not self._zero_done:
            self._zero_done = True
            fixes = [_check_data("a loss of exactly zero means no answer token was scored: check that answers are "
                                 "not empty and are not cut off by the sequence length"),
                     _halve_lr(s, self._last_good_checkpoint_step(step),
                               "if the loss fell to zero through ever larger updates, smaller ones keep it honest")]
            return Finding("nonfinite", "error", step,
                           f"At step {step} the loss is exactly 0.0. A real loss is never exactly zero: no answer "
                           "token was trained on, or the numbers underflowed.",
                           fixes, {"loss": loss, "grad_norm": gn})
        return None

    def _check_spike(self, row: dict) -> Finding | None:
        """A robust jump against the recent window of losses.

        The window is the previous SPIKE_WINDOW (50) finite losses; at least SPIKE_MIN_WINDOW (8) are
        needed, so the first steps never alarm. The level is the median of the last 5 of them (little
        lag on a falling curve); the spread is the MAD of successive differences / sqrt(2) -- step-to-
        step noise, which the curve's downward trend does not inflate; 50 points keep that estimate
        steady -- floored at 1% of the level. z = (loss - level) / (1.4826 * spread). A spike needs
        z >= SPIKE_Z (6) and a jump of at least SPIKE_MIN_JUMP (10%) of the level. On 200 simulated
        noisy, falling curves of 120 steps the largest z was 5.8 (median 2.8); healthy real runs
        (tiny model, SmolLM2 on SQL) stay below 4; one gibberish batch among learned rows scores 10-12.
        """
        window = [r["loss"] for r in self.train[-SPIKE_WINDOW:] if _finite(r["loss"]) and r["loss"] != 0.0]
        if len(window) < SPIKE_MIN_WINDOW:
            return None
        if self._last_spike_step is not None and row["step"] - self._last_spike_step <= SPIKE_QUIET_STEPS:
            return None
        med = statistics.median(window[-SPIKE_LEVEL_POINTS:])
        diffs = [b - a for a, b in zip(window, window[1:])]
        spread = _mad(diffs, statistics.median(diffs)) / math.sqrt(2)
        scale = max(1.4826 * spread, 0.01 * abs(med), 1e-8)
        z = (row["loss"] - med) / scale
        if z < SPIKE_Z or row["loss"] - med < SPIKE_MIN_JUMP * abs(med):
            return None
        self._last_spike_step = row["step"]
        s = self.settings
        step = row["step"]
        before = max(0, step - 1)
        fixes = [_halve_lr(s, before, "a smaller step size keeps one bad batch from throwing the weights far; "
                                      f"the new run starts from the newest checkpoint at or before step {before}, "
                                      "before the jump")]
        smaller = _smaller_batch(s, before)
        if smaller:
            fixes.append(smaller)
        fixes.append(_check_data("a single unusual batch (garbled text, a wrong answer, a very long example) "
                                 "causes most one-step jumps; `qlora-studio data check` lists duplicates, "
                                 "conflicting and empty answers"))
        return Finding("spike", "warning", step,
                       f"At step {step} the loss jumped to {_fmt(row['loss'])}, against {_fmt(med)} typical for the "
                       f"last few steps ({z:.1f} times the usual step-to-step spread).",
                       fixes, {"loss": row["loss"], "level": med, "z": round(z, 2), "window": len(window)})

    def _check_plateau(self) -> Finding | None:
        """The loss trend too flat for the schedule's stage.

        Judged only on the main stage of the schedule -- the warmup and the final cosine tail are
        meant to move slowly -- over the last W train steps, W = 15% of the run (10..50 steps), all
        taken after the learning rate first reached 90% of its peak and while it is above 25% of it.
        A plateau is a window whose Theil-Sen trend line drops by less than 1% of the loss AND a run
        whose loss is within 3% of where it started: a run that learned and then levelled off has
        converged, it has not stalled.
        """
        if self._warmup_over_at is None:
            return None
        s = self.settings
        total = s.total_steps or (self.train[-1]["step"] if self.train else 0)
        w = max(PLATEAU_MIN_WINDOW, min(PLATEAU_MAX_WINDOW, round(PLATEAU_WINDOW_FRACTION * (total or 0))))
        rows = self.train[self._warmup_over_at:]
        if len(rows) < w:
            return None
        window = rows[-w:]
        peak = self._peak_lr()
        if any(not _finite(r["loss"]) or r["loss"] == 0.0 for r in window):
            return None
        if any(_finite(r["lr"]) and r["lr"] < MAIN_STAGE_LR[1] * peak for r in window):
            return None  # the cosine tail: slow on purpose
        start_losses = [r["loss"] for r in self.train[:5] if _finite(r["loss"])]
        if not start_losses:
            return None
        start = statistics.median(start_losses)
        level = statistics.median(r["loss"] for r in window)
        slope = theil_sen_slope([r["step"] for r in window], [r["loss"] for r in window])
        window_drop = -slope * (window[-1]["step"] - window[0]["step"]) / level if level else 0.0
        total_drop = (start - level) / start if start else 0.0
        if window_drop >= PLATEAU_WINDOW_DROP or total_drop >= PLATEAU_TOTAL_DROP:
            return None
        step = window[-1]["step"]
        lr_now = window[-1]["lr"] if _finite(window[-1]["lr"]) else s.learning_rate
        if s.learning_rate < USUAL_LORA_LR / 2:
            new_lr = USUAL_LORA_LR
            lr_fix = Fix(f"Raise the learning rate ({s.learning_rate:g} -> {new_lr:g})", {"learning_rate": new_lr},
                         f"{s.learning_rate:g} is far below the 1e-4 to 2e-4 that LoRA usually trains with; "
                         "doubling it would still be too little")
        else:
            new_lr = _round_sig(2 * s.learning_rate)
            lr_fix = Fix(f"Double the learning rate ({s.learning_rate:g} -> {new_lr:g})", {"learning_rate": new_lr},
                         "the updates are too small to move the loss")
        if s.max_steps:
            more = Fix(f"Train longer ({s.max_steps} -> {2 * s.max_steps} steps)", {"max_steps": 2 * int(s.max_steps)},
                       "the model may need more passes over the data", None)
        else:
            more = Fix(f"More epochs ({s.epochs:g} -> {2 * s.epochs:g})", {"epochs": 2 * s.epochs},
                       "the model may need more passes over the data", None)
        fixes = [lr_fix, more, _check_data("inconsistent or low-quality answers slow learning: the model gets "
                                           "conflicting signals")]
        return Finding("plateau", "warning", step,
                       f"Over steps {window[0]['step']}-{step} the loss stayed at about {_fmt(level)} "
                       f"(trend {100 * window_drop:+.2f}% over the window, {100 * total_drop:+.2f}% since the start) "
                       f"although the learning rate ({_fmt(lr_now)}) is in its main stage: the run is barely learning.",
                       fixes, {"slope_per_step": slope, "window_drop": window_drop, "total_drop": total_drop,
                               "window": [window[0]["step"], step], "learning_rate": lr_now})

    def _check_overfitting(self) -> Finding | None:
        """Eval loss rising over the last two evaluations while the train loss falls.

        Needs three evaluations e0 < e1 < e2 (in eval loss) with e2 at least 1% above the best eval
        loss so far, and the median train loss between e0's and e2's steps below the median over as
        many steps before e0 (the model still gets better at the training rows).
        """
        if len(self.evals) < 3:
            return None
        e0, e1, e2 = self.evals[-3:]
        best = min(self.evals, key=lambda e: e["eval_loss"])
        if not (_finite(e0["eval_loss"]) and _finite(e1["eval_loss"]) and _finite(e2["eval_loss"])):
            return None
        if not (e0["eval_loss"] < e1["eval_loss"] < e2["eval_loss"]):
            return None
        if e2["eval_loss"] < best["eval_loss"] * (1 + OVERFIT_MIN_RISE):
            return None
        after = [r["loss"] for r in self.train if e0["step"] < r["step"] <= e2["step"] and _finite(r["loss"])]
        before = [r["loss"] for r in self.train if r["step"] <= e0["step"] and _finite(r["loss"])][-max(1, len(after)):]
        if not after or not before or statistics.median(after) >= statistics.median(before):
            return None
        s = self.settings
        b = best["step"]
        fixes = [Fix(f"Stop at the best checkpoint (step {b}, eval loss {_fmt(best['eval_loss'])})", {"max_steps": b},
                     "the model was best on held-out rows there; later steps only memorised the training rows", b)]
        total = s.total_steps or self.train[-1]["step"]
        if s.max_steps:
            fixes.append(Fix(f"Train fewer steps ({s.max_steps} -> {b})", {"max_steps": b},
                             "a run whose schedule ends where held-out loss was lowest", 0))
        else:
            epochs = max(0.1, math.ceil(10 * s.epochs * b / max(1, total)) / 10)
            fixes.append(Fix(f"Train fewer epochs ({s.epochs:g} -> {epochs:g})", {"epochs": epochs},
                             "a run whose schedule ends about where held-out loss was lowest", 0))
        fixes.append(Fix("Add more training data", {}, "with more varied rows the model has to learn the pattern "
                         "instead of memorising rows"))
        return Finding("overfitting", "warning", e2["step"],
                       f"Eval loss rose from {_fmt(e0['eval_loss'])} (step {e0['step']}) to {_fmt(e2['eval_loss'])} "
                       f"(step {e2['step']}) while the train loss kept falling: the model is memorising the training "
                       f"rows. It was best at step {b} (eval loss {_fmt(best['eval_loss'])}).",
                       fixes, {"best_step": b, "best_eval_loss": best["eval_loss"],
                               "eval_losses": [[e["step"], e["eval_loss"]] for e in self.evals],
                               "train_median_before": statistics.median(before), "train_median_after": statistics.median(after)})


# ------------------------------------------------------------------ whole runs


def diagnose(records: list[dict], *, config: dict | None = None, status: dict | None = None,
             summary: dict | None = None, data_report: dict | None = None) -> list[Finding]:
    """Every finding over a run's metric records and whatever else of the run is known, by step."""
    d = Diagnoser(config)
    d.add_all(records)
    findings = data_findings(data_report, config) + d.findings + oom_findings(status, config)
    findings += underused_findings(summary, config, records, data_report)
    order = {k: i for i, k in enumerate(KINDS)}
    return sorted(findings, key=lambda f: (f.step, order.get(f.kind, 99)))


class NothingToDiagnose(StudioError):
    """A metrics file (or a run folder) holds no record the diagnosis recognises."""


def diagnose_run(path: str | Path) -> list[Finding]:
    """Findings for a run folder, or for a metrics.jsonl file (with its folder's files, if any).

    Raises `runs.DamagedRunFile` when the folder's config.json, status.json or summary.json cannot be
    read, and `NothingToDiagnose` when no metric record was recognised and nothing else was found (an
    empty answer would read as "nothing looks wrong")."""
    p = Path(path).expanduser()
    if p.is_file():
        folder, metrics = p.parent, p
    elif p.is_dir():
        folder, metrics = p, p / "metrics.jsonl"
    else:
        raise FileNotFoundError(f"{path}: no such run folder or metrics file")
    from .runs import RunFolder, read_json, read_metrics_from, read_run_file

    records = read_metrics_from(metrics)[0] if metrics.is_file() else []
    config = settings_view(read_run_file(folder / "config.json"), RunFolder(folder).plan())
    report = read_json(folder / "data_report.json")
    findings = diagnose(records, config=config, status=read_run_file(folder / "status.json"),
                        summary=read_run_file(folder / "summary.json"),
                        data_report=report if isinstance(report, dict) else None)
    if not findings and not any(record_kind(r) for r in records):
        what = f"no metric records recognised in {metrics}" if metrics.is_file() else f"{metrics}: no such file"
        raise NothingToDiagnose(f"{what} (expected lines with step and loss)",
                                hint='one JSON object a line, e.g. {"step": 10, "loss": 1.23}; eval lines carry eval_loss')
    return findings
