"""The app: the tabs composed into one page, and how it is served.

    from qlora_studio.ui.app import build_app, launch_options
    build_app().launch(**launch_options())      # what `qlora-studio serve` does, on 127.0.0.1:7860
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # a local app: no telemetry, no version check

import gradio as gr  # noqa: E402

from . import chat, data, gradio_compat, hardware, help, runs, security, train  # noqa: E402
from .common import MAX_UPLOAD_MB  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
TABS = (  # (module, tab label, tab id)
    (hardware, "Hardware & plan", "hardware"),
    (data, "Data", "data"),
    (train, "Train", "train"),
    (chat, "Chat", "chat"),
    (runs, "Runs", "runs"),
    (help, "Help", "help"),
)

HEADER = """
<div class="qs-header">
  <h1>QLoRA Studio</h1>
  <div class="qs-muted">Fine-tune an open LLM with QLoRA on one GPU or the CPU: plan &rarr; data &rarr; train &rarr; chat.</div>
</div>
"""

CSS = """
.qs-header { padding: 6px 2px 2px; }
.qs-header h1 { margin: 0 0 2px; font-size: 1.7rem; font-weight: 700; }
.qs-tab-intro p { color: #4b5563; margin: 2px 0 6px; }
.qs-muted, .qs-muted p { color: #6b7280; font-size: 0.92rem; }
.qs-notice { border-radius: 8px; padding: 9px 13px; margin: 6px 0; border: 1px solid; font-size: 0.95rem; line-height: 1.45; }
.qs-info { background: #eef2ff; border-color: #c7d2fe; color: #1e1b4b; }
.qs-ok { background: #ecfdf5; border-color: #a7f3d0; color: #064e3b; }
.qs-warn { background: #fffbeb; border-color: #fde68a; color: #78350f; }
.qs-error { background: #fef2f2; border-color: #fecaca; color: #7f1d1d; }
.qs-notice code { background: transparent; font-size: 0.88rem; }
.qs-notice ul { margin: 4px 0 0 18px; }
.qs-badge { display: inline-block; padding: 2px 10px; border-radius: 999px; font-weight: 600; font-size: 0.85rem; margin-right: 6px; }
.qs-state-run { background: #dbeafe; color: #1e40af; }
.qs-state-ok { background: #d1fae5; color: #065f46; }
.qs-state-warn { background: #fef3c7; color: #92400e; }
.qs-state-error { background: #fee2e2; color: #991b1b; }
.qs-state-info { background: #e5e7eb; color: #374151; }
.qs-progress { margin: 4px 0 8px; }
.qs-bar { height: 10px; background: #e5e7eb; border-radius: 6px; overflow: hidden; margin: 6px 0; }
.qs-bar > div { height: 100%; background: #4f46e5; }
.qs-bar-busy > div { width: 30%; animation: qs-slide 1.4s infinite linear; }
@keyframes qs-slide { from { margin-left: -30%; } to { margin-left: 100%; } }
.qs-example { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 0.86rem; white-space: pre-wrap;
  line-height: 1.75; padding: 10px 12px; border: 1px solid #e5e7eb; border-radius: 8px; max-height: 380px; overflow: auto; }
.qs-tok-train { background: #bbf7d0; color: #14532d; border-radius: 2px; box-shadow: inset -1px 0 0 rgba(20, 83, 45, 0.25); }
.qs-tok-mask { color: #6b7280; box-shadow: inset -1px 0 0 rgba(0, 0, 0, 0.08); }
.qs-tok-cut { color: #9ca3af; text-decoration: line-through; }
.qs-legend { margin: 4px 0 6px; font-size: 0.9rem; }
.qs-legend span { padding: 0 4px; }
.qs-table { border-collapse: collapse; margin: 6px 0; }
.qs-table th, .qs-table td { padding: 4px 12px; border-bottom: 1px solid #e5e7eb; text-align: left; }
.qs-findings { display: flex; flex-direction: column; gap: 4px; }
.qs-finding-title { font-weight: 600; }
.qs-sev { text-transform: uppercase; font-size: 0.75rem; letter-spacing: 0.04em; margin-right: 4px; }
.qs-fix { margin-top: 3px; }
.qs-cpu-notice b { font-size: 1.02rem; }
"""


class Ctx:
    """The components the tabs share (set as attributes while the tabs are built)."""


def build_app() -> gr.Blocks:
    """The whole app, every tab wired to the core. State stays on the server (run manager, run folders)."""
    ctx = Ctx()
    with gr.Blocks(title="QLoRA Studio", analytics_enabled=False) as demo:
        ctx.demo = demo
        gr.HTML(HEADER)
        with gr.Tabs(selected="hardware", elem_id="tabs") as tabs:
            ctx.tabs = tabs
            for module, label, tab_id in TABS:
                with gr.Tab(label, id=tab_id, elem_id=f"tab-{tab_id}") as tab:
                    setattr(ctx, f"tab_{tab_id}", tab)
                    module.build(ctx)
        for module, _, _ in TABS:
            module.wire(ctx)
    demo.queue(default_concurrency_limit=2)
    gradio_compat.calm_queue(demo)
    return demo


def theme():
    # System fonts: nothing is fetched from a font service (the app works offline).
    return gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                          font=["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])


def launch_options() -> dict:
    """What `launch()` needs besides host, port, share and auth (gradio 6 takes theme and css here)."""
    return dict(theme=theme(), css=CSS, max_file_size=f"{MAX_UPLOAD_MB}mb", show_error=False,
                footer_links=["settings"], app_kwargs={"middleware": gradio_compat.middleware() + security.middleware()})


def warm_up() -> None:
    """What the first visit to the Data or Train tab would otherwise wait for: the training stack's import
    and, the first time, the embedded model's conversion (said in the terminal, with its duration)."""
    import time

    from ..compat import import_training_stack
    from ..models import ModelError, embedded_model_path

    try:
        import_training_stack()
        t0 = time.monotonic()
        path = embedded_model_path()
        if time.monotonic() - t0 > 2:
            print(f"embedded model ready ({time.monotonic() - t0:.0f} s, once): {path}", flush=True)
    except ModelError as e:  # the page says so where the model is used
        print(f"embedded model not available: {e}", file=sys.stderr, flush=True)


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, share: bool = False,
          auth: tuple[str, str] | None = None) -> None:
    """Build and serve the app until Ctrl-C; a run still training is stopped cleanly (checkpoint saved)."""
    from ..manager import get_manager

    import signal
    import threading

    def _terminate(signum, frame):  # `kill` ends the app the way Ctrl-C does: the run is saved first
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
    # Import the training stack and convert the embedded model now, in one background thread, so the
    # first tab that needs them does not sit silent for a minute (and no two handlers ever import or
    # convert at once; see `compat.import_training_stack` and `models.import_gguf`).
    threading.Thread(target=warm_up, name="warm-up", daemon=True).start()
    demo = build_app()
    print(f"QLoRA Studio: http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}  (Ctrl-C stops it)",
          flush=True)
    try:
        demo.launch(server_name=host, server_port=port, share=share, auth=auth, quiet=True, **launch_options())
    finally:
        mgr = get_manager()
        if mgr.active() is not None:
            print(f"stopping {mgr.active().name}: saving a checkpoint and the adapter", file=sys.stderr, flush=True)
            mgr.stop()
            mgr.wait()
