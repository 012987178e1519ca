"""Train tab: a preset, its settings (automatic ones shown and overridable), Start / Stop, and the live
run: curves, progress with ETA, the log's tail and the diagnosis findings.

The run itself belongs to the process's `RunManager` (one at a time); the page only asks it to start or
stop and reads the run folder, so a reload or a second tab shows the same live run.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import gradio as gr
import yaml
from gradio.components.plot import PlotData  # a figure already in plotly JSON (see live.py)

from ..config import AUTO, SETTINGS, TrainConfig
from ..manager import RunBusy, get_manager
from ..plan import plan_for
from ..golden import SAMPLES_FILE
from ..presets import list_presets
from ..runs import RunFolder, check_run_name
from .common import (MODEL_CHOICES, display_path, latest_run_path, notice, read_json, resolve_data_path, safe,
                     tail_lines)
from .findings import findings_html, fix_choices, run_diagnosis
from .live import empty_figure, live_runs
from .live_html import (PLOT_EVERY_CPU_S, PLOT_EVERY_S, POLL_CPU_S, POLL_SECONDS, header_html,  # noqa: F401
                        progress_html, samples_html, _trains_on_cpu)

DEFAULT_PRESET = "cpu-demo"


def form_groups(gpu_count: int) -> tuple[str, ...]:
    """The setting groups the form shows: the processes (and how they share the work) only where more than one
    GPU is detected."""
    return ("model", "lora", "schedule", "batch", "speed") + (("parallel",) if gpu_count > 1 else ())


def _gpu_count() -> int:
    from ..hardware import detect_gpus

    return len(detect_gpus())


# The settings the form shows under "advanced", in declaration order (`config.SETTINGS`); the data file and
# the run name have their own boxes at the top.
FORM_GROUPS = form_groups(_gpu_count())
FORM_SETTINGS = [s for s in SETTINGS if s.group in FORM_GROUPS and s.name != "data"]
WIDE_SETTINGS = {"model", "system_prompt"}  # a model id or a sentence needs more than a quarter of the form


def form_value(s, value):
    """A setting's value as its form component shows it (None, automatic, as its auto label; a number
    box cannot be empty, so 0 stands for automatic there)."""
    if value is None:
        if s.kind == "str" and not s.choices:
            return ""  # a free-text box: empty is automatic (its placeholder says what that means)
        return 0 if s.kind in ("int", "float") else s.auto_label
    if s.kind == "bool" and s.auto:
        return "on" if value else "off"
    if s.kind == "targets" and isinstance(value, list):
        return ",".join(value)
    return value


def _presets():
    return {p.name: p for p in list_presets()}


def preset_values(name: str) -> tuple[dict, dict, str]:
    """(form values by setting name, the preset's full settings, its description)."""
    presets = _presets()
    if name not in presets:
        raise ValueError(f"no preset named {name!r}; presets: {', '.join(presets)}")
    p = presets[name]
    settings = dict(p.settings)
    return settings_values(settings), settings, p.description


def settings_values(settings: dict) -> dict:
    """The form's values (by setting name, and "data") for a set of settings: a preset's, or a run's."""
    values = {s.name: form_value(s, settings.get(s.name, s.default)) for s in FORM_SETTINGS}
    values["data"] = display_path(settings.get("data", ""))
    return values


def load_settings(ctx, settings: dict, description: str) -> dict:
    """The Train form filled with ``settings`` (outputs by component: see `wire`'s ``preset_outputs``)."""
    values = settings_values(settings)
    field_values = [values[s.name] for s in FORM_SETTINGS]
    out = {ctx.tr_preset_settings: settings, ctx.tr_preset_desc: description, ctx.tr_data: values["data"],
           ctx.tr_resolved: resolved_yaml(settings, values["data"], "", *field_values)}
    out.update(zip(ctx.tr_fields, field_values))
    return out


def settings_from_form(preset_settings: dict, data: str, name: str, values: list) -> dict:
    """Settings: the preset's, overridden by the form (raw: `TrainConfig.from_dict` coerces and checks
    each by its declaration). Raises naming the field for a bad data path or run name."""
    settings = dict(preset_settings or {})
    for s, v in zip(FORM_SETTINGS, values):
        if s.kind in ("int", "float") and s.auto and v in (0, 0.0):
            v = None  # a number box cannot be empty: 0 means automatic
        if isinstance(v, str):
            v = v.strip()
        settings[s.name] = v
    path = resolve_data_path(data)
    preset_data = settings.get("data")
    if preset_data and Path(preset_data).resolve() != path.resolve():
        settings.pop("test_data", None)  # the preset's held-out set belongs to its own data
    settings["data"] = str(path)
    name = (name or "").strip()
    settings["name"] = check_run_name(name) if name else None
    return settings


def form_plan(preset_settings, data, name, *values):
    """(config, plan) of the form's settings on this machine: what the preview shows and Start runs."""
    cfg = TrainConfig.from_dict(settings_from_form(preset_settings, data, name, list(values)), source="settings")
    return cfg, plan_for(cfg)


def resolved_yaml(preset_settings, data, name, *values) -> str:
    """The settings as given, then the plan: every decision for this machine, with its reason."""
    try:
        cfg, plan = form_plan(preset_settings, data, name, *values)
    except Exception as e:
        from .common import friendly

        return f"# not valid yet: {friendly(e)}\n"
    out = {k: v for k, v in cfg.to_dict().items() if v is not None}
    out["data"] = display_path(out["data"])
    if out.get("test_data"):
        out["test_data"] = display_path(out["test_data"])
    text = yaml.safe_dump({"settings": out}, sort_keys=False, allow_unicode=True)
    text += "\n# the plan: what the run will do on this machine, and why\n"
    text += "\n".join(f"# {line}" for line in plan.lines()) + "\n"
    shown = {k: v for k, v in plan.to_dict().items() if k not in ("memory", "reasons")}
    mem = plan.memory or {}
    if mem.get("estimate_bytes"):
        shown["estimated_peak"] = f"{mem['estimate_bytes'] / 2**30:.2f} GiB" + (
            " (as on a GPU)" if plan.device != "cuda" else "")
    text += yaml.safe_dump({"plan": shown}, sort_keys=False, allow_unicode=True, width=100)
    return text


# ------------------------------------------------------------------ the live view

# The live view's outputs, by name: `poll` returns a dict of those that changed (`wire` maps the names to
# the components), so nothing depends on their order.
LIVE_OUTPUTS = ("header", "progress", "loss", "dynamics", "log", "findings", "fix", "fix_row", "watched", "seen",
                "timer", "notice", "next_row", "samples")


def _idle_outputs(seen) -> dict:
    if seen.get("idle"):
        return {"watched": None, "seen": seen, "timer": gr.Timer(value=POLL_SECONDS)}
    return {"header": '<div class="qs-muted" id="run-state">no run yet</div>', "progress": "",
            "loss": empty_figure("Loss", "no run yet: choose a preset and press Start"),
            "dynamics": empty_figure("Learning rate, gradient norm, speed, memory",
                                     "they appear with the first logged step", 420), "log": "",
            "findings": '<div class="qs-findings qs-muted">findings about a run appear here while it trains</div>', "fix": gr.Dropdown(choices=[], value=None), "fix_row": gr.Row(visible=False),
            "watched": None, "seen": {"idle": True}, "timer": gr.Timer(value=POLL_SECONDS)}


def _watched_path(watched) -> str | None:
    active = get_manager().active()
    path = str(active.path) if active is not None else watched
    if not path or not (Path(path) / "config.json").is_file():
        latest = latest_run_path()
        path = str(latest) if latest else None
    return path


def _figures(out: dict, seen: dict, view, state, plan_doc: dict) -> None:
    """The curves, when new points arrived and a redraw is due (less often while a CPU run trains; at once
    when the first training loss or the first evaluation arrives, so a run never looks empty for a minute)."""
    estimate_mb = view.estimate_mb(plan_doc)
    key = [view.version, estimate_mb]
    every = PLOT_EVERY_CPU_S if _trains_on_cpu(state, plan_doc) else PLOT_EVERY_S
    firsts = [len(view.loss) > 0, len(view.eval_loss) > 0]
    due = (state != "running" or time.time() - seen.get("fig_at", 0) >= every or not seen.get("fig")
           or seen.get("fig_firsts") != firsts)
    if seen.get("fig") != key and due:
        seen["fig_at"] = time.time()
        loss_json, dyn_json = view.figures(estimate_mb)
        out["loss"], out["dynamics"] = PlotData(type="plotly", plot=loss_json), PlotData(type="plotly", plot=dyn_json)
        seen["fig"], seen["fig_firsts"] = key, firsts


def _findings(out: dict, seen: dict, run: RunFolder, status: dict) -> None:
    diag = run_diagnosis(run.path)
    diag.update(status)
    key = [diag.version, status.get("state") == "running"]
    if seen.get("find") != key:
        out["findings"] = findings_html(diag.findings, running=status.get("state") == "running")
        choices = fix_choices(diag.findings)
        out["fix"] = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)
        out["fix_row"] = gr.Row(visible=bool(choices))
        seen["find"] = key


def poll(watched, seen) -> dict:
    """One tick of the live view: the outputs (by `LIVE_OUTPUTS` name) that changed."""
    seen = dict(seen or {})
    path = _watched_path(watched)
    if path is None:
        return _idle_outputs(seen)
    if seen.get("path") != path:
        seen = {"path": path}
    mgr = get_manager()
    run = RunFolder(Path(path))
    view = live_runs.view(path)
    view.refresh()
    status = mgr.status(run)
    config = read_json(run.path / "config.json", {}) or {}
    plan_doc = run.plan()
    state = status.get("state")
    out = {"watched": path, "seen": seen,
           "timer": gr.Timer(value=POLL_CPU_S if _trains_on_cpu(state, plan_doc) else POLL_SECONDS)}

    head_key = [state, status.get("phase"), status.get("error"), bool((plan_doc.get("model") or {}))]
    if seen.get("head") != head_key:
        out["header"] = header_html(run.path, status, config, plan_doc)
        # what to do next, once the run has an adapter to talk to
        out["next_row"] = gr.Row(visible=state in ("completed", "stopped") and (run.adapter / "adapter_config.json").is_file())
        if "head" in seen:  # "Started ...", "Stopping ...": answers to an action, stale once the run moves on
            out["notice"] = ""
        seen["head"] = head_key
    prog_key = [state, view.version, status.get("step"), status.get("phase"), status.get("eval_done")]
    if state == "running" or seen.get("prog") != prog_key:
        out["progress"] = progress_html(view, status, plan_doc)
        seen["prog"] = prog_key
    _figures(out, seen, view, state, plan_doc)
    try:
        log_size = os.stat(run.path / "train.log").st_size
    except OSError:
        log_size = 0
    if seen.get("log") != log_size:
        out["log"] = "\n".join(tail_lines(run.path / "train.log"))
        seen["log"] = log_size
    _findings(out, seen, run, status)
    try:
        samples_size = os.stat(run.path / SAMPLES_FILE).st_size
    except OSError:
        samples_size = 0
    if seen.get("samples") != samples_size:
        out["samples"] = samples_html(run.path / SAMPLES_FILE)
        seen["samples"] = samples_size
    return out


# ------------------------------------------------------------------ actions


def start(preset_settings, data, name, *values) -> dict:
    """Start a run of the form's settings with the plan the preview shows (`form_plan`)."""
    cfg, plan = form_plan(preset_settings, data, name, *values)
    mgr = get_manager()
    try:
        run = mgr.start(cfg, plan=plan)
    except RunBusy:
        active = mgr.active()
        who = active.name if active is not None else "another run"
        return {"notice": notice(f"A run is already training ({who}). One run at a time on one GPU: stop it, or wait "
                                 "for it to finish, then press Start again.", "warn")}
    return {"notice": notice(f"Started {run.name}: loading the model. The curves appear with the first logged step.",
                             "ok"), "watched": str(run.path), "seen": {}}


def apply_fix(watched, choice) -> dict:
    """Apply a finding's fix: a new run with the changed settings, from the run's last good checkpoint."""
    from ..diagnose import diagnose_run

    if not watched or not choice:
        raise ValueError("no fix chosen")
    kind, step, index = choice.rsplit("|", 2)
    folder = RunFolder(Path(watched))
    finding = next((f for f in diagnose_run(folder.path) if f.kind == kind and str(f.step) == step), None)
    if finding is None or not 1 <= int(index) <= len(finding.fixes):
        raise ValueError("that finding is gone (the run changed since): pick the fix again")
    fix = finding.fixes[int(index) - 1]
    mgr = get_manager()
    try:
        child = mgr.apply_fix(folder.path, fix, reason=finding.message)
    except RunBusy:
        active = mgr.active()
        return {"notice": notice(f"A run is training ({active.name if active else 'another run'}): stop it first, then "
                                 "apply the fix as a new run.", "warn")}
    return {"notice": notice(f"Started {child.name}: {fix.title} ({', '.join(f'{k} → {v}' for k, v in fix.changes.items())}), "
                             f"from {folder.name}'s last good checkpoint.", "ok"), "watched": str(child.path), "seen": {}}


def stop():
    mgr = get_manager()
    active = mgr.active()
    if active is None:
        return notice("No run is training.", "info")
    mgr.stop()
    return notice(f"Stopping {active.name} at the end of this step: it saves a checkpoint and the adapter "
                  "(resume it later from the Runs tab).", "info")


# ------------------------------------------------------------------ layout


def _component(s, value):
    """The form component of a setting, from its declaration."""
    elem_id = "f-" + s.name.replace("_", "-")
    info = s.describe()
    if s.kind == "bool" and not s.auto:
        return gr.Checkbox(label=s.label, value=bool(value), elem_id=elem_id, info=info)
    if s.kind == "bool":
        return gr.Dropdown(label=s.label, choices=[AUTO, "on", "off"], value=value, elem_id=elem_id, info=info)
    if s.kind in ("int", "float"):
        label = s.label + (" (0: automatic)" if s.auto else "")
        return gr.Number(label=label, value=value, precision=0 if s.kind == "int" else None, elem_id=elem_id, info=info)
    if s.name == "model":
        return gr.Dropdown(label=s.label, choices=MODEL_CHOICES, value=value, allow_custom_value=True,
                           elem_id=elem_id, info=info)
    if s.choices and not s.auto and not s.custom:
        return gr.Radio(label=s.label, choices=list(s.choices), value=value, elem_id=elem_id, info=info)
    if s.kind == "str" and not s.choices:
        return gr.Textbox(label=s.label, value=value, elem_id=elem_id, info=info, lines=1, max_lines=4,
                          placeholder=f"{s.auto_label}: {s.auto_help}" if s.auto else "")
    choices = ([s.auto_label] if s.auto else []) + list(s.choices)
    return gr.Dropdown(label=s.label, choices=choices, value=value, elem_id=elem_id, info=info,
                       allow_custom_value=s.custom or s.kind == "targets")


def build(ctx) -> None:
    values, settings, description = preset_values(DEFAULT_PRESET)
    gr.Markdown("Pick a preset, adjust what you like, press Start, and watch it learn. "
                "The run keeps going if you close the page.", elem_classes=["qs-tab-intro"])
    presets = _presets()
    ctx.tr_preset_settings = gr.State(settings)
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            ctx.tr_preset = gr.Dropdown(label="Preset", choices=list(presets), value=DEFAULT_PRESET, elem_id="preset")
            ctx.tr_preset_desc = gr.Markdown(description, elem_classes=["qs-muted"])
        with gr.Column(scale=2):
            ctx.tr_data = gr.Textbox(label="Data", value=values["data"], elem_id="train-data",
                                     info="from the Data tab, or a path (relative to the project or absolute)")
            ctx.tr_name = gr.Textbox(label="Run name", placeholder="automatic (date-model-data)", elem_id="run-name-input",
                                     max_lines=1)
        with gr.Column(scale=1, min_width=160):
            ctx.tr_start = gr.Button("Start", variant="primary", elem_id="start")
            ctx.tr_stop = gr.Button("Stop", variant="stop", elem_id="stop")
    ctx.tr_form = {}  # setting name -> component, one per `FORM_SETTINGS`
    with gr.Accordion("Advanced: every setting, and what 'automatic' resolves to", open=False, elem_id="advanced"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                for group in FORM_GROUPS:
                    members = [s for s in FORM_SETTINGS if s.group == group]
                    wide = [s for s in members if s.name in WIDE_SETTINGS]  # free text: half a row each
                    if wide:
                        with gr.Row():
                            for s in wide:
                                ctx.tr_form[s.name] = _component(s, values[s.name])
                    members = [s for s in members if s.name not in WIDE_SETTINGS]
                    for i in range(0, len(members), 4):
                        with gr.Row():
                            for s in members[i:i + 4]:
                                ctx.tr_form[s.name] = _component(s, values[s.name])
            with gr.Column(scale=2):
                ctx.tr_resolved = gr.Code(label="Resolved settings and the plan", language="yaml", interactive=False,
                                          elem_id="resolved", lines=18, max_lines=60)
    ctx.tr_fields = [ctx.tr_form[s.name] for s in FORM_SETTINGS]
    ctx.tr_notice = gr.HTML(elem_id="train-notice")

    gr.Markdown("### Live run")
    ctx.tr_header = gr.HTML(elem_id="run-header")
    ctx.tr_progress = gr.HTML(elem_id="run-progress")
    with gr.Row(visible=False, elem_id="run-next") as ctx.tr_next_row:
        gr.Markdown("Its adapter is saved: talk to it beside the base model, score it against the base model on "
                    "the rows it held out, or compare it with other runs.")
        ctx.tr_to_chat = gr.Button("Talk to it in Chat", elem_id="train-to-chat", variant="primary", scale=0,
                                   min_width=180)
        ctx.tr_to_eval = gr.Button("Evaluate it", elem_id="train-to-eval", scale=0, min_width=140)
        ctx.tr_to_runs = gr.Button("Compare in Runs", elem_id="train-to-runs", scale=0, min_width=160)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ctx.tr_loss = gr.Plot(label="Loss", elem_id="loss-plot", show_label=False)
        with gr.Column(scale=2):
            gr.Markdown("**Diagnosis**")
            ctx.tr_findings = gr.HTML(elem_id="findings")
            with gr.Row(equal_height=True, visible=False) as ctx.tr_fix_row:
                ctx.tr_fix = gr.Dropdown(label="Fix to apply", choices=[], value=None, scale=3, elem_id="fix-choice")
                ctx.tr_apply = gr.Button("Apply as a new run", elem_id="apply-fix", scale=2, min_width=170)
    ctx.tr_dyn = gr.Plot(label="Learning rate, gradient norm, speed, memory", elem_id="dynamics-plot", show_label=False)
    ctx.tr_samples = gr.HTML(elem_id="run-samples")
    ctx.tr_log = gr.Textbox(label="Log (latest lines)", lines=8, max_lines=14, interactive=False, elem_id="run-log")
    ctx.tr_watched = gr.State(None)
    ctx.tr_seen = gr.State({})
    ctx.tr_timer = gr.Timer(POLL_SECONDS)


def _by_component(names: dict, handler):
    """``handler``'s dict keyed by output name, as Gradio wants it: keyed by component."""
    def wrapped(*args):
        return {names[k]: v for k, v in handler(*args).items()}

    return wrapped


def wire(ctx) -> None:
    form = [ctx.tr_preset_settings, ctx.tr_data, ctx.tr_name] + ctx.tr_fields
    resolve = safe(lambda msg: f"# {msg}\n")(resolved_yaml)

    def pick_preset(name):
        _, settings, description = preset_values(name)
        return load_settings(ctx, settings, description)

    preset_outputs = [ctx.tr_preset_settings, ctx.tr_preset_desc, ctx.tr_data, ctx.tr_resolved] + ctx.tr_fields
    ctx.tr_preset.input(safe(lambda msg: {ctx.tr_resolved: f"# {msg}\n"})(pick_preset), ctx.tr_preset, preset_outputs)
    for comp in [ctx.tr_data, ctx.tr_name] + ctx.tr_fields:
        comp.change(resolve, form, ctx.tr_resolved, show_progress="hidden", trigger_mode="always_last")
    ctx.demo.load(resolve, form, ctx.tr_resolved, show_progress="hidden")

    live = dict(zip(LIVE_OUTPUTS, [ctx.tr_header, ctx.tr_progress, ctx.tr_loss, ctx.tr_dyn, ctx.tr_log, ctx.tr_findings,
                                   ctx.tr_fix, ctx.tr_fix_row, ctx.tr_watched, ctx.tr_seen, ctx.tr_timer,
                                   ctx.tr_notice, ctx.tr_next_row, ctx.tr_samples]))
    poll_safe = safe(lambda msg: {"header": notice(msg, "error")})(poll)
    ctx.tr_timer.tick(_by_component(live, poll_safe), [ctx.tr_watched, ctx.tr_seen], list(live.values()),
                      show_progress="hidden", queue=False, trigger_mode="always_last")
    ctx.demo.load(_by_component(live, poll_safe), [ctx.tr_watched, ctx.tr_seen], list(live.values()),
                  show_progress="hidden")

    acted = {"notice": ctx.tr_notice, "watched": ctx.tr_watched, "seen": ctx.tr_seen}
    on_error = safe(lambda msg: {"notice": notice(msg, "error")})
    ctx.tr_start.click(_by_component(acted, on_error(start)), form, list(acted.values()), concurrency_limit=1)
    ctx.tr_stop.click(safe(lambda msg: notice(msg, "error"))(stop), None, ctx.tr_notice)

    def to_chat(watched):
        from .chat import chat_runs

        name = Path(watched).name if watched else None
        return gr.Dropdown(choices=chat_runs(), value=name), gr.Tabs(selected="chat")

    ctx.tr_to_chat.click(to_chat, ctx.tr_watched, [ctx.ch_run, ctx.tabs])

    def to_eval(watched):
        return (*to_chat(watched), gr.Accordion(open=True), "")

    from .chat import evaluate

    ctx.tr_to_eval.click(to_eval, ctx.tr_watched, [ctx.ch_run, ctx.tabs, ctx.ch_eval_section, ctx.ch_eval_out]).then(
        safe(lambda msg: notice(msg, "error"))(evaluate), [ctx.ch_run, ctx.ch_eval_limit], ctx.ch_eval_out,
        concurrency_limit=1, concurrency_id="generate")
    def to_runs(watched):
        from .runs import runs_table

        df, names = runs_table()
        name = Path(watched).name if watched else None
        return gr.Tabs(selected="runs"), df, gr.CheckboxGroup(choices=names, value=[name] if name in names else [])

    ctx.tr_to_runs.click(to_runs, ctx.tr_watched, [ctx.tabs, ctx.rn_table, ctx.rn_select])
    ctx.tr_apply.click(_by_component(acted, on_error(apply_fix)), [ctx.tr_watched, ctx.tr_fix], list(acted.values()),
                       concurrency_limit=1)
