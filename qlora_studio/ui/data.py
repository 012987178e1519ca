"""Data tab: pick a shipped sample or upload a file; see its format, rows, problems, token lengths,
and one example as the model will see it (trained tokens vs masked tokens)."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from ..data import IGNORE_INDEX, DataError, assistant_spans, default_system_prompt, load_examples, tokenize_all, tokenize_example
from .common import (DATA_SUFFIXES, MAX_UPLOAD_MB, MODEL_CHOICES, SAMPLES, data_choices, display_path, esc, fmt_size,
                     keep_upload, notice, plot_template, resolve_data_path, safe, tokenizer_for)

MAX_TOKENIZED = 5000  # rows tokenized for the histogram (a random-free prefix of the file)
PREVIEW_ROWS = 25
DEFAULT_SOURCE = display_path(next(iter(SAMPLES.values())))


def _clip(text, n: int = 160) -> str:
    text = " ".join(str(text or "").split())
    return text if len(text) <= n else text[: n - 1] + "…"


def preview_table(examples):
    """The first rows as a table; a system prompt shared by every row is returned once, not shown per row."""
    import pandas as pd

    systems = {next((m["content"] for m in ex.messages if m["role"] == "system"), "") for ex in examples[:200]
               if ex.messages}
    shared = next(iter(systems)) if len(systems) == 1 else ""
    rows = []
    for ex in examples[:PREVIEW_ROWS]:
        if ex.text is not None:
            rows.append([ex.line, "", _clip(ex.text, 240)])
            continue
        system = next((m["content"] for m in ex.messages if m["role"] == "system"), "")
        user = next((m["content"] for m in ex.messages if m["role"] == "user"), "")
        answer = next((m["content"] for m in ex.messages if m["role"] == "assistant"), "")
        turns = sum(1 for m in ex.messages if m["role"] == "user")
        prefix = f"[system: {_clip(system, 60)}] " if system and not shared else ""
        rows.append([ex.line, prefix + _clip(user) + (f"  (+{turns - 1} more turns)" if turns > 1 else ""),
                     _clip(answer, 240)])
    return pd.DataFrame(rows, columns=["line", "user / prompt", "assistant / text"]), shared


def length_histogram(lengths: list[int], max_len: int, truncated: int):
    import plotly.graph_objects as go

    import numpy as np

    fig = go.Figure(go.Histogram(x=np.asarray(lengths, dtype=np.int32), nbinsx=40, marker_color="#4f46e5", name="examples"))
    fig.add_vline(x=max_len, line=dict(color="#ef4444", width=2, dash="dash"),
                  annotation_text=f"cut-off {max_len}", annotation_position="top right")
    fig.update_layout(height=300, template=plot_template(), margin=dict(l=48, r=16, t=48, b=40), bargap=0.05,
                      xaxis_title="tokens per example (before the cut-off)", yaxis_title="examples",
                      title=f"Token lengths: {truncated} of {len(lengths)} over the cut-off" if truncated
                      else f"Token lengths: all {len(lengths)} fit")
    return fig


def _token_pieces(tok, ex, max_len: int) -> tuple[list[tuple[str, bool]], int]:
    """(text piece, trained?) per token as the model sees the example, and how many tokens were cut."""
    enc = tokenize_example(tok, ex, max_len=10**9)  # the full example; the cut-off is shown, not applied
    ids, labels = enc["input_ids"], enc["labels"]
    if ex.text is not None:
        text = ex.text + (tok.eos_token or "")
        offsets = tok(text, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
    else:
        text, _ = assistant_spans(tok, ex.messages)
        offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    pieces = []
    if len(offsets) == len(ids):
        for (s, e), tid, lab in zip(offsets, ids, labels):
            piece = text[s:e] if e > s else tok.convert_ids_to_tokens(tid)
            pieces.append((piece, lab != IGNORE_INDEX))
    else:
        pieces = [(tok.decode([tid]), lab != IGNORE_INDEX) for tid, lab in zip(ids, labels)]
    return pieces, max(0, len(ids) - max_len)


def example_html(tok, ex, max_len: int) -> str:
    pieces, cut = _token_pieces(tok, ex, max_len)
    spans = []
    for i, (piece, trained) in enumerate(pieces):
        cls = "qs-tok-cut" if i >= max_len else ("qs-tok-train" if trained else "qs-tok-mask")
        spans.append(f'<span class="{cls}">{esc(piece)}</span>')
    n_train = sum(1 for i, (_, t) in enumerate(pieces) if t and i < max_len)
    legend = (f'<div class="qs-legend"><span class="qs-tok-train">trained</span> the loss is computed on these '
              f'{n_train} tokens · <span class="qs-tok-mask">masked</span> context the model reads but is not '
              f"trained to write · {len(pieces)} tokens"
              + (f' · <span class="qs-tok-cut">cut off</span> {cut} tokens past the {max_len}-token limit' if cut else "")
              + "</div>")
    return legend + f'<div class="qs-example" id="example-tokens">{"".join(spans)}</div>'


def _error_outputs(msg):
    return (notice(msg, "error"), "", None, None, "", gr.skip())


@safe(_error_outputs)
def check(source: str, model: str, max_len, row, progress=gr.Progress()):
    """Everything the tab shows about a data file."""
    path = resolve_data_path(source)
    max_len = int(max_len or 512)
    if max_len < 16:
        raise ValueError("sequence length: at least 16 tokens")
    progress(0.05, desc="reading the file")
    examples, report = load_examples(path)
    progress(0.2, desc=f"loading the {model} tokenizer")
    tok = tokenizer_for(model)
    progress(0.4, desc="counting tokens")
    # as training does: a row the chat template or the tokenizer fails on is reported and left out
    lengths = [r["length"] for r in tokenize_all(tok, examples[:MAX_TOKENIZED], 10**9, report)]
    failed = {i.line for i in report.errors}
    examples = [ex for ex in examples if ex.line not in failed]
    if not examples:
        raise DataError(f"no usable rows in {path}; first problem: {report.errors[0].format(str(path))}")
    summary = [f"<b>{esc(display_path(path))}</b>: format <b>{esc(report.format)}</b>, "
               f"<b>{report.usable}</b> usable of {report.rows} rows"]
    truncated = sum(1 for n in lengths if n > max_len)
    summary.append(f"{truncated} of {len(lengths)} examples are longer than {max_len} tokens and will be cut"
                   if truncated else f"every example fits in {max_len} tokens")
    if len(examples) > MAX_TOKENIZED:
        summary.append(f"token lengths of the first {MAX_TOKENIZED} rows")
    kind = "ok"
    lines = summary[:]
    for w in report.warnings:
        lines.append("warning: " + w)
        kind = "warn"
    errors = ""
    if report.errors:
        kind = "warn"
        items = "".join(f"<li><code>{esc(i.format(display_path(path)))}</code></li>" for i in report.errors[:50])
        more = f"<li>… and {len(report.errors) - 50} more</li>" if len(report.errors) > 50 else ""
        errors = (f'<div class="qs-notice qs-warn"><b>{len(report.errors)} rows skipped</b> (file:line field: problem)'
                  f"<ul>{items}{more}</ul></div>")
    summary_html = f'<div class="qs-notice qs-{kind}" id="data-summary">' + "<br>".join(
        lines[:1] + [esc(x) for x in lines[1:]]) + "</div>"
    progress(0.8, desc="rendering an example")
    table, shared_system = preview_table(examples)
    if shared_system:
        summary_html = summary_html.replace("</div>", f"<br>system prompt (every row): <i>{esc(_clip(shared_system, 300))}</i></div>", 1)
    default = default_system_prompt(tok)
    if default and any(ex.messages and ex.messages[0]["role"] != "system" for ex in examples):
        summary_html = summary_html.replace("</div>", (
            f"<br>conversations without a system message get the model's default: <i>{esc(_clip(default, 300))}</i> "
            "(the <b>system prompt</b> setting on the Train tab replaces it, or clears it with <code>none</code>)"
            "</div>"), 1)
    idx = _pick(examples, row)
    view = example_html(tok, examples[idx], max_len)
    return (summary_html, errors, table, length_histogram(lengths, max_len, truncated),
            f'<div class="qs-muted">Row {examples[idx].line} as the model sees it:</div>' + view,
            examples[idx].line)


def _pick(examples, row) -> int:
    """The index of the example at file line/row ``row`` (or the first one)."""
    if row:
        for i, ex in enumerate(examples):
            if ex.line >= int(row):
                return i
    return 0


def _upload_error(msg):
    return gr.skip(), None, notice(msg, "error")


@safe(_upload_error)
def on_upload(file_path):
    if not file_path:
        return gr.skip(), None, ""
    kept = keep_upload(file_path, Path(file_path).name)
    return (gr.Dropdown(choices=data_choices(), value=str(kept)), None,
            notice(f"Uploaded {kept.name} ({fmt_size(kept.stat().st_size)}), kept in the studio's uploads folder.", "ok"))


def build(ctx) -> None:
    gr.Markdown("Pick a shipped sample or upload your own file: see what the trainer will see before you train.",
                elem_classes=["qs-tab-intro"])
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ctx.dt_source = gr.Dropdown(label="Data file", choices=data_choices(), value=DEFAULT_SOURCE,
                                        allow_custom_value=True, elem_id="data-source",
                                        info="a shipped sample, an uploaded file, or a path on this machine")
            with gr.Row():
                ctx.dt_model = gr.Dropdown(label="Tokenize with", choices=MODEL_CHOICES, value="embedded",
                                           allow_custom_value=True)
                ctx.dt_len = gr.Number(label="Cut-off (max tokens per example)", value=256, precision=0)
            with gr.Row():
                ctx.dt_check = gr.Button("Check", variant="secondary", elem_id="data-check")
                ctx.dt_use = gr.Button("Use this data for training", variant="primary", elem_id="data-use")
        with gr.Column(scale=2):
            ctx.dt_upload = gr.File(label=f"Upload (.jsonl .json .csv .parquet, up to {MAX_UPLOAD_MB} MB)",
                                    file_types=list(DATA_SUFFIXES), type="filepath", elem_id="data-upload")
    ctx.dt_notice = gr.HTML(elem_id="data-notice")
    ctx.dt_summary = gr.HTML(elem_id="data-summary-box")
    ctx.dt_errors = gr.HTML(elem_id="data-errors")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            ctx.dt_preview = gr.Dataframe(label="Preview (first rows)", elem_id="data-preview", wrap=True,
                                          interactive=False, max_height=360, column_widths=["9%", "45%", "46%"])
        with gr.Column(scale=2):
            ctx.dt_hist = gr.Plot(label="Token lengths", elem_id="length-hist", show_label=False)
    with gr.Row():
        ctx.dt_row = gr.Number(label="Show the example at row", value=None, precision=0, scale=1)
        gr.Markdown("", scale=4)
    ctx.dt_example = gr.HTML(elem_id="example-view")


def wire(ctx) -> None:
    inputs = [ctx.dt_source, ctx.dt_model, ctx.dt_len, ctx.dt_row]
    outputs = [ctx.dt_summary, ctx.dt_errors, ctx.dt_preview, ctx.dt_hist, ctx.dt_example, ctx.dt_row]
    ctx.dt_check.click(check, inputs, outputs, concurrency_limit=2)
    ctx.dt_source.change(check, inputs, outputs, concurrency_limit=2)
    ctx.dt_model.change(check, inputs, outputs, concurrency_limit=2)
    ctx.dt_len.submit(check, inputs, outputs, concurrency_limit=2)
    ctx.dt_row.submit(check, inputs, outputs, concurrency_limit=2)

    def first_visit(summary, *args):
        return check(*args) if not summary else (gr.skip(),) * len(outputs)

    ctx.tab_data.select(first_visit, [ctx.dt_summary] + inputs, outputs, concurrency_limit=2)
    ctx.dt_upload.upload(on_upload, ctx.dt_upload, [ctx.dt_source, ctx.dt_upload, ctx.dt_notice])

    def use(source):
        path = resolve_data_path(source)
        return (display_path(path), gr.Tabs(selected="train"),
                notice(f"Training data: {display_path(path)}. Check the settings and press Start.", "info"))

    ctx.dt_use.click(safe(lambda msg: (gr.skip(), gr.skip(), notice(msg, "error")))(use), ctx.dt_source,
                     [ctx.tr_data, ctx.tabs, ctx.tr_notice])
