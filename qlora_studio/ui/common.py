"""What the tabs share: error messages instead of tracebacks, notices, choices, caches.

Nothing here imports gradio, so it can be tested (and reused) without a browser.
"""

from __future__ import annotations

import base64
import functools
import html
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
import threading
import time
from pathlib import Path

from ..errors import StudioError
from ..home import resource_dir, runs_dir, studio_home

log = logging.getLogger("qlora_studio.ui")

# Uploads larger than this are refused (gradio enforces it at upload time too).
MAX_UPLOAD_MB = int(os.environ.get("QLORA_STUDIO_MAX_UPLOAD_MB", "200"))
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")

# The shipped samples (in the package's resources folder), by label.
SAMPLES = {
    "SQL questions over the sample warehouse (assets/sql/train.jsonl)": resource_dir() / "assets" / "sql" / "train.jsonl",
    "Kitchen-assistant chats (assets/chat/train.jsonl)": resource_dir() / "assets" / "chat" / "train.jsonl",
}
# Plotly's "plotly_white" look, only the parts our figures use: the full template is 7 KB of JSON (this one 0.7 KB) in
# every figure, sent and parsed again at each redraw of the live curves.
_AXIS = {"gridcolor": "#EBF0F8", "linecolor": "#EBF0F8", "zerolinecolor": "#EBF0F8", "zerolinewidth": 2, "ticks": "",
         "automargin": True, "title": {"standoff": 15}}
PLOT_TEMPLATE = {
    "layout": {"paper_bgcolor": "white", "plot_bgcolor": "white", "font": {"color": "#2a3f5f"}, "hovermode": "closest",
               "hoverlabel": {"align": "left"}, "title": {"x": 0.05}, "xaxis": _AXIS, "yaxis": _AXIS,
               "colorway": ["#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3"]},
    "data": {"bar": [{"marker": {"line": {"color": "white", "width": 0.5}}}]},
}


def plot_template() -> str:
    """The name of PLOT_TEMPLATE among plotly's templates (registered on first use). A figure takes it by
    name: a dict given to `update_layout` would be merged into plotly's default template, not replace it."""
    import plotly.graph_objects as go
    import plotly.io as pio

    if "qlora_studio" not in pio.templates:
        pio.templates["qlora_studio"] = go.layout.Template(PLOT_TEMPLATE)
    return "qlora_studio"


def typed_array(values) -> dict:
    """Numbers as a plotly typed array (float64, base64): plotly.js reads the curve straight into a
    Float64Array instead of parsing a JSON list. None becomes NaN, which plotly draws as a gap."""
    import array

    arr = array.array("d", (math.nan if v is None else float(v) for v in values))
    if sys.byteorder != "little":  # plotly.js reads little-endian
        arr.byteswap()
    return {"dtype": "f8", "bdata": base64.b64encode(arr.tobytes()).decode("ascii")}


DEFAULT_MODEL = "embedded"
# Models offered in dropdowns (any other Hub id, folder or .gguf can be typed).
MODEL_CHOICES = [
    "embedded",
    "Qwen/Qwen2.5-0.5B-Instruct",
    "Qwen/Qwen2.5-1.5B-Instruct",
    "Qwen/Qwen2.5-3B-Instruct",
    "Qwen/Qwen2.5-7B-Instruct",
    "meta-llama/Llama-3.2-1B-Instruct",
    "meta-llama/Llama-3.1-8B-Instruct",
    "HuggingFaceTB/SmolLM2-360M-Instruct",
]


# ------------------------------------------------------------------ errors as messages


def friendly(e: BaseException) -> str:
    """One line for a person: the core's own message for the errors it raises on purpose (a
    `StudioError`: it names the file, line and field), a short description otherwise. The traceback
    goes to the server log."""
    if isinstance(e, StudioError):
        return e.user_text()
    if isinstance(e, (ValueError, FileNotFoundError, PermissionError)):
        return str(e) or type(e).__name__
    if isinstance(e, MemoryError):
        return "out of memory: close other programs or choose a smaller model, batch or sequence length"
    log.error("unexpected error in the app", exc_info=e)
    return f"unexpected error ({type(e).__name__}: {e}); the details are in the server's log"


def safe(on_error):
    """Decorate an event handler so an exception becomes ``on_error(message)`` (its outputs) instead
    of an error box with a traceback. Works for plain functions and generators."""

    def deco(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen_wrapper(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as e:  # shown in the page as a message
                    yield on_error(friendly(e))

            return gen_wrapper

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # shown in the page as a message
                return on_error(friendly(e))

        return wrapper

    return deco


def esc(text) -> str:
    return html.escape(str(text), quote=True)


def notice(text: str, kind: str = "info") -> str:
    """An HTML notice: kind is info | ok | warn | error."""
    if not text:
        return ""
    lines = "<br>".join(esc(line) for line in str(text).splitlines())
    return f'<div class="qs-notice qs-{kind}" role="status">{lines}</div>'


def gib(n: float | int | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB"


def fmt_size(n: int) -> str:
    """Bytes for people: "812 bytes", "14.2 KB", "3.1 MB"."""
    if n < 1024:
        return f"{n} bytes"
    for unit, scale in (("KB", 2**10), ("MB", 2**20), ("GB", 2**30)):
        if n < 1024 * scale or unit == "GB":
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def fmt_duration(seconds: float | None) -> str:
    if seconds is None or seconds != seconds or seconds < 0:
        return "-"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else (f"{m}m {s:02d}s" if m else f"{s}s")


def fmt_num(x, digits: int = 4) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "-"
    if x != x:
        return "NaN"
    return f"{x:.{digits}g}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.{digits}f}".rstrip("0").rstrip(".")


# ------------------------------------------------------------------ paths


def display_path(path: str | Path | None) -> str:
    """A shipped file relative to the resources folder (``assets/sql/train.jsonl``), anything else as given."""
    if not path:
        return ""
    p = Path(path)
    try:
        return p.resolve().relative_to(resource_dir()).as_posix()
    except (ValueError, OSError):
        return str(path)


def resolve_data_path(text: str) -> Path:
    """A data file the user named: a shipped sample's label, a path relative to the resources folder
    (``assets/sql/train.jsonl``, as `display_path` shows it), a path relative to the working folder,
    or an absolute path. Raises ValueError with what is wrong."""
    text = (text or "").strip()
    if not text:
        raise ValueError("data: no training data chosen (pick a sample or upload a file on the Data tab)")
    if text in SAMPLES:
        return SAMPLES[text]
    p = Path(text).expanduser()
    if not p.is_absolute():
        shipped = resource_dir() / p
        p = shipped if shipped.is_file() else Path.cwd() / p
    if not p.is_file():
        raise ValueError(f"data: {text}: no such file")
    if p.suffix.lower() not in DATA_SUFFIXES:
        raise ValueError(f"data: {text}: unsupported file type {p.suffix or '(none)'}; use {', '.join(DATA_SUFFIXES)}")
    return p


def uploads_dir() -> Path:
    d = studio_home() / "uploads"
    d.mkdir(parents=True, exist_ok=True)
    return d


def keep_upload(tmp_path: str | Path, original_name: str | None = None) -> Path:
    """Copy an uploaded file into the studio's uploads folder under a safe name; refuse big files."""
    src = Path(tmp_path)
    size = src.stat().st_size
    if size > MAX_UPLOAD_MB * 2**20:
        raise ValueError(f"{original_name or src.name}: {size / 2**20:.0f} MB is over the upload limit of "
                         f"{MAX_UPLOAD_MB} MB (set QLORA_STUDIO_MAX_UPLOAD_MB to change it)")
    name = Path(original_name or src.name).name
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(name).stem).strip(".-") or "data"
    suffix = Path(name).suffix.lower()
    if suffix not in DATA_SUFFIXES:
        raise ValueError(f"{name}: unsupported file type {suffix or '(none)'}; use {', '.join(DATA_SUFFIXES)}")
    dest = uploads_dir() / f"{stem[:80]}{suffix}"
    i = 1
    while dest.exists():
        i += 1
        dest = uploads_dir() / f"{stem[:80]}-{i}{suffix}"
    shutil.copyfile(src, dest)
    return dest


def data_choices() -> list[tuple[str, str]]:
    """(label, value) pairs for the data dropdowns: shipped samples, then uploaded files."""
    out = [(label, display_path(p)) for label, p in SAMPLES.items()]
    d = studio_home() / "uploads"
    if d.is_dir():
        for p in sorted(d.iterdir(), key=lambda q: q.stat().st_mtime, reverse=True):
            if p.suffix.lower() in DATA_SUFFIXES:
                out.append((f"uploaded: {p.name}", str(p)))
    return out


def run_folder(name: str):
    """The run folder of a run chosen by name; names are checked so they cannot leave the runs folder."""
    from ..runs import RunError, RunFolder, check_run_name

    path = runs_dir() / check_run_name((name or "").strip())
    if not (path / "config.json").is_file():
        raise RunError(f"{name}: no such run")
    return RunFolder(path)


def read_json(path: Path, default=None):
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return default


def latest_run_path() -> Path | None:
    """The most recently created run folder (cheap: reads status.json only)."""
    root = runs_dir()
    best, best_t = None, -1.0
    for p in root.iterdir():
        if not (p / "config.json").is_file():
            continue
        st = read_json(p / "status.json", {})
        t = (st.get("created_at") or st.get("started_at")) if isinstance(st, dict) else None  # a damaged one: its mtime
        if not isinstance(t, (int, float)):
            try:
                t = (p / "config.json").stat().st_mtime
            except OSError:
                continue
        if t > best_t:
            best, best_t = p, t
    return best


def tail_lines(path: Path, n: int = 14, max_bytes: int = 16384) -> list[str]:
    """The last ``n`` log lines, reading at most ``max_bytes`` from the end (bounded cost).

    Lines of a traceback (which the core writes to train.log) are left out: the page shows the
    one-line error; the log file keeps the details.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - max_bytes))
            chunk = f.read().decode("utf-8", errors="replace")
    except OSError:
        return []
    lines = chunk.splitlines()
    if size > max_bytes and lines:
        lines = lines[1:]  # the first line may be cut
    keep = [ln for ln in lines if re.match(r"^\d\d:\d\d:\d\d ", ln) and "Traceback (most recent call last)" not in ln]
    return keep[-n:]


# ------------------------------------------------------------------ model helpers


_tokenizers: dict[str, object] = {}
_tok_lock = threading.Lock()


def tokenizer_for(model: str):
    """The model's tokenizer with its chat template (cached per model)."""
    from ..models import resolve_model
    from ..loading import load_tokenizer

    spec = (model or DEFAULT_MODEL).strip()
    with _tok_lock:
        if spec not in _tokenizers:
            _tokenizers[spec] = load_tokenizer(resolve_model(spec).path)
        return _tokenizers[spec]


class ModelCache:
    """Chat models kept loaded between messages (at most ``size``; the oldest is dropped)."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: dict[str, tuple[object, object, float]] = {}
        self._lock = threading.Lock()

    def get(self, path: Path):
        from ..chat import load_chat_model

        key = str(Path(path).resolve())
        with self._lock:
            if key in self._items:
                model, tok, _ = self._items[key]
                self._items[key] = (model, tok, time.time())
                return model, tok
            while len(self._items) >= self.size:
                oldest = min(self._items, key=lambda k: self._items[k][2])
                del self._items[oldest]
            model, tok = load_chat_model(path)
            self._items[key] = (model, tok, time.time())
            return model, tok

    def drop(self, path: Path) -> None:
        with self._lock:
            self._items.pop(str(Path(path).resolve()), None)


chat_models = ModelCache()
