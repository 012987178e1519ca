"""The Help tab's first part, without gradio: getting started, what the settings and the curves mean
(`getting_started.md`; the troubleshooting guide that follows it is `guide.md`, see `diagnose.GUIDE_PATH`).

`getting_started.md` takes its figures and the settings' own help from the code they describe, through
placeholders that `render` fills in:

- ``{setting:NAME}``: the setting's help as the form and ``--help`` show it (`config.Setting.describe`);
- ``{default:NAME}``: its default value; ``{auto:NAME}``: what "automatic" resolves to;
- ``{value:KEY}``: a figure of the studio (`values`).

A placeholder naming nothing raises `HelpTextError`, so the file cannot drift from the code unnoticed.
Names of things on the page are written in “curly quotes” there and in the guide (tests/test_help.py checks
that each one exists on the page).
"""

from __future__ import annotations

import re
from pathlib import Path

from .config import BY_NAME
from .errors import StudioError

GETTING_STARTED_PATH = Path(__file__).with_name("getting_started.md")
_PLACEHOLDER = re.compile(r"\{(setting|default|auto|value):([a-z_]+)\}")


class HelpTextError(StudioError):
    """A placeholder of the help text that names no setting or figure."""


def values() -> dict[str, str]:
    """The figures the help text quotes, from the modules that define them."""
    from .data import MAX_ROW_CHARS
    from .estimator import HEADROOM, QUANT_BLOCK

    return {
        "quant_block": str(QUANT_BLOCK),
        "max_row_chars": f"{MAX_ROW_CHARS:,}",
        "headroom_pct": f"{100 / (1 + HEADROOM):.0f}",
    }


def _format(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render(text: str, source: str = "help text") -> str:
    """``text`` with every placeholder filled in (see the module docstring)."""
    figures = values()

    def fill(m: re.Match) -> str:
        kind, name = m.groups()
        if kind == "value":
            if name not in figures:
                raise HelpTextError(f"{source}: {m.group()} names no figure; known: {', '.join(sorted(figures))}")
            return figures[name]
        setting = BY_NAME.get(name)
        if setting is None:
            raise HelpTextError(f"{source}: {m.group()} names no setting")
        if kind == "setting":
            return setting.describe()
        if kind == "auto":
            if not setting.auto:
                raise HelpTextError(f"{source}: {m.group()}: {name} has no automatic choice")
            return setting.auto_help
        return _format(setting.default)

    return _PLACEHOLDER.sub(fill, text)


def getting_started_text() -> str:
    """Getting started, the settings and the curves, as the Help tab shows them."""
    return render(GETTING_STARTED_PATH.read_text(encoding="utf-8"), GETTING_STARTED_PATH.name)
