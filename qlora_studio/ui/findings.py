"""The findings panel and the Help tab's guide, from `qlora_studio.diagnose` when this build has it.

The diagnosis module (detectors, the troubleshooting guide) is separate work; the app holds no
detectors of its own. When ``qlora_studio.diagnose`` cannot be imported, both places say
"diagnosis not available in this build". When it can:

- during a run, an incremental ``Diagnoser`` (if the module has one) is fed only the records each
  poll adds; without one, ``diagnose(records, config=, status=, summary=, data_report=)`` runs at
  most every ``FULL_EVERY_S`` seconds;
- when the run has finished, ``diagnose(...)`` runs once more on everything, with the summary.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import threading
import time
from pathlib import Path

from .common import esc, read_json

log = logging.getLogger("qlora_studio.ui")

NOT_AVAILABLE = "diagnosis not available in this build"
FULL_EVERY_S = 15.0
FINAL_STATES = ("completed", "stopped", "failed", "interrupted")


def diagnosis_module():
    """``qlora_studio.diagnose``, or None when this build has no diagnosis (or it fails to import)."""
    try:
        return importlib.import_module("qlora_studio.diagnose")
    except ModuleNotFoundError as e:
        if e.name != "qlora_studio.diagnose":
            log.warning("qlora_studio.diagnose cannot be imported: %s", e)
        return None
    except Exception as e:  # a broken module must not take the app down
        log.warning("qlora_studio.diagnose failed to import: %s", e)
        return None


def guide_text() -> str | None:
    """The troubleshooting guide (qlora_studio/guide.md) when diagnosis is available."""
    mod = diagnosis_module()
    if mod is None:
        return None
    for candidate in (getattr(mod, "GUIDE_PATH", None), Path(mod.__file__).with_name("guide.md")):
        if candidate and Path(candidate).is_file():
            return Path(candidate).read_text(encoding="utf-8")
    text = getattr(mod, "guide", None)
    if callable(text):
        try:
            return str(text())
        except Exception as e:
            log.warning("diagnose.guide() failed: %s", e)
    return None


def _call_with_known_kwargs(fn, *args, **kwargs):
    """Call ``fn`` with only the keyword arguments its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


class RunDiagnosis:
    """Findings of one run, kept current as its metrics arrive."""

    def __init__(self, mod, run_path: Path):
        self.mod = mod
        self.path = Path(run_path)
        self.findings: list = []
        self.version = 0
        self._incremental = None
        self._feed = None
        self._last_full = 0.0
        self._final_done = False
        self._lock = threading.Lock()
        cls = getattr(mod, "Diagnoser", None)
        if cls is not None:
            try:
                self._incremental = _call_with_known_kwargs(cls, config=self._config(), data_report=self._data_report())
                for name in ("update", "feed", "add", "observe"):
                    if callable(getattr(self._incremental, name, None)):
                        self._feed = getattr(self._incremental, name)
                        break
            except Exception as e:
                log.warning("diagnose.Diagnoser could not be set up: %s", e)
                self._incremental = None

    def _config(self) -> dict:
        return read_json(self.path / "config.json", {}) or {}

    def _data_report(self) -> dict | None:
        return read_json(self.path / "data_report.json")

    def _set(self, findings) -> None:
        findings = list(findings or [])
        if findings != self.findings:
            self.findings = findings
            self.version += 1

    def update(self, new_records: list[dict], status: dict) -> list:
        """Feed the records a poll added; run the full diagnosis once the run has finished."""
        with self._lock:
            try:
                state = status.get("state")
                if state in FINAL_STATES:
                    if not self._final_done:
                        self._final_done = True
                        self._full(status)
                    return self.findings
                self._final_done = False
                if self._feed is not None:
                    if new_records:
                        out = self._feed(new_records)
                        if out is None:
                            out = getattr(self._incremental, "findings", None)
                            out = out() if callable(out) else out
                        if out is not None:
                            self._set(out)
                elif new_records and time.time() - self._last_full >= FULL_EVERY_S:
                    self._full(status)
            except Exception as e:  # diagnosis must never break the live view
                log.warning("diagnosis failed on %s: %s", self.path.name, e)
            return self.findings

    def _full(self, status: dict) -> None:
        from ..runs import read_metrics_from

        self._last_full = time.time()
        records, _ = read_metrics_from(self.path / "metrics.jsonl")
        summary = read_json(self.path / "summary.json")
        out = _call_with_known_kwargs(self.mod.diagnose, records, config=self._config(), status=status,
                                      summary=summary, data_report=self._data_report())
        self._set(out)


_diagnoses: dict[str, RunDiagnosis] = {}
_diag_lock = threading.Lock()


def run_diagnosis(run_path: Path) -> RunDiagnosis | None:
    mod = diagnosis_module()
    if mod is None:
        return None
    key = str(run_path)
    with _diag_lock:
        if key not in _diagnoses:
            if len(_diagnoses) > 32:
                _diagnoses.clear()
            _diagnoses[key] = RunDiagnosis(mod, Path(run_path))
        return _diagnoses[key]


def _as_dict(finding) -> dict:
    if isinstance(finding, dict):
        return finding
    to_dict = getattr(finding, "to_dict", None)
    if callable(to_dict):
        try:
            return dict(to_dict())
        except Exception:
            pass
    if dataclasses.is_dataclass(finding):
        return dataclasses.asdict(finding)
    if hasattr(finding, "__dict__"):
        return dict(vars(finding))
    return {"title": str(finding)}


def _first(d: dict, *keys):
    for k in keys:
        v = d.get(k)
        if v not in (None, "", [], {}):
            return v
    return None


SEVERITY_CLASS = {"error": "error", "critical": "error", "high": "error", "warning": "warn", "warn": "warn",
                  "medium": "warn", "info": "info", "low": "info", "ok": "ok"}


def findings_html(findings: list | None, available: bool = True, running: bool = False) -> str:
    """The findings panel: one card per finding (severity, what, why, what to do)."""
    if not available:
        return f'<div class="qs-findings qs-muted">{esc(NOT_AVAILABLE)}</div>'
    if not findings:
        what = "nothing found so far" if running else "no findings"
        return f'<div class="qs-findings qs-muted">{esc(what)}</div>'
    cards = []
    for f in findings:
        d = _as_dict(f)
        sev = str(_first(d, "severity", "level", "kind") or "info").lower()
        title = _first(d, "title", "summary", "name", "message", "code") or "finding"
        detail = _first(d, "detail", "explanation", "why", "evidence", "description")
        if detail == title:
            detail = None
        fix = _first(d, "fix", "advice", "suggestion", "action", "what_to_do", "remedy")
        step = _first(d, "step", "at_step")
        parts = [f'<div class="qs-finding-title"><span class="qs-sev">{esc(sev)}</span> {esc(title)}'
                 + (f' <span class="qs-muted">(step {esc(step)})</span>' if step is not None else "") + "</div>"]
        if detail:
            parts.append(f"<div>{esc(detail)}</div>")
        if fix:
            parts.append(f'<div class="qs-fix">What to do: {esc(fix)}</div>')
        cards.append(f'<div class="qs-notice qs-{SEVERITY_CLASS.get(sev, "info")}">{"".join(parts)}</div>')
    return '<div class="qs-findings">' + "".join(cards) + "</div>"
