"""The Chat tab's Export section: the run picked above as files to take home (`export.export_run`), with a
progress bar, the verification's result and the exact ``ollama create`` command to copy."""

from __future__ import annotations

import gradio as gr

from .. import llamacpp
from ..export import DEFAULT_FORMAT, DEFAULT_QUANT, ExportError, export_run
from .common import display_path, esc, notice, run_folder, safe

FORMAT_CHOICES = [("Ollama (GGUF + Modelfile)", "ollama"), ("GGUF (llama.cpp, LM Studio)", "gguf"),
                  ("Merged (safetensors, transformers)", "merged"), ("Adapter (PEFT + LoRA GGUF)", "adapter")]


def quant_choices() -> list[str]:
    """q4_k_m is offered where llama.cpp's compiled quantizer is installed."""
    return ["q8_0", "f16", "bf16"] + (["q4_k_m"] if llamacpp.runtime_available() else [])


def quant_note() -> str:
    if llamacpp.runtime_available():
        return "q4_k_m is made by llama.cpp's quantizer (llama-cpp-python)."
    return ("q4_k_m needs llama.cpp's compiled quantizer: `pip install 'qlora-studio[llama_cpp]'`, or export f16 and "
            "let Ollama quantize it: `ollama create NAME --quantize q4_K_M -f <folder>/Modelfile`.")


def result_html(result) -> str:
    v = result.verified
    kind = "ok" if result.ok else "error"
    head = (f"Exported to {display_path(result.folder)} in {result.seconds:.0f} s — "
            + ("verified." if result.ok else "VERIFICATION FAILED (the files are kept; verify.json says what differs)."))
    rows = "".join(f"<tr><td>{'✓' if c['ok'] else '✗'}</td><td>{esc(c['name'])}</td><td>{esc(c['detail'])}</td></tr>"
                   for c in v.get("checks", []))
    warnings = "".join(notice(w, "warn") for w in result.warnings)
    files = ", ".join(f"<code>{esc(f)}</code>" for f in result.files)
    return (notice(head, kind) + warnings
            + f'<table class="qs-table" id="export-checks"><tr><th></th><th>check</th><th>result</th></tr>{rows}</table>'
            + f'<div class="qs-muted">Files: {files}. Checked on {esc(v.get("prompts_from", "?"))}.</div>')


def do_export(name, fmt, quant, progress=gr.Progress()):
    if not name:
        raise ExportError("pick a run first (a completed or stopped run)")
    progress(0.0, desc="starting the export")
    result = export_run(run_folder(name), fmt, quant, progress=lambda f, m: progress(f, desc=m))
    command = result.ollama_create
    return result_html(result), gr.Code(value=command or "", visible=bool(command))


def build(ctx) -> None:
    with gr.Accordion("Export: take the model home", open=False, elem_id="export-section"):
        gr.Markdown("The run above as files that run outside the studio, each checked by a round trip (the GGUF "
                    "read back and compared with the merged model on the run's own prompts).",
                    elem_classes=["qs-muted"])
        with gr.Row(equal_height=False):
            ctx.ex_format = gr.Radio(FORMAT_CHOICES, value=DEFAULT_FORMAT, label="Format", elem_id="export-format",
                                     scale=3)
            ctx.ex_quant = gr.Radio(quant_choices(), value=DEFAULT_QUANT, label="GGUF number format",
                                    elem_id="export-quant", scale=2)
            ctx.ex_button = gr.Button("Export", variant="primary", elem_id="export-button", scale=1, min_width=120)
        gr.Markdown(quant_note(), elem_classes=["qs-muted"])
        ctx.ex_status = gr.HTML(elem_id="export-status")
        ctx.ex_command = gr.Code(label="Run it in Ollama (copy this command)", language="shell", interactive=False,
                                 visible=False, elem_id="export-command")


def wire(ctx) -> None:
    ctx.ex_button.click(safe(lambda msg: (notice(msg, "error"), gr.skip()))(do_export),
                        [ctx.ch_run, ctx.ex_format, ctx.ex_quant], [ctx.ex_status, ctx.ex_command],
                        concurrency_limit=1, concurrency_id="export")
