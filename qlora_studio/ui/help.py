"""Help tab: getting started (a first run, your own data, your GPU), what the settings and the curves mean,
then the troubleshooting guide. The text lives in the package (`getting_started.md`, `guide.md`), so the
command line and the README point to the same files."""

from __future__ import annotations

import gradio as gr

from ..helptext import getting_started_text
from .findings import guide_text


def build(ctx) -> None:
    gr.Markdown("New here? Start with a first run on the CPU, then your own data, then your GPU. Further down: "
                "what each setting and each curve means, and what to do when a run goes wrong.",
                elem_classes=["qs-tab-intro"])
    gr.Markdown(getting_started_text(), elem_id="help-start")
    gr.Markdown("# Troubleshooting")
    gr.Markdown(guide_text(), elem_id="help-guide")


def wire(ctx) -> None:
    pass
