"""The Help tab's text: every name of the page it quotes (in “curly quotes”) exists on the page as built,
its placeholders are filled from the code, and the tab shows getting started before the guide."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELP_FILES = [ROOT / "qlora_studio" / "getting_started.md", ROOT / "qlora_studio" / "guide.md"]
QUOTED = re.compile(r"“([^”]+)”")


def quoted_names(text: str) -> set[str]:
    """Every “name” in a help text, its line breaks and repeated spaces made single spaces."""
    return {re.sub(r"\s+", " ", m).strip() for m in QUOTED.findall(text)}


def _markdown_names(text: str) -> set[str]:
    """What a Markdown component shows as a name: its headings and its bold phrases."""
    names = {m.strip() for m in re.findall(r"^#+\s*(.+?)\s*$", text, re.M)}
    return names | {m.strip() for m in re.findall(r"\*\*(.+?)\*\*", text)}


def page_names(demo) -> set[str]:
    """The names the built page shows, outside the Help tab: tab, accordion and component labels, button
    texts, and the headings and bold phrases of its Markdown."""
    import gradio as gr

    names: set[str] = set()

    def walk(block) -> None:
        label = getattr(block, "label", None)
        if isinstance(label, str) and label:
            names.add(label)
        if isinstance(block, gr.Tab) and getattr(block, "id", None) == "help":
            return  # the Help tab's own text must not vouch for itself
        if isinstance(block, gr.Button) and isinstance(block.value, str):
            names.add(block.value)
        if isinstance(block, gr.Markdown) and isinstance(block.value, str):
            names.update(_markdown_names(block.value))
        for child in getattr(block, "children", []) or []:
            walk(child)

    walk(demo)
    return names


@pytest.fixture(scope="module")
def built_page_names(tmp_path_factory):
    from qlora_studio.ui.app import build_app

    with pytest.MonkeyPatch.context() as mp:  # the Runs tab lists the runs of an empty studio home
        mp.setenv("QLORA_STUDIO_HOME", str(tmp_path_factory.mktemp("help-home")))
        yield page_names(build_app())


def test_the_page_names_are_found_where_the_page_has_them(built_page_names):
    # The extraction itself: buttons, tabs, accordions, labels and Markdown headings; nothing of the Help tab.
    for name in ("Start", "Stop", "Apply as a new run", "Hardware & plan", "Help", "Live run", "Diagnosis",
                 "What the estimate assumes", "Cut-off (max tokens per example)"):
        assert name in built_page_names, name
    assert "Troubleshooting" not in built_page_names and "Getting started" not in built_page_names


@pytest.mark.parametrize("path", HELP_FILES, ids=lambda p: p.name)
def test_every_quoted_name_in_the_help_exists_on_the_page(path, built_page_names):
    names = quoted_names(path.read_text(encoding="utf-8"))
    assert names, f"{path.name} quotes no name of the page"
    missing = sorted(names - built_page_names)
    assert not missing, f"{path.name} names what the page does not have: {missing}"


def test_a_wrong_name_is_caught(built_page_names):
    text = "Press “Apply and restart” on the “Train” tab, then “Start”."
    assert quoted_names(text) - built_page_names == {"Apply and restart"}
    wrapped = "press “Evaluate on its held-out\n   data”"
    assert quoted_names(wrapped) == {"Evaluate on its held-out data"} <= built_page_names


def test_placeholders_are_filled_from_the_code():
    from qlora_studio.config import BY_NAME
    from qlora_studio.data import MAX_ROW_CHARS
    from qlora_studio.helptext import HelpTextError, getting_started_text, render

    raw = (ROOT / "qlora_studio" / "getting_started.md").read_text(encoding="utf-8")
    assert "{setting:rank}" in raw and "{value:max_row_chars}" in raw
    text = getting_started_text()
    assert not re.search(r"\{(setting|default|auto|value):", text)
    assert BY_NAME["rank"].describe() in text and BY_NAME["learning_rate"].help in text
    assert f"{MAX_ROW_CHARS:,} characters" in text
    assert render("{default:eval_fraction}") == f"{BY_NAME['eval_fraction'].default:g}"
    for bad in ("{setting:no_such_setting}", "{value:no_such_figure}", "{auto:learning_rate}"):
        with pytest.raises(HelpTextError):
            render(bad)


def test_the_help_covers_the_path_the_settings_and_the_curves():
    body = (ROOT / "qlora_studio" / "getting_started.md").read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", body, re.M)
    assert headings[:4] == ["Getting started", "1. A first run in five minutes", "2. Your own data", "3. Your GPU"]
    assert "What the settings mean" in headings and "What the curves mean" in headings
    for word in ("`rank`", "`alpha`", "`learning_rate`", "NF4", "FP4", "`double_quant`", "`gradient_checkpointing`",
                 "`grad_accum`", "`max_seq_len`", "`batching`", "Train loss", "Eval loss", "overfitting",
                 "Gradient norm", "Memory", "Golden answers", "cpu-demo"):
        assert word in body, word
    # every data shape `data` accepts is described
    from qlora_studio.data import FORMATS

    for fmt, key in zip(FORMATS, ("messages", "conversations", "instruction", "prompt", "text")):
        assert f'"{key}"' in body, fmt


def test_the_help_tab_shows_getting_started_before_the_guide():
    import gradio as gr

    from qlora_studio.helptext import getting_started_text
    from qlora_studio.ui import findings, help as help_tab

    with gr.Blocks() as demo:
        help_tab.build(None)
    shown = [b.value.strip() for b in demo.children if isinstance(b, gr.Markdown)]  # gradio trims the ends
    start, guide = getting_started_text().strip(), findings.guide_text().strip()
    assert start in shown and guide in shown
    assert shown.index(start) < shown.index(guide)
