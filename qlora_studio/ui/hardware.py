"""Hardware & plan tab: the detected GPU (or the CPU notice), the recommendation, a what-if panel."""

from __future__ import annotations

import time

import gradio as gr

from ..catalog import CATALOG, catalog_names
from ..estimator import BREAKDOWN_KEYS, HEADROOM, estimate, fits
from ..recommend import recommend
from ..hardware import CPU_STATEMENT, GPU_CATALOG, describe_machine
from ..models import EMBEDDED_ARCH
from ..plan import precision_for
from .common import esc, gib, notice, plot_template, safe

DEFAULT_PLAN_CARD = "RTX 3060 12 GB"  # planned for when this machine has no GPU
SEQ_CHOICES = [128, 256, 512, 1024, 2048, 4096]
COLORS = {"weights": "#4f46e5", "adapters": "#10b981", "optimizer": "#f59e0b", "gradients": "#ef4444",
          "activations": "#0ea5e9", "logits": "#8b5cf6", "overhead": "#9ca3af"}

_machine_cache: tuple[float, object] | None = None


def machine():
    """describe_machine(), cached for a few seconds (free memory changes, but not every click)."""
    global _machine_cache
    if _machine_cache is None or time.time() - _machine_cache[0] > 5:
        _machine_cache = (time.time(), describe_machine())
    return _machine_cache[1]


def _detected_label(g) -> str:
    return f"GPU {g.index}: {g.name} {g.total_bytes / 2**30:.0f} GB (this machine)"


def card_choices() -> list[str]:
    return [_detected_label(g) for g in machine().gpus] + [g.label for g in GPU_CATALOG]


def card_for(label: str):
    """The GpuInfo (detected) or GpuSpec (catalog) a dropdown label names."""
    for g in machine().gpus:
        if label == _detected_label(g):
            return g
    for g in GPU_CATALOG:
        if g.label == label:
            return g
    raise ValueError(f"unknown card {label!r}")


def _card_bytes(card) -> tuple[int, int, str]:
    """(total, usable, name) of a card."""
    total = getattr(card, "total_bytes", None) or card.vram_bytes
    usable = min(total, getattr(card, "free_bytes", total) or total)
    name = getattr(card, "label", None) or card.name
    return total, usable, name


def _compute_dtype(card) -> str:
    return precision_for("cuda", card.compute_capability)


def machine_html() -> str:
    m = machine()
    if not m.gpus:
        reason = m.no_gpu_reason or "NVML reports no device"
        cpu = f"CPU: {m.cpu_cores} cores"
        if m.ram_total_bytes:
            cpu += f", {gib(m.ram_total_bytes)} RAM ({gib(m.ram_available_bytes)} available)"
        return (f'<div class="qs-notice qs-warn qs-cpu-notice"><b>{esc(CPU_STATEMENT)}.</b><br>'
                f'<span class="qs-muted">Why: {esc(reason)}.</span><br>{esc(cpu)}. The embedded model '
                "(SmolLM2-135M) trains here in minutes; for bigger models, plan for a card below.</div>")
    rows = []
    for g in m.gpus:
        other = gib(g.other_processes_bytes) if g.other_processes_bytes is not None else "not reported"
        cc = ".".join(map(str, g.compute_capability)) if g.compute_capability else "?"
        rows.append(
            f"<tr><td><b>{esc(g.name)}</b></td><td>{gib(g.total_bytes)}</td><td>{gib(g.free_bytes)}</td>"
            f"<td>{gib(g.used_bytes)}</td><td>{esc(other)}</td><td>{esc(cc)} ({'bf16' if g.bf16 else g.compute_dtype})</td></tr>")
    return ('<table class="qs-table"><tr><th>GPU</th><th>total</th><th>free</th><th>in use</th>'
            "<th>held by other processes</th><th>compute capability</th></tr>" + "".join(rows) + "</table>"
            + f'<div class="qs-muted">{esc(m.statement.splitlines()[-1])}</div>')


def recommendation_md(card) -> str:
    plan = recommend(card)
    head = "**Recommendation for this GPU**" if hasattr(card, "free_bytes") else f"**If you had a {esc(_card_bytes(card)[2])}**"
    return head + "\n\n```\n" + plan.text() + "\n```", plan


def _arch(model_name: str):
    for a in CATALOG:
        if a.name == model_name:
            return a
    raise ValueError(f"unknown model {model_name!r}")


def fit_of(card_label, model_name, quant, rank, batch, seq, targets, checkpointing):
    """(estimate, total, usable, card name, verdict) of a what-if plan on a card; verdict "fits" (with the
    headroom), "tight" (fits without it) or "no"."""
    card = card_for(card_label)
    total, usable, name = _card_bytes(card)
    est = estimate(_arch(model_name), quant=quant, double_quant=True, rank=int(rank), targets=targets,
                   batch=int(batch), seq=int(seq), grad_checkpointing=bool(checkpointing),
                   compute_dtype=_compute_dtype(card))
    verdict = "fits" if fits(est.total_bytes, usable) else "tight" if fits(est.total_bytes, usable, 0.0) else "no"
    return est, total, usable, name, verdict


def memory_chart(card_label, model_name, quant, rank, batch, seq, targets, checkpointing):
    """A stacked bar of the estimated peak, item by item, against the card's memory."""
    import plotly.graph_objects as go

    est, total, usable, name, verdict = fit_of(card_label, model_name, quant, rank, batch, seq, targets, checkpointing)
    fig = go.Figure()
    for key in BREAKDOWN_KEYS:
        v = est.breakdown[key] / 2**30
        fig.add_trace(go.Bar(y=["peak"], x=[v], name=key, orientation="h", marker_color=COLORS[key],
                             hovertemplate=f"{key}: %{{x:.2f}} GiB<extra></extra>"))
    fig.add_vline(x=total / 2**30, line=dict(color="#111827", width=3))
    xmax = max(total, est.total_bytes) / 2**30 * 1.1
    # the card's label beside its line, on the side with room (a plan far over the card puts the line near 0)
    fig.add_annotation(x=total / 2**30, y=1.0, yref="paper", yanchor="bottom", showarrow=False,
                       xanchor="right" if total / 2**30 > xmax / 2 else "left",
                       text=f"{name}: {total / 2**30:.0f} GiB", font=dict(size=12, color="#111827"))
    fig.add_vline(x=usable / (1 + HEADROOM) / 2**30, line=dict(color="#6b7280", dash="dash"))
    fig.add_annotation(x=usable / (1 + HEADROOM) / 2**30, y=0.0, yref="paper", yanchor="top", xanchor="right",
                       showarrow=False, text="80% ", font=dict(size=11, color="#6b7280"))
    fig.update_layout(barmode="stack", height=290, template=plot_template(), xaxis=dict(title="GiB", range=[0, xmax]),
                      yaxis=dict(visible=False), margin=dict(l=16, r=16, t=70, b=90),
                      legend=dict(orientation="h", yanchor="top", y=-0.45, x=0),
                      title=dict(text=f"Estimated peak: {est.total_bytes / 2**30:.2f} GiB of {total / 2**30:.0f} GiB",
                                 x=0.01, xanchor="left"))
    if verdict == "fits":
        message = notice(f"Fits: {gib(est.total_bytes)} of the {gib(usable)} usable on {name}, with room to spare.", "ok")
    elif verdict == "tight":
        message = notice(f"Tight: {gib(est.total_bytes)} of {gib(usable)} leaves less than 20% headroom; "
                         "a longer example or fragmentation may run out of memory.", "warn")
    else:
        message = notice(f"Does not fit: {gib(est.total_bytes)} needed, {gib(usable)} usable on {name}. "
                         "Lower the batch or sequence length, " + ("use 4-bit weights, " if quant == "none" else "")
                         + "or pick a smaller model.", "error")
    assumptions = "\n".join(f"- {a}" for a in est.assumptions)
    return fig, message, assumptions


def recommended_controls(card_label) -> tuple[str, list]:
    """The recommendation's text for a card and the what-if controls' values that show its plan (model,
    quant, rank, batch, seq, targets, checkpointing); the embedded model at batch 1 when nothing fits."""
    text, plan = recommendation_md(card_for(card_label))
    model = plan.model or EMBEDDED_ARCH
    batch = plan.batch if plan.fits else 1
    return text, [model, plan.quant, plan.rank, batch, plan.seq, plan.targets, plan.grad_checkpointing]


def follow_html(following: bool, card_label: str) -> str:
    if following:
        return notice(f"Showing the recommendation for {card_label}; change any setting to explore your own.", "info")
    return notice(f"Showing your own settings; the recommendation for {card_label} is above "
                  "(\u201cBack to the recommendation\u201d shows it here again).", "info")


def _chart_error(msg):
    from .live import empty_figure

    return empty_figure("memory", "no estimate", 260), notice(msg, "error"), ""


def build(ctx) -> None:
    gr.Markdown("What your machine can train, and what a setting costs in memory before you start.",
                elem_classes=["qs-tab-intro"])
    ctx.hw_machine = gr.HTML(elem_id="machine-info")
    ctx.hw_recommendation = gr.Markdown(elem_id="recommendation")
    gr.Markdown("### What if …\nChange a setting and the estimate follows.")
    ctx.hw_follow = gr.State(True)  # the controls show the recommendation until the user changes one
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            ctx.hw_card = gr.Dropdown(label="Card", choices=[g.label for g in GPU_CATALOG], value=DEFAULT_PLAN_CARD,
                                      elem_id="whatif-card")
            names = catalog_names()
            ctx.hw_model = gr.Dropdown(label="Model", choices=names, value="Qwen2.5-1.5B", elem_id="whatif-model")
            ctx.hw_quant = gr.Radio(label="Base weights", choices=[("NF4 (4-bit)", "nf4"), ("FP4 (4-bit)", "fp4"),
                                                                   ("none (16-bit)", "none")], value="nf4",
                                    elem_id="whatif-quant")
            with gr.Row():
                ctx.hw_rank = gr.Slider(label="LoRA rank", minimum=4, maximum=128, step=4, value=16, elem_id="whatif-rank")
                ctx.hw_batch = gr.Slider(label="Batch size", minimum=1, maximum=32, step=1, value=4, elem_id="whatif-batch")
            with gr.Row():
                ctx.hw_seq = gr.Dropdown(label="Sequence length (tokens)", choices=SEQ_CHOICES, value=512,
                                         elem_id="whatif-seq")
                ctx.hw_targets = gr.Radio(label="LoRA on", choices=[("attention", "attention"), ("all linear layers", "all")],
                                          value="all", elem_id="whatif-targets")
            ctx.hw_ckpt = gr.Checkbox(label="Gradient checkpointing (less memory, ~30% slower)", value=True,
                                      elem_id="whatif-ckpt")
            ctx.hw_follow_note = gr.HTML(elem_id="whatif-follow")
            with gr.Row():
                ctx.hw_reset = gr.Button("Back to the recommendation", elem_id="whatif-reset", scale=1)
                ctx.hw_use = gr.Button("Use these settings on the Train tab", elem_id="use-plan", variant="primary",
                                       scale=2)
            ctx.hw_use_notice = gr.HTML(elem_id="use-plan-notice")
        with gr.Column(scale=3, min_width=360):
            ctx.hw_chart = gr.Plot(label="Estimated peak memory", elem_id="memory-chart", show_label=False)
            ctx.hw_verdict = gr.HTML(elem_id="memory-verdict")
            with gr.Accordion("What the estimate assumes", open=False):
                ctx.hw_assumptions = gr.Markdown()

    controls = [ctx.hw_card, ctx.hw_model, ctx.hw_quant, ctx.hw_rank, ctx.hw_batch, ctx.hw_seq, ctx.hw_targets, ctx.hw_ckpt]
    chart_outputs = [ctx.hw_chart, ctx.hw_verdict, ctx.hw_assumptions]
    update = safe(_chart_error)(memory_chart)
    for c in controls:
        c.change(update, controls, chart_outputs, show_progress="hidden", queue=False)
    ctx.hw_controls = controls


def _on_load_error(msg):
    return (notice(msg, "error"),) + (gr.skip(),) * 12


@safe(_on_load_error)
def on_load():
    """Fill the tab for this machine: its GPUs or the CPU notice, and a plan for the card to plan for."""
    m = machine()
    card_label = _detected_label(m.gpus[0]) if m.gpus else DEFAULT_PLAN_CARD
    text, values = recommended_controls(card_label)
    chart = memory_chart(card_label, *values)
    return (machine_html(), text, gr.Dropdown(choices=card_choices(), value=card_label), *values, *chart,
            follow_html(True, card_label))


def hand_off_notice(card_label: str, verdict: str, est_bytes: int, usable: int, kept: dict) -> tuple[str, str]:
    """(kind, message) of handing a what-if plan to the Train tab: what it needs, what was kept."""
    here = machine()
    this_machine = any(card_label == _detected_label(g) for g in here.gpus)
    parts = []
    if verdict == "tight":
        parts.append(f"Tight on {card_label}: {gib(est_bytes)} of {gib(usable)} leaves less than 20% headroom.")
    if not this_machine:
        where = (f"this machine has {', '.join(g.name for g in here.gpus)}" if here.gpus
                 else "this machine has no NVIDIA GPU, so a run started here trains on the CPU")
        parts.append(f"This plan is for a {card_label}; {where}. The Train tab's preview shows what would run here; "
                     f"to run this plan, start it on a machine with that card.")
    parts.append("Kept from the Train tab: " + ", ".join(f"{k} {v}" for k, v in kept.items()) + ".")
    return ("warn" if verdict == "tight" or not this_machine else "info"), " ".join(parts)


def wire(ctx) -> None:
    controls = ctx.hw_controls
    ctx.demo.load(on_load, None, [ctx.hw_machine, ctx.hw_recommendation, *controls, ctx.hw_chart, ctx.hw_verdict,
                                  ctx.hw_assumptions, ctx.hw_follow_note])

    def card_changed(card_label, following):
        text, values = recommended_controls(card_label)
        shown = values if following else [gr.skip()] * len(values)
        return (text, *shown, follow_html(following, card_label), "")

    follow_outputs = [ctx.hw_model, ctx.hw_quant, ctx.hw_rank, ctx.hw_batch, ctx.hw_seq, ctx.hw_targets, ctx.hw_ckpt]
    ctx.hw_card.input(safe(lambda msg: (notice(msg, "error"),) + (gr.skip(),) * 9)(card_changed),
                      [ctx.hw_card, ctx.hw_follow],
                      [ctx.hw_recommendation, *follow_outputs, ctx.hw_follow_note, ctx.hw_use_notice],
                      show_progress="hidden")
    for c in follow_outputs:  # the user changed a setting: the panel shows theirs from now on
        c.input(lambda card_label: (False, follow_html(False, card_label)), ctx.hw_card,
                [ctx.hw_follow, ctx.hw_follow_note], queue=False, show_progress="hidden")

    def reset(card_label):
        return (True, *card_changed(card_label, True)[1:])

    ctx.hw_reset.click(safe(lambda msg: (gr.skip(),) * 8 + (notice(msg, "error"), gr.skip()))(reset), ctx.hw_card,
                       [ctx.hw_follow, *follow_outputs, ctx.hw_follow_note, ctx.hw_use_notice], show_progress="hidden")

    form = ctx.tr_form
    kept_fields = ["learning_rate", "epochs", "task"]

    def use_plan(card_label, model_name, quant, rank, batch, seq, targets, ckpt, data, *kept_values):
        est, _, usable, name, verdict = fit_of(card_label, model_name, quant, rank, batch, seq, targets, ckpt)
        if verdict == "no":
            return {ctx.hw_use_notice: notice(
                f"Not handed over: this plan does not fit the {name} ({gib(est.total_bytes)} needed, {gib(usable)} "
                "usable). Lower the batch or sequence length, or pick a smaller model, until the chart says it fits.",
                "error")}
        arch = _arch(model_name)
        hub = next((h for h in arch.hub_ids if h.lower().endswith("-instruct")), arch.hub_ids[0] if arch.hub_ids else arch.name)
        model = "embedded" if arch.name == EMBEDDED_ARCH else hub
        kept = {k.replace("_", " "): (v if v not in (None, "") else "auto") for k, v in zip(kept_fields, kept_values)}
        kept["data"] = data or "none yet"
        kind, message = hand_off_notice(card_label, verdict, est.total_bytes, usable, kept)
        return {form["model"]: model, form["quant"]: quant, form["rank"]: int(rank), form["targets"]: targets,
                form["batch_size"]: int(batch), form["max_seq_len"]: int(seq),
                form["gradient_checkpointing"]: "on" if ckpt else "off", ctx.tabs: gr.Tabs(selected="train"),
                ctx.hw_use_notice: "",
                ctx.tr_notice: notice(f"Settings from the plan: {model}, {quant}, rank {int(rank)} on {targets}, batch "
                                      f"{int(batch)} x {int(seq)} tokens. {message} Pick your data and press Start.",
                                      kind)}

    def use_error(msg):
        return {ctx.hw_use_notice: notice(msg, "error")}

    ctx.hw_use.click(safe(use_error)(use_plan), controls + [ctx.tr_data] + [form[k] for k in kept_fields],
                     [form["model"], form["quant"], form["rank"], form["targets"], form["batch_size"],
                      form["max_seq_len"], form["gradient_checkpointing"], ctx.tabs, ctx.tr_notice, ctx.hw_use_notice])
