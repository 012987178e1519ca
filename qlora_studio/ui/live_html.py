"""The live view's HTML: the run's header (state, what it is doing, why it failed), the progress line
(step, phase, elapsed, ETA), and the golden prompts' latest answers. Pure functions of a run's files."""

from __future__ import annotations

import time
from pathlib import Path

from ..runs import read_metrics_from
from .common import esc, fmt_duration, fmt_num, notice, display_path

# How often an open page asks for news (progress line, log tail, findings), and how often it redraws the
# curves of a run that is training. Drawing the curves is the browser's biggest cost (0.2-0.4 s of a
# core per redraw in headless Chromium on this project's 2-core test machine), and where the run trains
# on the CPU the browser takes that time from training, so while such a run trains the page asks every
# POLL_CPU_S and redraws the curves every PLOT_EVERY_CPU_S, and says so. Measured with
# benchmarks/app_vs_cli.py --page toggle (one run, page open vs closed): 10 s / 30 s slowed training by
# 6.5%, 15 s / 60 s by 3.0-3.9% (two runs).
POLL_SECONDS = 5.0
POLL_CPU_S = 15.0
PLOT_EVERY_S = 5.0
PLOT_EVERY_CPU_S = 60.0


STATE_CLASS = {"running": "run", "completed": "ok", "stopped": "warn", "failed": "error", "interrupted": "warn"}


def header_html(path: Path, status: dict, config: dict, plan_doc: dict) -> str:
    state = status.get("state", "?")
    phase = status.get("phase")
    bits = [f'<span class="qs-badge qs-state-{STATE_CLASS.get(state, "info")}" id="run-state">{esc(state)}</span>',
            f'<b id="run-name">{esc(path.name)}</b>']
    if state == "running" and phase and phase != "training":
        bits.append(f'<span class="qs-muted">{esc(phase)} …</span>')
    desc = [f"model {esc(config.get('model', '?'))}", f"data {esc(display_path(config.get('data', '?')))}"]
    plan = plan_doc.get("plan") or {}
    if plan.get("targets"):
        desc.append(f"LoRA r={plan.get('rank')} on {len(plan['targets'])} module kinds")
    share = (plan_doc.get("model") or {}).get("trainable_share")
    if share is not None:
        desc.append(f"{100 * share:.2f}% of the weights train")
    if plan.get("device"):
        desc.append(f"{plan['device']} · {plan.get('precision', '')}")
    html = " ".join(bits) + f'<div class="qs-muted">{" · ".join(desc)}</div>'
    if state == "failed" and status.get("error"):
        advice = ""
        if status.get("error_kind") == "oom":
            advice = ("\nOut of memory: lower the batch size or the sequence length, keep gradient checkpointing "
                      "on, or choose a smaller model (the Hardware tab shows what fits).")
        html += notice(f"The run failed: {status['error']}{advice}\nThe full log is {path / 'train.log'}.", "error")
    elif state == "interrupted":
        html += notice("This run was interrupted (its process ended before it finished). "
                       "Resume it from its last checkpoint on the Runs tab.", "warn")
    return html


def _trains_on_cpu(state, plan_doc: dict) -> bool:
    """A run training on the CPU, where the page's work competes with training for the cores."""
    return state == "running" and (plan_doc.get("plan") or {}).get("device") == "cpu"


def progress_html(view, status: dict, plan_doc: dict) -> str:
    state = status.get("state")
    total = status.get("total_steps") or status.get("max_steps") or (plan_doc.get("schedule") or {}).get("total_steps")
    last = view.last_train or {}
    step = last.get("step") or 0
    if state != "running":
        step = max(step, status.get("step") or 0)
    # one clock: from this start (or resume) of the run, through loading, training and saving
    started = status.get("clock_start") or status.get("created_at")
    end = status.get("finished_at") if state != "running" else time.time()
    elapsed = (end - started) if (started and end) else None
    phase = status.get("phase") if state == "running" else None
    if state == "running" and not last and phase not in ("training", "evaluating") and "evaluating" not in str(phase):
        return ('<div class="qs-progress"><div class="qs-bar qs-bar-busy"><div></div></div>'
                f'<div class="qs-muted" id="run-phase">{esc(phase or "starting")} … elapsed {fmt_duration(elapsed)}'
                '</div></div>')
    pct = min(100.0, 100.0 * step / total) if total else 0.0
    eta = "-"
    if state == "running" and total:
        sps = view.seconds_per_step() or _first_steps_pace(last, status)
        if sps:
            eta = fmt_duration(sps * max(0, total - step))
    elif state == "completed":
        eta = "done"
    parts = [f'step <b id="run-step">{step}</b> / {total or "?"}', f"epoch {fmt_num(last.get('epoch'), 2)}",
             f"elapsed {fmt_duration(elapsed)}", f"ETA {eta}"]
    if phase and phase != "training":
        done, of = status.get("eval_done"), status.get("eval_total")
        batches = f" (batch {done} of {of})" if "evaluating" in phase and done is not None and of else ""
        parts.insert(0, f'<b id="run-phase">{esc(phase)}{batches}</b>')
    if last.get("loss") is not None:
        parts.append(f"loss {fmt_num(last['loss'])}")
    if view.last_eval and view.last_eval.get("eval_loss") is not None:
        parts.append(f"eval loss {fmt_num(view.last_eval['eval_loss'])}")
    pace = ""
    if _trains_on_cpu(state, plan_doc):
        pace = (f'<div class="qs-muted" id="run-pace">Training on the CPU: this page refreshes every {POLL_CPU_S:.0f} s '
                f'and redraws the curves every {PLOT_EVERY_CPU_S:.0f} s, to leave the cores to training.</div>')
    return (f'<div class="qs-progress"><div class="qs-bar"><div style="width:{pct:.1f}%"></div></div>'
            f'<div>{" · ".join(parts)}</div>{pace}</div>')


def _first_steps_pace(last: dict, status: dict) -> float | None:
    """Seconds per step from the training's start to its first logged steps (before the recent-steps
    pace has two points)."""
    since, from_step = status.get("training_since"), status.get("training_from_step") or 0
    t, step = last.get("time"), last.get("step")
    if isinstance(since, (int, float)) and isinstance(t, (int, float)) and isinstance(step, int) and step > from_step:
        return max(0.0, t - since) / (step - from_step)
    return None


def samples_html(path: Path, limit_bytes: int = 1 << 20) -> str:
    """The golden prompts' latest answers beside their references, and how the score moved."""
    records, _ = read_metrics_from(path) if path.is_file() and path.stat().st_size < limit_bytes * 16 else ([], 0)
    records = [r for r in records if isinstance(r.get("step"), int)]
    if not records:
        return ""
    last = max(r["step"] for r in records)
    steps = sorted({r["step"] for r in records})
    trend = [f"step {st}: {fmt_num(next(r['step_score'] for r in records if r['step'] == st), 2)}"
             for st in steps if any(r["step"] == st and isinstance(r.get("step_score"), (int, float)) for r in records)]
    rows = "".join(
        f"<tr><td>{esc(str(r.get('prompt'))[:240])}</td><td><code>{esc(str(r.get('reply'))[:300])}</code></td>"
        f"<td><code>{esc(str(r.get('reference'))[:300])}</code></td></tr>" for r in records if r["step"] == last)
    return (f'<div id="golden-samples"><b>What the model says now</b> (held-out prompts, step {last})'
            + (f' · {esc(records[-1].get("metric") or "score")}: ' + " → ".join(trend[-6:]) if trend else "")
            + f'<table class="qs-table"><tr><th>prompt</th><th>the model now</th><th>reference</th></tr>{rows}</table></div>')
