"""Task evaluation in the page (the Runs tab and the Chat tab both offer it): run `taskeval.evaluate_run`
on a run's held-out prompts and show the base model's and the fine-tuned model's figures, the worst
answers first; the Runs table's "task eval" column; the held-out prompts the Chat tab offers to try."""

from __future__ import annotations

import gradio as gr

from ..manager import get_manager
from .common import esc, run_folder


COUNTS = {"n", "errors"}  # figures that count answers, not fractions of them


def fmt_score(x: float) -> str:
    return f"{x:.0%}" if 0 <= x <= 1 else f"{x:.3g}"


def task_metric(summary: dict) -> str:
    """The run's task evaluation for the table: "<figure> <value> (base <value>)", or "-"."""
    task = summary.get("task_eval") or {}
    if not isinstance(task, dict) or not isinstance(task.get("metrics"), dict):
        return "-"
    primary = task.get("primary")
    value = task["metrics"].get(primary)
    if not isinstance(value, (int, float)):
        return "-"
    base = (task.get("base") or {}).get(primary) if isinstance(task.get("base"), dict) else None
    return f"{str(primary).replace('_', ' ')} {fmt_score(value)}" + (
        f" (base {fmt_score(base)})" if isinstance(base, (int, float)) else "")


def evaluation_html(result: dict, worst: int = 5, elem_id: str = "runs-eval-result") -> str:
    """A task evaluation: each figure for the base and the fine-tuned model, and the worst answers."""
    tuned, base = result.get("metrics") or {}, result.get("base") or {}
    rows = []

    def shown(key, v):
        if not isinstance(v, (int, float)):
            return "-"
        return str(int(v)) if key in COUNTS else fmt_score(v)

    for key, value in tuned.items():
        if not isinstance(value, (int, float)) or key == "n":  # n is in the heading
            continue
        mark = " <b>(judged by this)</b>" if key == result.get("primary") else ""
        rows.append(f"<tr><td>{esc(key.replace('_', ' '))}{mark}</td><td>{shown(key, base.get(key))}</td>"
                    f"<td>{shown(key, value)}</td></tr>")
    scored = [e for e in result.get("examples") or [] if isinstance(e.get("score"), (int, float))]
    scored.sort(key=lambda e: e["score"])
    items = "".join(
        f"<li><b>line {e.get('line')}</b> (score {fmt_score(e['score'])}): {esc(str(e.get('prompt'))[:200])}<br>"
        f"<i>answered</i> <code>{esc(str(e.get('reply'))[:300])}</code><br>"
        f"<i>expected</i> <code>{esc(str(e.get('reference'))[:300])}</code></li>" for e in scored[:worst])
    return (f'<div id="{elem_id}"><p><b>{esc(result.get("run"))}</b>: {result.get("n")} held-out prompts, '
            f'metric {esc(result.get("metric"))} ({esc(result.get("reason"))})</p>'
            f'<table class="qs-table"><tr><th>figure</th><th>base model</th><th>fine-tuned</th></tr>{"".join(rows)}</table>'
            + (f"<p>The worst answers:</p><ol>{items}</ol>" if items else "") + "</div>")


def evaluate_named(name: str, limit, progress) -> dict:
    """Evaluate run ``name`` on (at most ``limit`` of) its held-out prompts, and the base model on the same;
    refused while a run trains (both would share the same cores or GPU)."""
    from ..taskeval import evaluate_run

    if not name:
        raise ValueError("pick a run first")
    active = get_manager().active()
    if active is not None:
        raise ValueError(f"{active.name} is training: evaluate when it has finished (both would share the same "
                         "cores or GPU)")
    progress(0.05, desc=f"evaluating {name}: loading the model")
    return evaluate_run(run_folder(name).path, limit=int(limit) if limit else None,
                        progress=lambda message: progress(0.5, desc=message))


def heldout_prompts(name: str | None, n: int = 20) -> list[tuple[str, str]]:
    """Up to ``n`` of the run's held-out questions as (question, reference answer): prompts it never
    trained on, for the Chat tab to offer. Empty when the run has none (or its data changed)."""
    from ..errors import StudioError
    from ..taskeval import eval_examples

    if not name:
        return []
    try:
        examples, _ = eval_examples(run_folder(name))
    except (StudioError, OSError):
        return []
    return [(e.question, e.reference) for e in examples if e.question][:n]


def examples_dropdown(name: str | None):
    prompts = heldout_prompts(name)
    label = (f"Try a held-out prompt ({len(prompts)} it never trained on)" if prompts
             else "Try a held-out prompt (this run kept none)" if name else "Try a held-out prompt (pick a run first)")
    return gr.Dropdown(choices=[(q[:120], i) for i, (q, _) in enumerate(prompts)], value=None, label=label,
                       interactive=bool(prompts))
