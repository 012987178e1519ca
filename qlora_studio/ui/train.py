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

from ..manager import RunBusy, get_manager
from ..presets import list_presets
from ..runs import RunFolder, check_run_name
from ..training import TrainConfig
from .common import (MODEL_CHOICES, display_path, esc, fmt_duration, fmt_num, latest_run_path, notice, read_json,
                     resolve_data_path, safe, tail_lines)
from .findings import diagnosis_module, findings_html, fix_choices, run_diagnosis
from .live import empty_figure, live_runs

DEFAULT_PRESET = "cpu-demo"
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
AUTO = "auto"

# The settings shown under "advanced", in order: (field, kind). Kinds: int/float may be left empty
# (automatic) where TrainConfig allows None.
FIELDS = [
    ("model", "str"), ("task", "choice"), ("quant", "choice"), ("double_quant", "bool"),
    ("rank", "int?"), ("alpha", "int?"), ("targets", "choice"), ("lora_dropout", "float"),
    ("learning_rate", "float"), ("epochs", "float"), ("max_steps", "int?"), ("warmup_ratio", "float"),
    ("batch_size", "int"), ("grad_accum", "int"), ("max_seq_len", "int"), ("eval_fraction", "float"),
    ("gradient_checkpointing", "onoff"), ("batching", "choice"), ("attention", "choice"),
    ("optimizer", "choice"), ("device", "choice"), ("seed", "int"),
]
CHOICE_AUTO = {"task": "none", "targets": AUTO, "optimizer": AUTO, "device": AUTO, "gradient_checkpointing": AUTO,
               "batching": AUTO, "attention": AUTO}
ONOFF = {"on": True, "off": False}


def _presets():
    return {p.name: p for p in list_presets()}


def preset_values(name: str) -> tuple[dict, dict, str]:
    """(field values for the form, the preset's full settings, its description)."""
    presets = _presets()
    if name not in presets:
        raise ValueError(f"no preset named {name!r}; presets: {', '.join(presets)}")
    p = presets[name]
    defaults = TrainConfig().to_dict()
    settings = dict(p.settings)
    values = {}
    for field, kind in FIELDS:
        v = settings.get(field, defaults.get(field))
        if field in CHOICE_AUTO and v is None:
            v = CHOICE_AUTO[field]
        if kind == "int?" and v is None:
            v = 0
        if kind == "onoff" and isinstance(v, bool):
            v = "on" if v else "off"
        values[field] = v
    values["data"] = display_path(settings.get("data", ""))
    return values, settings, p.description


def settings_from_form(preset_settings: dict, data: str, name: str, values: list) -> dict:
    """TrainConfig settings: the preset's, overridden by the form. Raises ValueError naming the field."""
    settings = {k: v for k, v in (preset_settings or {}).items()}
    for (field, kind), v in zip(FIELDS, values):
        if kind in ("int", "int?"):
            if kind == "int?" and v in (0, 0.0):
                v = None  # a number box cannot be empty: 0 means automatic
            if v in (None, ""):
                if kind == "int":
                    raise ValueError(f"{field}: needs a whole number")
                v = None
            else:
                if float(v) != int(float(v)):
                    raise ValueError(f"{field}: needs a whole number, got {v}")
                v = int(float(v))
        elif kind == "float":
            if v in (None, ""):
                raise ValueError(f"{field}: needs a number")
            v = float(v)
        elif kind in ("choice", "onoff") and v == CHOICE_AUTO.get(field):
            v = None
        elif kind == "onoff":
            if v not in ONOFF:
                raise ValueError(f"{field}: {v!r} is not auto, on or off")
            v = ONOFF[v]
        elif kind == "str":
            v = (v or "").strip()
        settings[field] = v
    path = resolve_data_path(data)
    preset_data = settings.get("data")
    if preset_data and Path(preset_data).resolve() != path.resolve():
        settings.pop("test_data", None)  # the preset's held-out set belongs to its own data
    settings["data"] = str(path)
    name = (name or "").strip()
    settings["name"] = check_run_name(name) if name else None
    return settings


def resolved_yaml(preset_settings, data, name, *values) -> str:
    """The settings the run will use, with what "automatic" resolves to on this machine."""
    try:
        settings = settings_from_form(preset_settings, data, name, list(values))
        cfg = TrainConfig.from_dict(settings, source="settings")
    except Exception as e:
        from .common import friendly

        return f"# not valid yet: {friendly(e)}\n"
    out = {k: v for k, v in cfg.to_dict().items() if v is not None}
    out["data"] = display_path(out["data"])
    if out.get("test_data"):
        out["test_data"] = display_path(out["test_data"])
    auto = {}
    try:
        from ..training import auto_lora, device_plan

        plan = device_plan(cfg)
        auto["device"] = plan.device
        auto["compute_dtype"] = plan.compute_dtype
        auto["optimizer"] = plan.optimizer
        auto["device_reason"] = plan.reason
    except Exception as e:
        from .common import friendly

        auto["device"] = f"cannot tell: {friendly(e)}"
        plan = None
    try:
        from ..estimator import estimate
        from .common import architecture_for

        arch = architecture_for(cfg.model)
        names = sorted({layer.name for layer in arch.linear_layers()})
        lora = auto_lora(names, arch.total_params, cfg.task, cfg)
        auto["lora"] = {"rank": lora["rank"], "alpha": lora["alpha"], "targets": lora["targets"]}
        if lora["why"]:
            auto["lora"]["why"] = lora["why"]
        from ..training import speed_plan

        speed = speed_plan(cfg, plan, arch, lora) if plan else None
        if speed:
            auto["attention"] = speed.attention
            auto["gradient_checkpointing"] = speed.why if speed.why.startswith(("on", "off")) else (
                "on" if speed.gradient_checkpointing else "off")
        if not cfg.batching:
            auto["batching"] = ("packed (no padding) where the model's attention keeps examples apart, checked when "
                                "it loads; otherwise padded and grouped by length")
        targets = "attention" if set(lora["targets"]) <= _attention(arch) else "all"
        optimizer = cfg.optimizer if cfg.optimizer in ("paged_adamw_8bit", "adamw_8bit", "adamw_torch") else "paged_adamw_8bit"
        est = estimate(arch, method="qlora" if cfg.quant != "none" else "lora",
                       quant=None if cfg.quant == "none" else cfg.quant, double_quant=cfg.double_quant,
                       rank=lora["rank"], targets=targets, batch=cfg.batch_size, seq=cfg.max_seq_len,
                       # a GPU's peak: with checkpointing unless it was turned off (the CPU's choice is not a GPU's)
                       grad_checkpointing=(speed.gradient_checkpointing if speed and plan.device == "cuda"
                                           else cfg.gradient_checkpointing is not False),
                       optimizer=optimizer)
        auto["estimated_gpu_peak"] = f"{est.total_bytes / 2**30:.2f} GiB" + ("" if plan and plan.device == "cuda" else " (on a GPU)")
    except Exception as e:
        from .common import friendly

        auto["lora"] = f"chosen when the model loads ({friendly(e)})"
    text = yaml.safe_dump({"settings": out}, sort_keys=False, allow_unicode=True)
    text += "\n# automatic choices, resolved on this machine\n"
    text += yaml.safe_dump({"automatic": auto}, sort_keys=False, allow_unicode=True, width=100)
    return text


def _attention(arch) -> set[str]:
    return {layer.name for layer in arch.linear_layers() if layer.group == "attention"}


# ------------------------------------------------------------------ the live view

STATE_CLASS = {"running": "run", "completed": "ok", "stopped": "warn", "failed": "error", "interrupted": "warn"}


def header_html(path: Path, status: dict, config: dict) -> str:
    state = status.get("state", "?")
    phase = status.get("phase")
    bits = [f'<span class="qs-badge qs-state-{STATE_CLASS.get(state, "info")}" id="run-state">{esc(state)}</span>',
            f'<b id="run-name">{esc(path.name)}</b>']
    if state == "running" and phase and phase != "training":
        bits.append(f'<span class="qs-muted">{esc(phase)} …</span>')
    desc = [f"model {esc(config.get('model', '?'))}", f"data {esc(display_path(config.get('data', '?')))}"]
    lora = config.get("lora")
    if lora:
        desc.append(f"LoRA r={lora.get('rank')} on {len(lora.get('targets', []))} module kinds")
    if config.get("trainable_share") is not None:
        desc.append(f"{100 * config['trainable_share']:.2f}% of the weights train")
    plan = config.get("device_plan") or {}
    if plan.get("device"):
        desc.append(f"{plan['device']} · {plan.get('compute_dtype', '')}")
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


def _trains_on_cpu(state, config: dict) -> bool:
    """A run training on the CPU, where the page's work competes with training for the cores."""
    return state == "running" and (config.get("device_plan") or {}).get("device") == "cpu"


def progress_html(view, status: dict, config: dict) -> str:
    state = status.get("state")
    total = status.get("total_steps") or status.get("max_steps") or config.get("total_steps")
    last = view.last_train or {}
    step = last.get("step") or 0
    if state != "running":
        step = max(step, status.get("step") or 0)
    started = status.get("started_at") or status.get("created_at")
    end = status.get("finished_at") if state != "running" else time.time()
    elapsed = (end - started) if (started and end) else None
    if state == "running" and not last and status.get("phase") != "training":
        return ('<div class="qs-progress"><div class="qs-bar qs-bar-busy"><div></div></div>'
                f'<div class="qs-muted">{esc(status.get("phase") or "starting")} … elapsed {fmt_duration(elapsed)}</div></div>')
    pct = min(100.0, 100.0 * step / total) if total else 0.0
    eta = "-"
    if state == "running" and total:
        sps = view.seconds_per_step()
        if sps:
            eta = fmt_duration(sps * max(0, total - step))
    elif state == "completed":
        eta = "done"
    parts = [f'step <b id="run-step">{step}</b> / {total or "?"}', f"epoch {fmt_num(last.get('epoch'), 2)}",
             f"elapsed {fmt_duration(elapsed)}", f"ETA {eta}"]
    if last.get("loss") is not None:
        parts.append(f"loss {fmt_num(last['loss'])}")
    if view.last_eval and view.last_eval.get("eval_loss") is not None:
        parts.append(f"eval loss {fmt_num(view.last_eval['eval_loss'])}")
    pace = ""
    if _trains_on_cpu(state, config):
        pace = (f'<div class="qs-muted" id="run-pace">Training on the CPU: this page refreshes every {POLL_CPU_S:.0f} s '
                f'and redraws the curves every {PLOT_EVERY_CPU_S:.0f} s, to leave the cores to training.</div>')
    return (f'<div class="qs-progress"><div class="qs-bar"><div style="width:{pct:.1f}%"></div></div>'
            f'<div>{" · ".join(parts)}</div>{pace}</div>')


def _idle_outputs(seen):
    if seen.get("idle"):
        return (gr.skip(),) * 8 + (None, seen, gr.Timer(value=POLL_SECONDS))
    waiting = empty_figure("Loss", "no run yet: choose a preset and press Start")
    return ('<div class="qs-muted" id="run-state">no run yet</div>', "", waiting,
            empty_figure("Learning rate, gradient norm, speed, memory", "", 420), "",
            findings_html(None, diagnosis_module() is not None), gr.Dropdown(choices=[], value=None), gr.Row(visible=False),
            None, {"idle": True}, gr.Timer(value=POLL_SECONDS))


def poll(watched, seen):
    """One tick of the live view; outputs that did not change are skipped."""
    seen = dict(seen or {})
    mgr = get_manager()
    active = mgr.active()
    path = str(active.path) if active is not None else watched
    if not path or not (Path(path) / "config.json").is_file():
        latest = latest_run_path()
        path = str(latest) if latest else None
    if path is None:
        return _idle_outputs(seen)
    if seen.get("path") != path:
        seen = {"path": path}
    run = RunFolder(Path(path))
    view = live_runs.view(path)
    view.refresh()
    live = mgr.live_pids() if active is not None and str(active.path) == path else set()
    status = run.status(live)
    config = read_json(run.path / "config.json", {}) or {}
    state = status.get("state")

    head_key = [state, status.get("phase"), status.get("error"), bool(config.get("lora"))]
    header = gr.skip()
    if seen.get("head") != head_key:
        header = header_html(run.path, status, config)
        seen["head"] = head_key

    progress = gr.skip()
    prog_key = [state, view.version, status.get("step"), status.get("phase")]
    if state == "running" or seen.get("prog") != prog_key:
        progress = progress_html(view, status, config)
        seen["prog"] = prog_key

    loss_fig = dyn_fig = gr.skip()
    fig_key = [view.version, view.estimate_mb, bool(config.get("lora"))]
    on_cpu = _trains_on_cpu(state, config)
    pace = gr.Timer(value=POLL_CPU_S if on_cpu else POLL_SECONDS)  # the page's next tick
    every = PLOT_EVERY_CPU_S if on_cpu else PLOT_EVERY_S
    due = state != "running" or time.time() - seen.get("fig_at", 0) >= every or not seen.get("fig")
    if seen.get("fig") != fig_key and due:
        seen["fig_at"] = time.time()
        loss_json, dyn_json = view.figures(config)
        loss_fig, dyn_fig = PlotData(type="plotly", plot=loss_json), PlotData(type="plotly", plot=dyn_json)
        seen["fig"] = [view.version, view.estimate_mb, bool(config.get("lora"))]

    log = gr.skip()
    try:
        log_size = os.stat(run.path / "train.log").st_size
    except OSError:
        log_size = 0
    if seen.get("log") != log_size:
        log = "\n".join(tail_lines(run.path / "train.log"))
        seen["log"] = log_size

    findings = fixes = fix_row = gr.skip()
    diag = run_diagnosis(run.path)
    if diag is None:
        if seen.get("find") != "n/a":
            findings = findings_html(None, available=False)
            fixes, fix_row = gr.Dropdown(choices=[], value=None), gr.Row(visible=False)
            seen["find"] = "n/a"
    else:
        diag.update(status)
        find_key = [diag.version, state == "running"]
        if seen.get("find") != find_key:
            findings = findings_html(diag.findings, running=state == "running")
            choices = fix_choices(diag.findings)
            fixes = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None)
            fix_row = gr.Row(visible=bool(choices))
            seen["find"] = find_key
    return header, progress, loss_fig, dyn_fig, log, findings, fixes, fix_row, path, seen, pace


def _poll_error(msg):
    return (notice(msg, "error"),) + (gr.skip(),) * 10


# ------------------------------------------------------------------ actions


def start(preset_settings, data, name, *values):
    settings = settings_from_form(preset_settings, data, name, list(values))
    cfg = TrainConfig.from_dict(settings, source="settings")
    mgr = get_manager()
    try:
        run = mgr.start(cfg)
    except RunBusy:
        active = mgr.active()
        who = active.name if active is not None else "another run"
        return (notice(f"A run is already training ({who}). One run at a time on one GPU: stop it, or wait "
                       "for it to finish, then press Start again.", "warn"), gr.skip(), gr.skip())
    return (notice(f"Started {run.name}: loading the model. The curves appear with the first logged step.", "ok"),
            str(run.path), {})


def apply_fix(watched, choice):
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
        return (notice(f"A run is training ({active.name if active else 'another run'}): stop it first, then apply "
                       "the fix as a new run.", "warn"), gr.skip(), gr.skip())
    return (notice(f"Started {child.name}: {fix.title} ({', '.join(f'{k} → {v}' for k, v in fix.changes.items())}), "
                   f"from {folder.name}'s last good checkpoint.", "ok"), str(child.path), {})


def stop():
    mgr = get_manager()
    active = mgr.active()
    if active is None:
        return notice("No run is training.", "info")
    mgr.stop()
    return notice(f"Stopping {active.name} at the end of this step: it saves a checkpoint and the adapter "
                  "(resume it later from the Runs tab).", "info")


# ------------------------------------------------------------------ layout


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
    with gr.Accordion("Advanced: every setting, and what 'automatic' resolves to", open=False, elem_id="advanced"):
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                with gr.Row():
                    ctx.tr_model = gr.Dropdown(label="model", choices=MODEL_CHOICES, value=values["model"],
                                               allow_custom_value=True, elem_id="f-model",
                                               info="embedded, a Hub id, a model folder or a .gguf file")
                    ctx.tr_task = gr.Dropdown(label="task", choices=["none", "sql"], value=values["task"] or "none",
                                              allow_custom_value=True, elem_id="f-task")
                    ctx.tr_quant = gr.Radio(label="quant", choices=["nf4", "fp4", "none"], value=values["quant"],
                                            elem_id="f-quant")
                    ctx.tr_dq = gr.Checkbox(label="double quant", value=values["double_quant"])
                with gr.Row():
                    ctx.tr_rank = gr.Number(label="rank (0: auto)", value=values["rank"], precision=0, elem_id="f-rank")
                    ctx.tr_alpha = gr.Number(label="alpha (0: 2 × rank)", value=values["alpha"], precision=0)
                    ctx.tr_targets = gr.Dropdown(label="targets", choices=[AUTO, "attention", "all"],
                                                 value=values["targets"])
                    ctx.tr_dropout = gr.Number(label="lora dropout", value=values["lora_dropout"])
                with gr.Row():
                    ctx.tr_lr = gr.Number(label="learning rate", value=values["learning_rate"], elem_id="f-lr")
                    ctx.tr_epochs = gr.Number(label="epochs", value=values["epochs"])
                    ctx.tr_max_steps = gr.Number(label="max steps (0: by epochs)", value=values["max_steps"],
                                                 precision=0, elem_id="f-max-steps")
                    ctx.tr_warmup = gr.Number(label="warmup ratio", value=values["warmup_ratio"])
                with gr.Row():
                    ctx.tr_batch = gr.Number(label="batch size", value=values["batch_size"], precision=0, elem_id="f-batch")
                    ctx.tr_accum = gr.Number(label="grad accumulation", value=values["grad_accum"], precision=0)
                    ctx.tr_seq = gr.Number(label="max sequence length", value=values["max_seq_len"], precision=0,
                                           elem_id="f-seq")
                    ctx.tr_eval = gr.Number(label="eval fraction", value=values["eval_fraction"], elem_id="f-eval")
                with gr.Row():
                    ctx.tr_ckpt = gr.Dropdown(label="gradient checkpointing", choices=[AUTO, "on", "off"],
                                              value=values["gradient_checkpointing"], elem_id="f-ckpt")
                    ctx.tr_batching = gr.Dropdown(label="batching", choices=[AUTO, "packed", "grouped", "padded"],
                                                  value=values["batching"], elem_id="f-batching")
                    ctx.tr_attention = gr.Dropdown(label="attention", choices=[AUTO, "sdpa", "eager"],
                                                   value=values["attention"], elem_id="f-attention")
                with gr.Row():
                    ctx.tr_optim = gr.Dropdown(label="optimizer", choices=[AUTO, "paged_adamw_8bit", "adamw_8bit", "adamw_torch"],
                                               value=values["optimizer"])
                    ctx.tr_device = gr.Dropdown(label="device", choices=[AUTO, "cuda", "cpu"], value=values["device"])
                    ctx.tr_seed = gr.Number(label="seed", value=values["seed"], precision=0)
            with gr.Column(scale=2):
                ctx.tr_resolved = gr.Code(label="Resolved settings", language="yaml", interactive=False,
                                          elem_id="resolved", lines=18, max_lines=44)
    ctx.tr_fields = [ctx.tr_model, ctx.tr_task, ctx.tr_quant, ctx.tr_dq, ctx.tr_rank, ctx.tr_alpha, ctx.tr_targets,
                     ctx.tr_dropout, ctx.tr_lr, ctx.tr_epochs, ctx.tr_max_steps, ctx.tr_warmup, ctx.tr_batch, ctx.tr_accum,
                     ctx.tr_seq, ctx.tr_eval, ctx.tr_ckpt, ctx.tr_batching, ctx.tr_attention, ctx.tr_optim, ctx.tr_device, ctx.tr_seed]
    assert len(ctx.tr_fields) == len(FIELDS)
    ctx.tr_notice = gr.HTML(elem_id="train-notice")

    gr.Markdown("### Live run")
    ctx.tr_header = gr.HTML(elem_id="run-header")
    ctx.tr_progress = gr.HTML(elem_id="run-progress")
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
    ctx.tr_log = gr.Textbox(label="Log (latest lines)", lines=8, max_lines=14, interactive=False, elem_id="run-log")
    ctx.tr_watched = gr.State(None)
    ctx.tr_seen = gr.State({})
    ctx.tr_timer = gr.Timer(POLL_SECONDS)


def wire(ctx) -> None:
    form = [ctx.tr_preset_settings, ctx.tr_data, ctx.tr_name] + ctx.tr_fields
    resolve = safe(lambda msg: f"# {msg}\n")(resolved_yaml)

    def pick_preset(name):
        values, settings, description = preset_values(name)
        field_values = [values[f] for f, _ in FIELDS]
        return [settings, description, values["data"]] + field_values + [resolved_yaml(settings, values["data"], "", *field_values)]

    preset_outputs = [ctx.tr_preset_settings, ctx.tr_preset_desc, ctx.tr_data] + ctx.tr_fields + [ctx.tr_resolved]
    ctx.tr_preset.input(safe(lambda msg: [gr.skip()] * (len(preset_outputs) - 1) + [f"# {msg}\n"])(pick_preset),
                        ctx.tr_preset, preset_outputs)
    for comp in [ctx.tr_data, ctx.tr_name] + ctx.tr_fields:
        comp.change(resolve, form, ctx.tr_resolved, show_progress="hidden", trigger_mode="always_last")
    ctx.demo.load(resolve, form, ctx.tr_resolved, show_progress="hidden")

    live_outputs = [ctx.tr_header, ctx.tr_progress, ctx.tr_loss, ctx.tr_dyn, ctx.tr_log, ctx.tr_findings,
                    ctx.tr_fix, ctx.tr_fix_row, ctx.tr_watched, ctx.tr_seen, ctx.tr_timer]
    poll_safe = safe(_poll_error)(poll)
    ctx.tr_timer.tick(poll_safe, [ctx.tr_watched, ctx.tr_seen], live_outputs, show_progress="hidden",
                      queue=False, trigger_mode="always_last")
    ctx.demo.load(poll_safe, [ctx.tr_watched, ctx.tr_seen], live_outputs, show_progress="hidden")

    start_safe = safe(lambda msg: (notice(msg, "error"), gr.skip(), gr.skip()))(start)
    ctx.tr_start.click(start_safe, form, [ctx.tr_notice, ctx.tr_watched, ctx.tr_seen], concurrency_limit=1)
    ctx.tr_stop.click(safe(lambda msg: notice(msg, "error"))(stop), None, ctx.tr_notice)
    ctx.tr_apply.click(safe(lambda msg: (notice(msg, "error"), gr.skip(), gr.skip()))(apply_fix), [ctx.tr_watched, ctx.tr_fix],
                       [ctx.tr_notice, ctx.tr_watched, ctx.tr_seen], concurrency_limit=1)
