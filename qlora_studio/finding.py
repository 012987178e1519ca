"""A finding and its fixes: what `diagnose` and `run_checks` return, and what they share.

A `Finding` says what looks wrong, at which step, how severe; its `Fix`es come in the order to try
them. A fix is a set of changed settings (TrainConfig field -> new value) and where the new run starts
from (`Fix.from_step`), or, with no changes, a piece of advice. `settings_view` is the run's settings as
they ran, which every fix starts from.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

KINDS = ("oom", "nonfinite", "spike", "plateau", "overfitting", "underused", "data")
SEVERITIES = ("info", "warning", "error")


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
    for key in ("batch_size", "grad_accum", "device", "precision", "gradient_checkpointing", "decoded_weights"):
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
        self.gradient_checkpointing = c.get("gradient_checkpointing")
        self.decoded_weights = c.get("decoded_weights")


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
