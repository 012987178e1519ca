"""Live views of runs: metrics read incrementally, curves kept bounded, figures built once per change.

Every page that watches a run shares one `RunView` per run folder (server state, not browser state):
a poll reads only the bytes appended to metrics.jsonl since the last poll (`read_metrics_from`), adds
them to bounded series, and rebuilds the figures only when something new arrived. A series keeps at
most `Series.cap` points for drawing (when full, every other point goes and the stride doubles; the
newest point is always drawn), so neither a poll nor a redraw grows with the length of the run.
Figures are plotly JSON: the layout of each kind of figure is built with plotly once and cached; a
redraw only fills in the points, which keeps the training thread's share of the CPU (and the GIL).
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from collections import deque
from pathlib import Path

from ..runs import read_metrics_from
from .common import plot_template, typed_array

CAP = 400


class Series:
    """One curve, decimated to at most ``cap`` drawn points; O(1) amortized per point."""

    def __init__(self, cap: int = CAP):
        self.cap = cap
        self.xs: list = []
        self.ys: list = []
        self.stride = 1
        self.n = 0
        self.last: tuple | None = None

    def add(self, x, y) -> None:
        if y is None or isinstance(y, bool) or not isinstance(y, (int, float)):
            return
        if not math.isfinite(y):
            y = None  # NaN / inf: a gap in the curve (the findings panel is where it gets explained)
        self.last = (x, y)
        if self.n % self.stride == 0:
            self.xs.append(x)
            self.ys.append(y)
            if len(self.xs) > self.cap:
                self.xs, self.ys = self.xs[::2], self.ys[::2]
                self.stride *= 2
        self.n += 1

    def points(self) -> tuple[list, list]:
        xs, ys = list(self.xs), list(self.ys)
        if self.last is not None and (not xs or xs[-1] != self.last[0]):
            xs.append(self.last[0])
            ys.append(self.last[1])
        return xs, ys

    def __len__(self) -> int:
        return self.n


class RunView:
    """What the pages show of one run, updated from its folder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.offset = 0
        self.inode = None
        self.version = 0  # bumps whenever new records arrive
        self.loss, self.eval_loss = Series(), Series()
        self.lr, self.grad_norm, self.tokens_per_s, self.memory = Series(), Series(), Series(), Series()
        self.memory_label = "memory (MiB)"
        self.last_train: dict | None = None
        self.last_eval: dict | None = None
        self.recent: deque = deque(maxlen=20)  # (time, step) of recent train records, for the ETA
        self._figs = None
        self._figs_version = -1

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def refresh(self) -> bool:
        """Read what was appended since the last call; True if anything new arrived."""
        with self.lock:
            try:
                st = os.stat(self.metrics_path)
            except FileNotFoundError:
                return False
            # A resumed run rewrites metrics.jsonl (dropping lines after its checkpoint): start over.
            if (self.inode is not None and st.st_ino != self.inode) or st.st_size < self.offset:
                self._reset()
            self.inode = st.st_ino
            if st.st_size == self.offset:
                return False
            records, self.offset = read_metrics_from(self.metrics_path, self.offset)
            for rec in records:
                self._add(rec)
            if records:
                self.version += 1
            return bool(records)

    def _add(self, rec: dict) -> None:
        step = rec.get("step")
        if rec.get("type") == "eval":
            self.eval_loss.add(step, rec.get("eval_loss"))
            self.last_eval = rec
            return
        if rec.get("type") != "train":
            return
        self.loss.add(step, rec.get("loss"))
        self.lr.add(step, rec.get("lr"))
        self.grad_norm.add(step, rec.get("grad_norm"))
        self.tokens_per_s.add(step, rec.get("tokens_per_s"))
        if "memory_reserved_mb" in rec:
            self.memory_label = "GPU memory reserved (MiB)"
            self.memory.add(step, rec["memory_reserved_mb"])
        elif "memory_rss_mb" in rec:
            self.memory_label = "process memory, peak RSS (MiB)"
            self.memory.add(step, rec["memory_rss_mb"])
        self.last_train = rec
        if isinstance(rec.get("time"), (int, float)) and isinstance(step, int):
            self.recent.append((rec["time"], step))

    # ---------------------------------------------------------------- derived

    def seconds_per_step(self) -> float | None:
        if len(self.recent) < 2:
            return None
        (t0, s0), (t1, s1) = self.recent[0], self.recent[-1]
        return (t1 - t0) / (s1 - s0) if s1 > s0 and t1 > t0 else None

    @staticmethod
    def estimate_mb(plan_doc: dict) -> float | None:
        """The plan's memory estimate (MiB), drawn on a CUDA run's memory curve; None elsewhere."""
        plan = plan_doc.get("plan") or {}
        est = (plan.get("memory") or {}).get("estimate_bytes")
        return est / 2**20 if plan.get("device") == "cuda" and est else None

    def figures(self, estimate_mb: float | None = None) -> tuple[str, str]:
        """(loss figure, dynamics figure) as plotly JSON, rebuilt only when new records arrived.
        ``estimate_mb``: the plan's memory estimate, drawn as a line on the memory curve."""
        with self.lock:
            est = estimate_mb
            key = (self.version, est)
            if self._figs is None or self._figs_version != key:
                self._figs = (loss_figure(self), dynamics_figure(self, est))
                self._figs_version = key
            return self._figs


class LiveRuns:
    """One `RunView` per run folder, shared by every page (at most ``size`` kept)."""

    def __init__(self, size: int = 16):
        self.size = size
        self._views: dict[str, tuple[RunView, float]] = {}
        self._lock = threading.Lock()

    def view(self, path: str | Path) -> RunView:
        key = str(Path(path))
        with self._lock:
            if key in self._views:
                view = self._views[key][0]
            else:
                if len(self._views) >= self.size:
                    oldest = min(self._views, key=lambda k: self._views[k][1])
                    del self._views[oldest]
                view = RunView(key)
            self._views[key] = (view, time.time())
            return view

    def forget(self, path: str | Path) -> None:
        with self._lock:
            self._views.pop(str(Path(path)), None)


live_runs = LiveRuns()


# ------------------------------------------------------------------ figures

_LAYOUT = dict(margin=dict(l=56, r=16, t=48, b=40),
               legend=dict(orientation="h", yanchor="bottom", y=1.02, xanchor="right", x=1))


def empty_figure(title: str, message: str, height: int = 320):
    import plotly.graph_objects as go

    fig = go.Figure()
    fig.update_layout(title=title, height=height, template=plot_template(), **_LAYOUT)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font=dict(size=14, color="#6b7280"))
    return fig


_skeletons: dict[tuple, dict] = {}
_skeleton_lock = threading.Lock()


def _skeleton(key: tuple, build) -> dict:
    """The plotly JSON of a figure with empty traces, built once per kind of figure."""
    with _skeleton_lock:
        if key not in _skeletons:
            _skeletons[key] = json.loads(build().to_json())
        return _skeletons[key]


def step_tick(last_step: float) -> int:
    """A whole-number tick spacing (1, 2, 5, 10, 20, 50, ...) giving at most ~8 ticks up to ``last_step``."""
    tick = 1
    while last_step / tick > 8:
        tick = tick * 5 // 2 if str(tick)[0] == "2" else tick * 2
    return tick


def _fill(skeleton: dict, series: list[Series]) -> str:
    data, last = [], 1
    for trace, s in zip(skeleton["data"], series):
        xs, ys = s.points()
        last = max([last] + [x for x in xs if isinstance(x, (int, float))])
        data.append(dict(trace, x=typed_array(xs), y=typed_array(ys)))
    # steps are whole numbers: ticks at whole steps only (plotly's own choice on a short run is 0.5 apart)
    tick = step_tick(last)
    layout = {k: (dict(v, dtick=tick, tick0=0) if k.startswith("xaxis") else v) for k, v in skeleton["layout"].items()}
    return json.dumps({"data": data, "layout": layout}, separators=(",", ":"))


def loss_figure(view: RunView) -> str:
    import plotly.graph_objects as go

    if not len(view.loss) and not len(view.eval_loss):
        return empty_figure("Loss", "waiting for the first logged step …").to_json()
    has_eval = bool(len(view.eval_loss))
    mode = "lines+markers" if len(view.loss) < 60 else "lines"

    def build():
        fig = go.Figure()
        fig.add_trace(go.Scatter(x=[], y=[], mode=mode, name="train loss", line=dict(color="#4f46e5", width=2),
                                 marker=dict(size=5)))
        if has_eval:
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines+markers", name="eval loss",
                                     line=dict(color="#f97316", width=2, dash="dot"), marker=dict(size=8)))
        fig.update_layout(title="Loss", height=340, xaxis_title="step", template=plot_template(), **_LAYOUT)
        fig.update_xaxes(rangemode="tozero")
        return fig

    return _fill(_skeleton(("loss", has_eval, mode), build), [view.loss, view.eval_loss])


def dynamics_figure(view: RunView, estimate_mb: float | None = None) -> str:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    def build():
        fig = make_subplots(rows=2, cols=2, horizontal_spacing=0.1, vertical_spacing=0.2,
                            subplot_titles=("learning rate", "gradient norm", "tokens / s (non-pad)", view.memory_label))
        for (row, col), color, name in zip(((1, 1), (1, 2), (2, 1), (2, 2)),
                                           ("#0ea5e9", "#10b981", "#8b5cf6", "#ef4444"),
                                           ("lr", "grad norm", "tokens/s", "memory")):
            fig.add_trace(go.Scatter(x=[], y=[], mode="lines", name=name, line=dict(color=color, width=2),
                                     showlegend=False), row=row, col=col)
        if estimate_mb:
            fig.add_hline(y=estimate_mb, line=dict(color="#6b7280", dash="dash"), row=2, col=2,
                          annotation_text=f"estimated {estimate_mb / 1024:.1f} GiB", annotation_position="bottom right")
        fig.update_layout(height=420, template=plot_template(), **{**_LAYOUT, "margin": dict(l=56, r=16, t=40, b=36)})
        fig.update_xaxes(title_text="step", row=2)
        fig.update_xaxes(rangemode="tozero")
        # memory from zero: a flat curve is not zoomed into a range of a few MiB
        fig.update_yaxes(rangemode="tozero", row=2, col=2)
        return fig

    return _fill(_skeleton(("dynamics", view.memory_label, estimate_mb), build),
                 [view.lr, view.grad_norm, view.tokens_per_s, view.memory])

