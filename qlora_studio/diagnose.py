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

`Diagnoser` takes records one at a time (the training callback and the live UI use it);
`diagnose` runs it over a whole list; `diagnose_run` reads a run folder.

A healthy run yields no ``warning`` or ``error`` findings: every detector is tuned so that normal
batch-to-batch noise, the warmup and the end of the cosine schedule do not raise alarms.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path

KINDS = ("oom", "nonfinite", "spike", "plateau", "overfitting", "underused", "data")
GUIDE_PATH = Path(__file__).with_name("guide.md")  # the plain-words troubleshooting guide (Help tab)
SEVERITIES = ("info", "warning", "error")

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

# Under-used card: the measured peak is below this share of the card's memory (or of the estimate).
UNDERUSED_SHARE = 0.5

# Non-finite grad norms on fp16: the loss scaler skips a step when the scaled gradients overflow and
# lowers its scale, so a few such steps are normal; this many in a row is not.
FP16_SKIPPED_STEPS_LIMIT = 10

# Data: the share of examples at which a data problem becomes a warning instead of a note.
DATA_WARN_SHARE = 0.05
DUPLICATE_WARN_SHARE = 0.10
USUAL_LORA_LR = 1e-4


@dataclass
class Fix:
    """One thing to try: changed settings (TrainConfig field -> new value), or advice if none.

    ``from_step`` says where a run with these settings starts: from the newest good checkpoint at
    or before that step (None: the newest good checkpoint; 0: from scratch).
    """

    title: str
    changes: dict = field(default_factory=dict)
    why: str = ""
    from_step: int | None = None

    @property
    def actionable(self) -> bool:
        return bool(self.changes)

    def to_dict(self) -> dict:
        return {"title": self.title, "changes": dict(self.changes), "why": self.why, "from_step": self.from_step}

    @classmethod
    def from_dict(cls, d: dict) -> "Fix":
        return cls(d["title"], dict(d.get("changes") or {}), d.get("why", ""), d.get("from_step"))


@dataclass
class Finding:
    kind: str  # one of KINDS
    severity: str  # info | warning | error
    step: int  # the train step it refers to (0: before training)
    message: str  # plain words
    fixes: list[Fix] = field(default_factory=list)
    details: dict = field(default_factory=dict)  # the numbers behind the message

    def to_dict(self) -> dict:
        """Plain JSON: non-finite numbers in ``details`` become the strings "nan", "inf", "-inf"."""
        return {"kind": self.kind, "severity": self.severity, "step": self.step, "message": self.message,
                "fixes": [f.to_dict() for f in self.fixes], "details": _json_safe(self.details)}

    @classmethod
    def from_dict(cls, d: dict) -> "Finding":
        return cls(d["kind"], d["severity"], int(d.get("step") or 0), d["message"],
                   [Fix.from_dict(f) for f in d.get("fixes") or []], dict(d.get("details") or {}))


# ------------------------------------------------------------------ small helpers


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _num(x) -> float | None:
    """A metric value as a float (NaN/inf kept); None when absent or not a number."""
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)):
        return float(x)
    if isinstance(x, str):  # "nan" / "inf" written as text by a JSON fallback
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _mad(values: list[float], center: float) -> float:
    return statistics.median(abs(v - center) for v in values)


def theil_sen_slope(xs: list[float], ys: list[float]) -> float:
    """The median of the slopes between all pairs of points: a trend that one outlier cannot bend."""
    slopes = [(ys[j] - ys[i]) / (xs[j] - xs[i]) for i in range(len(xs)) for j in range(i + 1, len(xs)) if xs[j] != xs[i]]
    return statistics.median(slopes) if slopes else 0.0


def _round_sig(x: float, digits: int = 3) -> float:
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _fmt(x: float | None) -> str:
    if x is None:
        return "?"
    if not math.isfinite(x):
        return str(x)
    return f"{x:.4g}"


# ------------------------------------------------------------------ fixes shared by several findings


def settings_view(config: dict | None, plan_doc: dict | None = None) -> dict:
    """A run's settings as they ran: config.json, with what its plan.json resolved or changed (the
    micro-batch after out-of-memory recoveries, the device, the precision, the number of steps)."""
    view = dict(config or {})
    plan = (plan_doc or {}).get("plan") or {}
    for key in ("batch_size", "grad_accum", "device", "precision"):
        if plan.get(key) is not None:
            view[key] = plan[key]
    total = ((plan_doc or {}).get("schedule") or {}).get("total_steps")
    if total is not None:
        view["total_steps"] = total
    return view


class _Settings:
    """The settings a fix starts from, read from a run's `settings_view` (TrainConfig defaults if absent)."""

    def __init__(self, config: dict | None):
        c = config or {}
        self.config = c
        self.learning_rate = float(c.get("learning_rate") or 2e-4)
        self.batch_size = int(c.get("batch_size") or 4)
        self.grad_accum = int(c.get("grad_accum") or 1)
        self.max_seq_len = int(c.get("max_seq_len") or 512)
        self.quant = c.get("quant") or "nf4"
        self.double_quant = c.get("double_quant", True)
        self.epochs = float(c.get("epochs") or 1.0)
        self.max_steps = c.get("max_steps")
        self.total_steps = c.get("total_steps") or self.max_steps
        self.warmup_ratio = float(c.get("warmup_ratio") if c.get("warmup_ratio") is not None else 0.05)
        self.device = c.get("device")
        self.precision = c.get("precision")


def _halve_lr(s: _Settings, from_step: int | None, why: str) -> Fix:
    lr = _round_sig(s.learning_rate / 2)
    return Fix(f"Halve the learning rate ({s.learning_rate:g} -> {lr:g})", {"learning_rate": lr}, why, from_step)


def _smaller_batch(s: _Settings, from_step: int | None) -> Fix | None:
    if s.batch_size < 2:
        return None
    b = s.batch_size // 2
    return Fix(f"Use a smaller batch ({s.batch_size} -> {b})", {"batch_size": b},
               "smaller batches make smaller, more frequent updates, which can steady a run that jumps", from_step)


def _check_data(why: str) -> Fix:
    return Fix("Check the data", {}, why)


# ------------------------------------------------------------------ the incremental diagnoser


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
        kind = record.get("type")
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
        row = {"step": int(record.get("step") or len(self.train) + 1), "loss": _num(record.get("loss")),
               "lr": _num(record.get("lr")), "grad_norm": _num(record.get("grad_norm"))}
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
        self.evals.append({"step": int(record.get("step") or 0), "eval_loss": value})
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


# ------------------------------------------------------------------ run-level detectors


def oom_findings(status: dict | None, config: dict | None = None) -> list[Finding]:
    """An out-of-memory failure (error), and each automatic recovery from one (a note)."""
    status = status or {}
    s = _Settings(config)
    out = []
    for rec in status.get("recoveries") or []:
        out.append(Finding("oom", "info", int(rec.get("step") or 0),
                           f"Ran out of memory at step {rec.get('step')}; recovered by itself: "
                           f"micro-batch {rec.get('batch_size', ['?', '?'])[0]} -> {rec.get('batch_size', ['?', '?'])[1]}, "
                           f"gradient accumulation {rec.get('grad_accum', ['?', '?'])[0]} -> {rec.get('grad_accum', ['?', '?'])[1]} "
                           f"(same effective batch), continued from {rec.get('resumed_from') or 'the start'}.",
                           [], dict(rec)))
    if status.get("error_kind") != "oom":
        return out
    step = int(status.get("error_step") or status.get("step") or 0)
    fixes = []
    if s.batch_size > 2 or s.batch_size == 2 and s.grad_accum == 1:
        b = 2 if s.batch_size > 2 else 1
        ga = max(1, s.grad_accum * s.batch_size // b)
        fixes.append(Fix(f"Micro-batch {b} with gradient accumulation {ga}",
                         {"batch_size": b, "grad_accum": ga},
                         f"activations grow with the micro-batch; accumulating {ga} micro-batches keeps the "
                         f"effective batch at {b * ga}"))
    if s.quant != "nf4" or not s.double_quant:
        fixes.append(Fix("Turn on NF4 with double quantization", {"quant": "nf4", "double_quant": True},
                         "4-bit NF4 weights take a quarter of 16-bit ones; without it memory roughly doubles"))
    if s.max_seq_len > 128:
        n = max(128, s.max_seq_len // 2)
        fixes.append(Fix(f"Shorter sequences ({s.max_seq_len} -> {n} tokens)", {"max_seq_len": n},
                         "activation memory grows with the sequence length; longer examples get cut"))
    fixes.append(Fix("Use a smaller model", {}, "going from 7B to 3B parameters cuts the weights' memory by more than half; "
                     "`qlora-studio recommend` shows what fits this card"))
    fixes.append(Fix("Use a GPU with more memory", {}, "`qlora-studio recommend --gpu NAME` tells what a card can train"))
    where = f"at step {step}" if step else "before the first step"
    retries = status.get("recoveries") or []
    tried = f" after {len(retries)} automatic retries with smaller micro-batches" if retries else ""
    out.append(Finding("oom", "error", step,
                       f"The run ran out of memory {where}{tried}. The memory was released and the last checkpoint "
                       "was kept, so a fix can continue from it.", fixes,
                       {"error": status.get("error"), "recoveries": len(retries)}))
    return out


def underused_findings(summary: dict | None, config: dict | None = None, records: list[dict] | None = None,
                       data_report: dict | None = None) -> list[Finding]:
    """On CUDA: the measured peak below UNDERUSED_SHARE (50%) of the card's memory (or, if the card's
    size is not recorded, of the estimate) -- a larger micro-batch or longer sequences would fit. A
    note, not a warning: the run is fine, it could just be faster."""
    summary = summary or {}
    s = _Settings(config)
    device = summary.get("device") or s.device
    if device != "cuda":
        return []
    peak_mb = (summary.get("peak_memory") or {}).get("memory_reserved_mb")
    if not _finite(peak_mb):
        seen = [r.get("memory_reserved_mb") for r in records or [] if _finite(r.get("memory_reserved_mb"))]
        peak_mb = max(seen) if seen else None
    if not peak_mb:
        return []
    card_mb = summary.get("gpu_total_mb")
    est = (summary.get("memory_estimate") or {}).get("estimated_bytes")
    if _finite(card_mb):
        ref_mb, ref_name = card_mb, "the card's memory"
    elif _finite(est):
        ref_mb, ref_name = est / 2**20, "the estimate"
    else:
        return []
    share = peak_mb / ref_mb
    if share >= UNDERUSED_SHARE:
        return []
    fixes = []
    b = s.batch_size * 2
    if s.grad_accum >= 2:
        fixes.append(Fix(f"Larger micro-batch ({s.batch_size} -> {b}), half the accumulation",
                         {"batch_size": b, "grad_accum": s.grad_accum // 2},
                         "the same effective batch in fewer, fuller steps: faster"))
    else:
        fixes.append(Fix(f"Larger batch ({s.batch_size} -> {b})", {"batch_size": b},
                         "more examples per step use the idle memory and speed up each epoch"))
    truncated = (data_report or {}).get("truncated") or 0
    if truncated:
        fixes.append(Fix(f"Longer sequences ({s.max_seq_len} -> {2 * s.max_seq_len} tokens)",
                         {"max_seq_len": 2 * s.max_seq_len},
                         f"{truncated} examples were cut at {s.max_seq_len} tokens; the memory is there to keep them whole"))
    step = int(summary.get("global_step") or 0)
    return [Finding("underused", "info", step,
                    f"The run peaked at {peak_mb / 1024:.1f} GiB, {100 * share:.0f}% of {ref_name} "
                    f"({ref_mb / 1024:.1f} GiB): a larger batch or longer sequences would fit.",
                    fixes, {"peak_mb": peak_mb, "reference_mb": ref_mb, "reference": ref_name, "share": share})]


def data_findings(report: dict | None, config: dict | None = None) -> list[Finding]:
    """Data problems found before training, from a data report (`DataReport.to_dict()`).

    Duplicates are a warning from 10% of the usable rows (they over-weight some rows and leak into the
    eval split), conflicting answers, empty answers and truncation from 5%; fewer are notes.
    """
    if not report:
        return []
    s = _Settings(config)
    q = report.get("quality") or {}
    usable = max(1, int(report.get("usable") or 0))
    rows = max(usable, int(report.get("rows") or 0))
    path = report.get("path") or "the data"
    out = []

    def sev(n: int, of: int, share: float) -> str:
        return "warning" if n >= share * of else "info"

    dup = int(q.get("duplicates") or 0)
    if dup:
        out.append(Finding("data", sev(dup, usable, DUPLICATE_WARN_SHARE), 0,
                           f"{dup} of {usable} usable rows in {path} are exact duplicates of an earlier row.",
                           [Fix("Remove the duplicate rows", {}, "repeats count extra in training and can land in the "
                                "eval split too, making eval loss look better than it is")],
                           {"duplicates": dup, "lines": (q.get("examples") or {}).get("duplicates", [])}))
    conflicts = int(q.get("conflicting_prompts") or 0)
    if conflicts:
        n_rows = int(q.get("conflicting_rows") or 0)
        out.append(Finding("data", sev(n_rows, usable, DATA_WARN_SHARE), 0,
                           f"{conflicts} prompts appear with different answers ({n_rows} rows) in {path}.",
                           [Fix("Make the answers agree", {}, "the same question with different answers sends "
                                "conflicting signals; keep one answer per prompt unless variety is the point")],
                           {"conflicting_prompts": conflicts, "conflicting_rows": n_rows,
                            "lines": (q.get("examples") or {}).get("conflicting", [])}))
    empty = int(q.get("empty_answers") or 0)
    if empty:
        out.append(Finding("data", "warning", 0,
                           f"{empty} rows in {path} have an empty answer and were left out of training.",
                           [Fix("Fill in or remove the empty answers", {}, "a row without an answer has nothing to learn")],
                           {"empty_answers": empty, "lines": (q.get("examples") or {}).get("empty_answers", [])}))
    truncated = int(report.get("truncated") or 0)
    if truncated:
        lengths = report.get("token_lengths") or {}
        n = min(8192, 2 * s.max_seq_len)
        out.append(Finding("data", sev(truncated, usable, DATA_WARN_SHARE), 0,
                           f"{truncated} of {usable} examples are longer than {s.max_seq_len} tokens and were cut; "
                           "their answers lose their end.",
                           [Fix(f"Raise the sequence length ({s.max_seq_len} -> {n} tokens)", {"max_seq_len": n},
                                "whole examples teach whole answers; it costs activation memory", 0),
                            Fix("Shorten the longest examples", {}, "or split them into several rows")],
                           {"truncated": truncated, "token_lengths": lengths}))
    skipped = rows - usable - empty
    if skipped > 0:
        out.append(Finding("data", sev(skipped, rows, DATA_WARN_SHARE), 0,
                           f"{skipped} of {rows} rows in {path} could not be used (see `qlora-studio data check`).",
                           [Fix("Fix the rows listed by data check", {}, "")], {"skipped": skipped}))
    return out


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


def diagnose_run(path: str | Path) -> list[Finding]:
    """Findings for a run folder, or for a metrics.jsonl file (with its folder's files, if any)."""
    p = Path(path).expanduser()
    if p.is_file():
        folder, metrics = p.parent, p
    elif p.is_dir():
        folder, metrics = p, p / "metrics.jsonl"
    else:
        raise FileNotFoundError(f"{path}: no such run folder or metrics file")
    from .runs import read_json, read_metrics_from

    records = read_metrics_from(metrics)[0] if metrics.is_file() else []
    config = settings_view(read_json(folder / "config.json"), read_json(folder / "plan.json"))
    return diagnose(records, config=config, status=read_json(folder / "status.json"),
                    summary=read_json(folder / "summary.json"), data_report=read_json(folder / "data_report.json"))
