"""Hardware & plan tab: the detected GPU (or the CPU notice), the recommendation, a what-if panel."""

from __future__ import annotations

import time

import gradio as gr

from ..catalog import CATALOG, catalog_names
from ..estimator import BREAKDOWN_KEYS, HEADROOM, estimate
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


def memory_chart(card_label, model_name, quant, rank, batch, seq, targets, checkpointing):
    """A stacked bar of the estimated peak, item by item, against the card's memory."""
    import plotly.graph_objects as go

    card = card_for(card_label)
    total, usable, name = _card_bytes(card)
    est = estimate(_arch(model_name), quant=quant, double_quant=True, rank=int(rank), targets=targets,
                   batch=int(batch), seq=int(seq), grad_checkpointing=bool(checkpointing),
                   compute_dtype=_compute_dtype(card))
    fig = go.Figure()
    for key in BREAKDOWN_KEYS:
        v = est.breakdown[key] / 2**30
        fig.add_trace(go.Bar(y=["peak"], x=[v], name=key, orientation="h", marker_color=COLORS[key],
                             hovertemplate=f"{key}: %{{x:.2f}} GiB<extra></extra>"))
    fig.add_vline(x=total / 2**30, line=dict(color="#111827", width=3))
    fig.add_annotation(x=total / 2**30, y=1.0, yref="paper", yanchor="bottom", xanchor="right", showarrow=False,
                       text=f"{name}: {total / 2**30:.0f} GiB", font=dict(size=12, color="#111827"))
    fig.add_vline(x=usable / (1 + HEADROOM) / 2**30, line=dict(color="#6b7280", dash="dash"))
    fig.add_annotation(x=usable / (1 + HEADROOM) / 2**30, y=0.0, yref="paper", yanchor="top", xanchor="right",
                       showarrow=False, text="80% ", font=dict(size=11, color="#6b7280"))
    xmax = max(total, est.total_bytes) / 2**30 * 1.1
    fig.update_layout(barmode="stack", height=290, template=plot_template(), xaxis=dict(title="GiB", range=[0, xmax]),
                      yaxis=dict(visible=False), margin=dict(l=16, r=16, t=70, b=90),
                      legend=dict(orientation="h", yanchor="top", y=-0.45, x=0),
                      title=dict(text=f"Estimated peak: {est.total_bytes / 2**30:.2f} GiB of {total / 2**30:.0f} GiB",
                                 x=0.01, xanchor="left"))
    fits = est.total_bytes * (1 + HEADROOM) <= usable
    tight = est.total_bytes <= usable
    if fits:
        verdict = notice(f"Fits: {gib(est.total_bytes)} of the {gib(usable)} usable on {name}, with room to spare.", "ok")
    elif tight:
        verdict = notice(f"Tight: {gib(est.total_bytes)} of {gib(usable)} leaves less than 20% headroom; "
                         "a longer example or fragmentation may run out of memory.", "warn")
    else:
        verdict = notice(f"Does not fit: {gib(est.total_bytes)} needed, {gib(usable)} usable on {name}. "
                         "Lower the batch or sequence length, " + ("use 4-bit weights, " if quant == "none" else "")
                         + "or pick a smaller model.", "error")
    assumptions = "\n".join(f"- {a}" for a in est.assumptions)
    return fig, verdict, assumptions


def _chart_error(msg):
    from .live import empty_figure

    return empty_figure("memory", "no estimate", 260), notice(msg, "error"), ""


def build(ctx) -> None:
    gr.Markdown("What your machine can train, and what a setting costs in memory before you start.",
                elem_classes=["qs-tab-intro"])
    ctx.hw_machine = gr.HTML(elem_id="machine-info")
    ctx.hw_recommendation = gr.Markdown(elem_id="recommendation")
    gr.Markdown("### What if …\nChange a setting and the estimate follows.")
    with gr.Row(equal_height=False):
        with gr.Column(scale=2, min_width=280):
            ctx.hw_card = gr.Dropdown(label="Card", choices=[g.label for g in GPU_CATALOG], value=DEFAULT_PLAN_CARD,
                                      elem_id="whatif-card")
            names = catalog_names()
            ctx.hw_model = gr.Dropdown(label="Model", choices=names, value="Qwen2.5-1.5B", elem_id="whatif-model")
            ctx.hw_quant = gr.Radio(label="Base weights", choices=[("NF4 (4-bit)", "nf4"), ("FP4 (4-bit)", "fp4"),
                                                                   ("none (16-bit)", "none")], value="nf4")
            with gr.Row():
                ctx.hw_rank = gr.Slider(label="LoRA rank", minimum=4, maximum=128, step=4, value=16)
                ctx.hw_batch = gr.Slider(label="Batch size", minimum=1, maximum=32, step=1, value=4, elem_id="whatif-batch")
            with gr.Row():
                ctx.hw_seq = gr.Dropdown(label="Sequence length (tokens)", choices=SEQ_CHOICES, value=512)
                ctx.hw_targets = gr.Radio(label="LoRA on", choices=[("attention", "attention"), ("all linear layers", "all")],
                                          value="all")
            ctx.hw_ckpt = gr.Checkbox(label="Gradient checkpointing (less memory, ~30% slower)", value=True)
            ctx.hw_use = gr.Button("Use these settings on the Train tab", elem_id="use-plan")
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
    return (notice(msg, "error"),) + (gr.skip(),) * 11


@safe(_on_load_error)
def on_load():
    """Fill the tab for this machine: its GPUs or the CPU notice, and a plan for the card to plan for."""
    m = machine()
    choices = card_choices()
    card_label = _detected_label(m.gpus[0]) if m.gpus else DEFAULT_PLAN_CARD
    card = card_for(card_label)
    text, plan = recommendation_md(card)
    model = plan.model or EMBEDDED_ARCH
    batch = plan.batch if plan.fits else 1
    chart = memory_chart(card_label, model, plan.quant, plan.rank, batch, plan.seq, plan.targets, plan.grad_checkpointing)
    return (machine_html(), text, gr.Dropdown(choices=choices, value=card_label), model, plan.quant, plan.rank,
            batch, plan.seq, plan.targets, *chart)


def wire(ctx) -> None:
    ctx.demo.load(on_load, None, [ctx.hw_machine, ctx.hw_recommendation, ctx.hw_card, ctx.hw_model, ctx.hw_quant,
                                  ctx.hw_rank, ctx.hw_batch, ctx.hw_seq, ctx.hw_targets,
                                  ctx.hw_chart, ctx.hw_verdict, ctx.hw_assumptions])
    ctx.hw_card.change(safe(lambda msg: notice(msg, "error"))(lambda label: recommendation_md(card_for(label))[0]),
                       ctx.hw_card, ctx.hw_recommendation, show_progress="hidden", queue=False)

    def use_plan(card_label, model_name, quant, rank, batch, seq, targets, ckpt):
        arch = _arch(model_name)
        hub = next((h for h in arch.hub_ids if h.lower().endswith("-instruct")), arch.hub_ids[0] if arch.hub_ids else arch.name)
        model = "embedded" if arch.name == EMBEDDED_ARCH else hub
        form = ctx.tr_form
        return {form["model"]: model, form["quant"]: quant, form["rank"]: int(rank), form["targets"]: targets,
                form["batch_size"]: int(batch), form["max_seq_len"]: int(seq),
                form["gradient_checkpointing"]: "on" if ckpt else "off", ctx.tabs: gr.Tabs(selected="train"),
                ctx.tr_notice: notice(f"Settings from the plan: {model}, {quant}, rank {int(rank)} on {targets}, batch "
                                      f"{int(batch)} x {int(seq)} tokens. Pick your data and press Start.", "info")}

    def use_error(msg):
        return {ctx.tr_notice: notice(msg, "error")}

    form = ctx.tr_form
    ctx.hw_use.click(safe(use_error)(use_plan), ctx.hw_controls,
                     [form["model"], form["quant"], form["rank"], form["targets"], form["batch_size"],
                      form["max_seq_len"], form["gradient_checkpointing"], ctx.tabs, ctx.tr_notice])
