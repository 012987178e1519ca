"""Help tab: how the studio is used, and the troubleshooting guide."""

from __future__ import annotations

import gradio as gr

from .findings import guide_text

USING = """\
**How the studio works.** *Hardware & plan* says what this machine (or a card you plan to buy) can
train. *Data* checks a file before you spend time on it. *Train* runs one fine-tune at a time in the
background: close the page and it keeps going; open it again and the run is there. *Chat* merges the
adapter into the base model once and lets you compare the two. *Runs* keeps every run folder.

Everything lives in the studio's home folder (`$QLORA_STUDIO_HOME`, by default
`~/.local/share/qlora-studio`): one folder per run with its settings, metrics, log, checkpoints,
adapter and merged model. The command line (`qlora-studio --help`) works on the same folders.
"""


def build(ctx) -> None:
    gr.Markdown("What a finding means and what to do about it, in plain words.", elem_classes=["qs-tab-intro"])
    gr.Markdown(USING, elem_id="help-using")
    gr.Markdown("## Troubleshooting")
    gr.Markdown(guide_text(), elem_id="help-guide")


def wire(ctx) -> None:
    pass
