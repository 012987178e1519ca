"""Runs tab: every run folder; overlay the curves of several and diff their settings; resume a stopped
or interrupted run; delete with confirmation."""

from __future__ import annotations

import os
import time
from pathlib import Path

import gradio as gr

from ..manager import RunBusy, get_manager
from ..ownership import describe, run_owner
from ..runs import RunError
from .common import (display_path, esc, fmt_duration, fmt_num, notice, plot_template, read_json, run_folder, safe,
                     typed_array)
from .evaluation import evaluate_named, evaluation_html, task_metric
from .live import empty_figure, live_runs, step_tick
from .train import load_settings

PALETTE = ["#4f46e5", "#f97316", "#10b981", "#ef4444", "#0ea5e9", "#8b5cf6", "#eab308", "#14b8a6"]
# Keys of config.json that are bookkeeping rather than settings (left out of the diff).
NOT_SETTINGS = {"data_sha256"}  # what ran (the plan) is in plan.json, not config.json


def evaluate(selected, limit, progress=gr.Progress()):
    """Evaluate the selected run on (at most ``limit`` of) its held-out prompts, and the base model on the same."""
    name = _one(selected)
    result = evaluate_named(name, limit, progress)
    df, names = runs_table()
    return evaluation_html(result), df, gr.CheckboxGroup(choices=names, value=[name])


def runs_table():
    import pandas as pd

    rows = []
    for r in get_manager().runs():
        summary = read_json(Path(r.path) / "summary.json", {}) if r.state != "damaged" else {}
        summary = summary if isinstance(summary, dict) else {}
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(r.created_at)) if r.created_at else "-"
        # a damaged run shows what is damaged ("damaged: status.json: ..."), so it can be repaired or deleted
        state = (r.error if r.state == "damaged" and r.error else r.state) + (" (resumable)" if r.resumable else "")
        owner = run_owner(Path(r.path)) if r.state == "running" else None
        if owner and owner.get("pid") != os.getpid():  # watch it here; resume and delete are refused
            state = f"training in another process ({describe(owner)})"
        rows.append([r.name, state, r.model, display_path(r.data).rsplit("/", 1)[-1], fmt_num(r.final_loss),
                     fmt_num(r.eval_loss), task_metric(summary), fmt_duration(r.runtime_s), started])
    df = pd.DataFrame(rows, columns=["run", "state", "model", "data", "final loss", "eval loss", "task eval",
                                     "train time", "started"])
    return df, [r[0] for r in rows]


def refresh(selected):
    df, names = runs_table()
    keep = [n for n in (selected or []) if n in names]
    return df, gr.CheckboxGroup(choices=names, value=keep)


def overlay(selected):
    """Loss curves of the selected runs on one plot (eval dotted), and the settings that differ."""
    import pandas as pd
    import plotly.graph_objects as go

    selected = list(selected or [])
    if not selected:
        return (empty_figure("Compare runs", "select runs above to overlay their curves"),
                gr.Dataframe(value=pd.DataFrame({"setting": ["select one run to see its settings, several to see what "
                                                             "differs"]}), label="Settings"))
    fig = go.Figure()
    configs = {}
    last = 1
    for i, name in enumerate(selected):
        folder = run_folder(name)
        try:
            configs[name] = folder.config()
        except RunError as e:  # a damaged config.json: its curves are still shown, the reason in the table
            configs[name] = {"config.json": e.why}
        view = live_runs.view(folder.path)
        view.refresh()
        color = PALETTE[i % len(PALETTE)]
        xs, ys = view.loss.points()
        last = max([last] + [x for x in xs if isinstance(x, (int, float))])
        fig.add_trace(go.Scatter(x=typed_array(xs), y=typed_array(ys), mode="lines", name=f"{name} train",
                                 line=dict(color=color, width=2)))
        if len(view.eval_loss):
            xs, ys = view.eval_loss.points()
            fig.add_trace(go.Scatter(x=typed_array(xs), y=typed_array(ys), mode="lines+markers", name=f"{name} eval",
                                     line=dict(color=color, dash="dot")))
    fig.update_layout(title="Loss", height=360, template=plot_template(), xaxis_title="step",
                      margin=dict(l=56, r=16, t=48, b=40), legend=dict(orientation="h", y=-0.25))
    fig.update_xaxes(rangemode="tozero", dtick=step_tick(last), tick0=0)  # whole steps
    keys = sorted({k for c in configs.values() for k in c if k not in NOT_SETTINGS})
    rows = []
    for k in keys:
        vals = [configs[n].get(k) for n in selected]
        if len(selected) == 1 or any(v != vals[0] for v in vals):
            rows.append([k] + [_show(k, v) for v in vals])
    diff = pd.DataFrame(rows, columns=["setting"] + selected)
    label = "Settings" if len(selected) == 1 else f"Settings that differ ({len(rows)} of {len(keys)})"
    return fig, gr.Dataframe(value=diff, label=label)


def _show(key: str, value) -> str:
    if key in ("data", "test_data") and value:
        return display_path(value)
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items() if k != "why")
    return "auto" if value is None else str(value)


def _one(selected) -> str:
    selected = list(selected or [])
    if len(selected) != 1:
        raise ValueError(f"select exactly one run (selected: {len(selected)})")
    return selected[0]


def resume(selected):
    name = _one(selected)
    folder = run_folder(name)
    try:
        get_manager().resume(folder.path)
    except RunBusy as e:
        return notice(str(e), "warn"), gr.skip(), gr.skip(), gr.skip()
    msg = notice(f"Resuming {name} from its last checkpoint.", "ok")
    return msg, str(folder.path), gr.Tabs(selected="train"), msg


def open_in_chat(selected):
    """The selected run in the Chat tab (it needs an adapter: a completed or stopped run)."""
    from .chat import chat_runs

    name = _one(selected)
    names = chat_runs()
    if name not in names:
        raise ValueError(f"{name} has no adapter to talk to yet (it saves one when it completes or is stopped)")
    return gr.Dropdown(choices=names, value=name), gr.Tabs(selected="chat"), ""


def settings_of(selected) -> tuple[dict, str]:
    """The selected run's settings as it was given them (config.json), for the Train form."""
    from ..config import TrainConfig

    name = _one(selected)
    config = run_folder(name).config()
    known = TrainConfig.known()
    return ({k: v for k, v in config.items() if k in known},
            f"The settings of run {name} (change what you like, then Start: a new run).")


def ask_delete(selected):
    selected = list(selected or [])
    if not selected:
        raise ValueError("select the runs to delete")
    active = get_manager().active()
    if active is not None and active.name in selected:
        raise ValueError(f"{active.name} is training: stop it before deleting it")
    names = ", ".join(selected)
    return (gr.Row(visible=True),
            f"**Delete {esc(names)} and all their files (checkpoints, adapter, merged model)?** This cannot be undone.", "")


def do_delete(selected):
    deleted = []
    active = get_manager().active()
    for name in list(selected or []):
        folder = run_folder(name)
        if active is not None and active.path == folder.path:
            raise ValueError(f"{name} is training: stop it before deleting it")
        live_runs.forget(folder.path)
        folder.delete()
        deleted.append(name)
    df, names = runs_table()
    return (notice(f"Deleted {', '.join(deleted)}.", "ok"), gr.Row(visible=False), df,
            gr.CheckboxGroup(choices=names, value=[]))


def build(ctx) -> None:
    gr.Markdown("Every run on this machine: compare, resume, or clean up.", elem_classes=["qs-tab-intro"])
    with gr.Row():
        ctx.rn_refresh = gr.Button("Refresh", elem_id="runs-refresh", scale=0, min_width=120)
    ctx.rn_table = gr.Dataframe(label="Runs", elem_id="runs-table", interactive=False, wrap=True, max_height=320,
                                column_widths=["13%", "15%", "9%", "10%", "7%", "7%", "18%", "8%", "13%"])
    ctx.rn_select = gr.CheckboxGroup(label="Select runs (to compare, resume or delete)", choices=[], elem_id="runs-select")
    with gr.Row():
        ctx.rn_resume = gr.Button("Resume selected", elem_id="runs-resume")
        ctx.rn_chat = gr.Button("Open in Chat", elem_id="runs-chat")
        ctx.rn_load = gr.Button("Load its settings into Train", elem_id="runs-load")
        ctx.rn_delete = gr.Button("Delete selected …", variant="stop", elem_id="runs-delete")
    with gr.Row(equal_height=False):
        ctx.rn_eval = gr.Button("Evaluate on its held-out data", elem_id="runs-evaluate", scale=1)
        ctx.rn_eval_limit = gr.Number(label="at most this many prompts", info="each is answered twice: by the base and "
                                      "the fine-tuned model", value=50, precision=0, minimum=1, elem_id="runs-eval-limit",
                                      scale=1)
        gr.HTML(scale=2)
    with gr.Row(visible=False, elem_id="runs-confirm") as confirm:
        ctx.rn_confirm_text = gr.Markdown()
        ctx.rn_confirm = gr.Button("Yes, delete", variant="stop", elem_id="runs-confirm-delete", scale=0, min_width=140)
        ctx.rn_cancel = gr.Button("Cancel", elem_id="runs-cancel", scale=0, min_width=100)
    ctx.rn_confirm_row = confirm
    ctx.rn_notice = gr.HTML(elem_id="runs-notice")
    ctx.rn_eval_out = gr.HTML(elem_id="runs-eval")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ctx.rn_plot = gr.Plot(empty_figure("Compare runs", "select runs above to overlay their curves"),
                                  elem_id="runs-compare", show_label=False)
        with gr.Column(scale=2):
            ctx.rn_diff = gr.Dataframe(value=[["select one run to see its settings, several to see what differs"]],
                                       headers=["setting"], label="Settings", elem_id="runs-diff", interactive=False,
                                       wrap=True)


def wire(ctx) -> None:
    refresh_safe = safe(lambda msg: (gr.skip(), gr.skip()))(refresh)
    ctx.tab_runs.select(refresh_safe, ctx.rn_select, [ctx.rn_table, ctx.rn_select])
    ctx.rn_refresh.click(refresh_safe, ctx.rn_select, [ctx.rn_table, ctx.rn_select])
    ctx.rn_select.change(safe(lambda msg: (empty_figure("Compare runs", msg), gr.skip()))(overlay), ctx.rn_select,
                         [ctx.rn_plot, ctx.rn_diff], trigger_mode="always_last")
    ctx.rn_resume.click(safe(lambda msg: (notice(msg, "error"), gr.skip(), gr.skip(), gr.skip()))(resume), ctx.rn_select,
                        [ctx.rn_notice, ctx.tr_watched, ctx.tabs, ctx.tr_notice])
    ctx.rn_eval.click(safe(lambda msg: (notice(msg, "error"), gr.skip(), gr.skip()))(evaluate), [ctx.rn_select, ctx.rn_eval_limit],
                      [ctx.rn_eval_out, ctx.rn_table, ctx.rn_select], concurrency_limit=1, concurrency_id="generate")
    ctx.rn_chat.click(safe(lambda msg: (gr.skip(), gr.skip(), notice(msg, "error")))(open_in_chat), ctx.rn_select,
                      [ctx.ch_run, ctx.tabs, ctx.rn_notice])

    def load(selected):
        settings, description = settings_of(selected)
        return {**load_settings(ctx, settings, description), ctx.tabs: gr.Tabs(selected="train"), ctx.rn_notice: ""}

    form = [ctx.tr_preset_settings, ctx.tr_preset_desc, ctx.tr_data, ctx.tr_resolved] + ctx.tr_fields
    ctx.rn_load.click(safe(lambda msg: {ctx.rn_notice: notice(msg, "error")})(load), ctx.rn_select,
                      form + [ctx.tabs, ctx.rn_notice])
    ctx.rn_delete.click(safe(lambda msg: (gr.Row(visible=False), gr.skip(), notice(msg, "error")))(ask_delete),
                        ctx.rn_select, [ctx.rn_confirm_row, ctx.rn_confirm_text, ctx.rn_notice])
    ctx.rn_cancel.click(lambda: gr.Row(visible=False), None, ctx.rn_confirm_row, queue=False)
    ctx.rn_confirm.click(safe(lambda msg: (notice(msg, "error"), gr.Row(visible=False), gr.skip(), gr.skip()))(do_delete),
                         ctx.rn_select, [ctx.rn_notice, ctx.rn_confirm_row, ctx.rn_table, ctx.rn_select])
