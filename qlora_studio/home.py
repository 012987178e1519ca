"""Where the studio's files are: the ones it ships (presets, sample data) and the ones it keeps (runs,
converted models, per-machine calibration)."""

from __future__ import annotations

import os
from pathlib import Path


def resource_dir() -> Path:
    """The files shipped inside the package (read-only): ``presets/*.yaml`` and the sample data in
    ``assets/`` (``assets/sql``: the text-to-SQL task; ``assets/chat``: kitchen-assistant chats)."""
    return Path(__file__).resolve().parent / "resources"


def studio_home() -> Path:
    """The studio's home folder: ``$QLORA_STUDIO_HOME``, or a per-user folder."""
    env = os.environ.get("QLORA_STUDIO_HOME")
    if env:
        home = Path(env).expanduser()
    elif os.name == "nt":
        home = Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "qlora-studio"
    else:
        home = Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "qlora-studio"
    home.mkdir(parents=True, exist_ok=True)
    return home


def runs_dir() -> Path:
    d = studio_home() / "runs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def models_dir() -> Path:
    d = studio_home() / "models"
    d.mkdir(parents=True, exist_ok=True)
    return d
