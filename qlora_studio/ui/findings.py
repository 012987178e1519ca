"""The findings panel: `qlora_studio.diagnose` over a run, kept current while the page watches.

- during a run, an incremental ``Diagnoser`` is fed only the records each poll adds (plus the data
  findings and an out-of-memory recovery from the status);
- when the run has finished, ``diagnose(records, config=, status=, summary=, data_report=)`` runs
  once on everything, with the summary.

Both see the run's settings as they ran (`diagnose.settings_view`: config.json with plan.json's
resolved micro-batch, device, precision and length). Each finding is shown with its fixes in the order
to try them; a fix that changes settings can be applied from the Train tab as a new run
(`RunManager.apply_fix`).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .. import diagnose
from ..runs import read_metrics_from
from .common import esc, read_json

log = logging.getLogger("qlora_studio.ui")

FINAL_STATES = ("completed", "stopped", "failed", "interrupted")


def guide_text() -> str:
    """The troubleshooting guide (qlora_studio/guide.md), for the Help tab."""
    return diagnose.GUIDE_PATH.read_text(encoding="utf-8")


class RunDiagnosis:
    """Findings of one run, kept current as its metrics arrive (shared by every page watching it).

    While the run trains, a `diagnose.Diagnoser` is fed only the records appended since the last
    poll (it keeps its own offset into metrics.jsonl, so any number of pages can poll); the data
    findings come from data_report.json once it exists. When the run has finished, `diagnose` runs
    once over everything, with the status and the summary (out-of-memory, an under-used card).
    """

    def __init__(self, run_path: Path):
        self.path = Path(run_path)
        self.findings: list = []
        self.version = 0
        self._lock = threading.Lock()
        self._diagnoser = None
        self._offset = 0
        self._inode = None
        self._data: list | None = None
        self._final_key = None

    def _settings(self) -> dict:
        return diagnose.settings_view(read_json(self.path / "config.json", {}), read_json(self.path / "plan.json", {}))

    def _set(self, findings) -> None:
        findings = list(findings or [])
        if [f.to_dict() for f in findings] != [f.to_dict() for f in self.findings]:
            self.findings = findings
            self.version += 1

    def update(self, status: dict) -> list:
        with self._lock:
            try:
                self._update(status)
            except Exception as e:  # diagnosis must never break the live view
                log.warning("diagnosis failed on %s: %s", self.path.name, e)
            return self.findings

    def _update(self, status: dict) -> None:
        metrics = self.path / "metrics.jsonl"
        state = status.get("state")
        if state in FINAL_STATES:
            key = (state, status.get("finished_at"), status.get("updated_at"))
            if key != self._final_key:
                self._final_key = key
                records, _ = read_metrics_from(metrics)
                self._set(diagnose.diagnose(records, config=self._settings(), status=status,
                                            summary=read_json(self.path / "summary.json"),
                                            data_report=read_json(self.path / "data_report.json")))
            return
        self._final_key = None
        try:
            st = os.stat(metrics)
            size, inode = st.st_size, st.st_ino
        except FileNotFoundError:
            size, inode = 0, None
        if self._diagnoser is None or (self._inode is not None and inode != self._inode) or size < self._offset:
            self._diagnoser = diagnose.Diagnoser(self._settings())
            self._offset = 0  # a new run, or a resume that rewrote the metrics: start over
        self._inode = inode
        if size > self._offset:
            records, self._offset = read_metrics_from(metrics, self._offset)
            self._diagnoser.add_all(records)
        if self._data is None and (self.path / "data_report.json").is_file():
            self._data = diagnose.data_findings(read_json(self.path / "data_report.json"), self._settings())
        self._set((self._data or []) + list(self._diagnoser.findings) + diagnose.oom_findings(status, self._settings()))


_diagnoses: dict[str, RunDiagnosis] = {}
_diag_lock = threading.Lock()


def run_diagnosis(run_path: Path) -> RunDiagnosis:
    key = str(run_path)
    with _diag_lock:
        if key not in _diagnoses:
            if len(_diagnoses) > 32:
                _diagnoses.clear()
            _diagnoses[key] = RunDiagnosis(Path(run_path))
        return _diagnoses[key]


def _as_dict(finding) -> dict:
    return finding if isinstance(finding, dict) else finding.to_dict()


SEVERITY_CLASS = {"error": "error", "warning": "warn", "info": "info"}


def _changes_text(changes: dict) -> str:
    return ", ".join(f"{k} → {v}" for k, v in (changes or {}).items())


def findings_html(findings: list | None, running: bool = False) -> str:
    """The findings panel: one card per finding (severity, what, at which step) with its fixes in the
    order to try them."""
    if not findings:
        what = "nothing found so far" if running else "no findings: nothing looks wrong"
        return f'<div class="qs-findings qs-muted">{esc(what)}</div>'
    cards = []
    for f in findings:
        d = _as_dict(f)
        sev = str(d.get("severity") or "info").lower()
        kind = d.get("kind") or "finding"
        step = d.get("step")
        head = (f'<div class="qs-finding-title"><span class="qs-sev">{esc(sev)}</span> {esc(kind)}'
                + (f' <span class="qs-muted">at step {esc(step)}</span>' if step else "") + "</div>")
        body = f"<div>{esc(d.get('message') or d.get('title') or '')}</div>"
        fixes = []
        for fx in d.get("fixes") or []:
            fx = _as_dict(fx)
            changes = _changes_text(fx.get("changes"))
            fixes.append(f"<li><b>{esc(fx.get('title', ''))}</b>" + (f" <code>{esc(changes)}</code>" if changes else "")
                         + (f' <span class="qs-muted">{esc(fx["why"])}</span>' if fx.get("why") else "") + "</li>")
        fix_html = f'<ol class="qs-fix">{"".join(fixes)}</ol>' if fixes else ""
        cards.append(f'<div class="qs-notice qs-{SEVERITY_CLASS.get(sev, "info")} qs-finding">{head}{body}{fix_html}</div>')
    return '<div class="qs-findings">' + "".join(cards) + "</div>"


def fix_choices(findings: list | None) -> list[tuple[str, str]]:
    """(label, "kind|step|index") for every fix that changes settings (a new run can apply it)."""
    out = []
    for f in findings or []:
        d = _as_dict(f)
        for i, fx in enumerate(d.get("fixes") or [], 1):
            fx = _as_dict(fx)
            if fx.get("changes"):
                where = f"at step {d.get('step')}" if d.get("step") else "(before training)"
                out.append((f"{d.get('kind')} {where}: {fx.get('title')} ({_changes_text(fx['changes'])})",
                            f"{d.get('kind')}|{d.get('step')}|{i}"))
    return out
