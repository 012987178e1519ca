"""Run folders: everything a run leaves on disk, written so that nothing is ever half-written.

A run folder under ``<studio home>/runs/<name>/`` holds:
- ``config.json``   the settings as the user gave them (plus the data's sha256 and, for a fix, its lineage)
- ``plan.json``     what ran: the resolved `RunPlan`, the schedule, the model's path and size, and every
                    change made while training (out-of-memory recoveries, packing turned off)
- ``status.json``   state (running | completed | stopped | failed | interrupted), error, pid, times
- ``metrics.jsonl`` one JSON line per logging step ({"type": "train", ...}) or evaluation ({"type": "eval", ...})
- ``summary.json``  runtime, non-pad tokens, tokens/s, peak memory, ``eval`` (the final eval loss), ``golden``
                    and ``best`` (the golden prompts' cost; the best step and why), ``task_eval`` (`taskeval`)
- ``heldout.json``  the data file's lines held out from training; ``golden.json`` and ``samples.jsonl``: the
                    golden prompts and their answers at each evaluation (`golden`); ``eval.json`` and
                    ``eval_cache/``: the last task evaluation and the base model's cached answers (`taskeval`)
- ``checkpoints/checkpoint-<step>/`` (see `RunFolder.checkpoints`), ``adapter/``, ``merged/``

JSON files are replaced atomically (write a temporary file, fsync, rename). metrics.jsonl is only
appended to, and a reader ignores a last line cut short by a crash. A folder whose status says
"running" but whose process is gone is reported as "interrupted" and can be resumed from its last
checkpoint.

Each run is read on its own: a file that cannot be read as what it should hold (not JSON, not an
object, a value of the wrong type; see `read_run_file`) raises `DamagedRunFile` naming the file, and
`list_runs` shows that run as "damaged" (its error: ``damaged: <file>: <what>``) next to the others.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .diskspace import is_disk_full, release_reserve
from .errors import StudioError
from .home import runs_dir
from .ownership import RUN_LOCK, describe, pid_alive, run_owner

STATES = ("running", "completed", "stopped", "failed", "interrupted")
LISTED_STATES = STATES + ("damaged",)  # what a listing can show: "damaged" is read, never written
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class RunError(StudioError):
    """A run folder is missing, unreadable, or a name is not acceptable."""


def atomic_write_json(path: Path, obj) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DamagedRunFile(RunError):
    """A run's file exists but does not hold what it should; ``why`` is ``damaged: <file>: <what>``."""

    def __init__(self, path: Path, what: str):
        self.path = Path(path)
        label = f"damaged: {self.path.name}: {what}"
        super().__init__(f"{self.path.parent.name}: {label}", field=self.path.name, why=label,
                         hint=f"repair or remove {self.path}, or delete the run")


def read_json(path: Path, default=None):
    """A JSON file, or ``default`` when it is missing or cannot be read as JSON (of any shape)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return default


# What the readers of each run file count on: key -> type (float: any number; None is always allowed).
_FILE_TYPES = {
    "config.json": {"model": str, "data": str, "learning_rate": float, "epochs": float, "batch_size": int,
                    "grad_accum": int, "max_seq_len": int, "max_steps": int},
    "status.json": {"state": str, "pid": int, "host": str, "error": str, "error_kind": str, "phase": str,
                    "created_at": float, "started_at": float, "updated_at": float, "finished_at": float,
                    "step": int, "max_steps": int, "total_steps": int, "recoveries": list},
    "summary.json": {"final_loss": float, "first_loss": float, "train_runtime_s": float, "tokens_per_s": float,
                     "global_step": int, "eval": dict, "task_eval": dict, "peak_memory": dict},
}
_TYPE_WORDS = {str: "text", float: "a number", int: "a whole number", dict: "an object", list: "a list"}


def _type_ok(value, want: type) -> bool:
    if value is None:
        return True
    if isinstance(value, bool):
        return want is bool
    if want is float:
        return isinstance(value, (int, float))
    return isinstance(value, want)


def _shape(doc) -> str:
    return {list: "a list", str: "text", bool: "true/false", type(None): "null"}.get(type(doc), "a number")


def read_run_file(path: Path) -> dict | None:
    """A run's JSON file (config.json, status.json, summary.json, ...) as a dict; None when it does not
    exist. Raises `DamagedRunFile` when it cannot be read, is not UTF-8 JSON, is not an object, or holds a
    value of another type than its readers count on (`_FILE_TYPES`)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise DamagedRunFile(path, f"cannot be read ({e.strerror or e})") from e
    if not raw.strip():
        raise DamagedRunFile(path, "empty")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DamagedRunFile(path, "not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise DamagedRunFile(path, f"not valid JSON ({e.msg}, line {e.lineno})") from None
    except (ValueError, RecursionError) as e:
        raise DamagedRunFile(path, f"not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise DamagedRunFile(path, f"holds {_shape(doc)}, not a JSON object")
    for key, want in _FILE_TYPES.get(path.name, {}).items():
        if not _type_ok(doc.get(key), want):
            raise DamagedRunFile(path, f"{key} must be {_TYPE_WORDS[want]}, not {json.dumps(doc[key])[:40]}")
    if path.name == "status.json" and doc.get("state") not in (None, *STATES):
        raise DamagedRunFile(path, f"state must be one of {', '.join(STATES)}, not {json.dumps(doc['state'])[:40]}")
    if path.name == "status.json" and not all(isinstance(r, dict) for r in doc.get("recoveries") or []):
        raise DamagedRunFile(path, "recoveries must be a list of objects")
    if path.name == "summary.json" and not _type_ok((doc.get("eval") or {}).get("eval_loss"), float):
        raise DamagedRunFile(path, f"eval.eval_loss must be a number, not {json.dumps(doc['eval']['eval_loss'])[:40]}")
    return doc


def check_run_name(name: str) -> str:
    """A run name is a single folder name: letters, digits, '.', '_' and '-' only."""
    if not _NAME_OK.match(name or "") or name in (".", ".."):
        raise RunError(f"{name!r} is not a valid run name: use letters, digits, '.', '_' or '-' (at most 100), no slashes")
    return name


def _slug(text: str, limit: int = 24) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "-", Path(str(text)).stem).strip("-").lower()
    return s[:limit].strip("-") or "x"


def new_run_dir(model: str, data: str, name: str | None = None, root: Path | None = None) -> Path:
    root = root or runs_dir()
    if name:
        run = root / check_run_name(name)
        if run.exists():
            raise RunError(f"a run named {name!r} already exists in {root}")
    else:
        base = f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(model)}-{_slug(data)}"
        run, i = root / base, 1
        while run.exists():
            i += 1
            run = root / f"{base}-{i}"
    run.mkdir(parents=True)
    return run


def resolve_run(run: str | Path, root: Path | None = None) -> Path:
    """A run given by folder path or by name under the runs folder."""
    p = Path(run).expanduser()
    if not p.is_dir():
        p = (root or runs_dir()) / check_run_name(str(run))
    if not (p / "config.json").is_file():
        raise RunError(f"{run}: no such run (no config.json in {p})")
    return p


class RunFolder:
    """Read and write one run folder. ``writer=False``: a run's other processes (ranks 1..N-1 of a
    multi-process run) read it, and their writes of the run's files do nothing -- rank 0 writes them once."""

    def __init__(self, path: Path, writer: bool = True):
        self.path = Path(path)
        self.writer = writer

    # paths
    @property
    def name(self) -> str:
        return self.path.name

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    # config
    def write_config(self, config: dict) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / "config.json", config)

    def config(self) -> dict:
        """config.json; `RunError` when it is missing, `DamagedRunFile` when it cannot be read."""
        cfg = read_run_file(self.path / "config.json")
        if cfg is None:
            raise RunError(f"{self.path / 'config.json'}: missing")
        return cfg

    # plan
    def write_plan(self, plan: dict) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / "plan.json", plan)

    def plan(self) -> dict:
        """plan.json: {"plan": RunPlan dict, "schedule": ..., "model": ..., "adjustments": [...]}, or {}."""
        doc = read_json(self.path / "plan.json", {})
        return doc if isinstance(doc, dict) else {}

    def update_plan(self, **fields) -> dict:
        doc = self.plan()
        doc.update(fields)
        self.write_plan(doc)
        return doc

    # status
    def set_status(self, state: str, **fields) -> dict:
        assert state in STATES, state
        status = read_json(self.path / "status.json", {})
        status = dict(status) if isinstance(status, dict) else {}  # a damaged one is replaced, not kept
        status.update(fields)
        status["state"] = state
        status["updated_at"] = time.time()
        if state == "running":
            status["pid"] = os.getpid()
            status["host"] = socket.gethostname()
            status.pop("error", None)
        if not self.writer:
            return status
        try:
            atomic_write_json(self.path / "status.json", status)
        except OSError as e:  # a full disk: give up the folder's reserve so the status can still be written
            if not (is_disk_full(e) and release_reserve(self.path)):
                raise
            atomic_write_json(self.path / "status.json", status)
        return status

    def status(self, live_pids: set[int] | None = None) -> dict:
        """The recorded status; "running" with its process gone reads as "interrupted".

        ``live_pids`` lets the owner of the run in this process vouch for it: a status written by
        this very process is running only if the run manager says so. `DamagedRunFile` when
        status.json cannot be read.
        """
        status = read_run_file(self.path / "status.json") or {"state": "interrupted", "error": "no status.json"}
        if status.get("state") == "running":
            pid = status.get("pid")
            same_host = status.get("host") in (None, socket.gethostname())
            if pid == os.getpid():
                alive = live_pids is not None and pid in live_pids
            elif (self.path / RUN_LOCK).exists():  # the owner's lock: held exactly while it lives
                alive = run_owner(self.path) is not None
            else:  # a folder from before run locks
                alive = pid_alive(pid) if same_host else True
            if not alive:
                status = dict(status, state="interrupted",
                              error=status.get("error") or "the process running it ended before it finished")
        return status

    # metrics
    def append_metrics(self, record: dict) -> None:
        if not self.writer:
            return
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_json_number) + "\n")
            f.flush()

    def metrics(self, start: int = 0) -> list[dict]:
        """Metric records from byte offset ``start``; see `read_metrics_from` for incremental reads."""
        return read_metrics_from(self.metrics_path, start)[0]

    # summary
    def write_summary(self, summary: dict) -> None:
        if not self.writer:
            return
        atomic_write_json(self.path / "summary.json", summary)

    def summary(self) -> dict:
        """summary.json, {} when there is none; `DamagedRunFile` when it cannot be read."""
        return read_run_file(self.path / "summary.json") or {}

    def has_final_results(self) -> bool:
        """Whether training reached its end: the adapter was saved, or a summary written (even one that
        cannot be read) -- what a completed (or stopped) run leaves, and no run that still has to train."""
        return (self.adapter / "adapter_config.json").is_file() or (self.path / "summary.json").exists()

    def checkpoints(self, complete: bool = True) -> list[tuple[int, Path]]:
        """(step, folder) of the run's checkpoints, oldest first. ``complete``: only those whose save
        finished -- a process killed while saving leaves a folder without its trainer_state.json (the
        Trainer writes it last), which is no checkpoint."""
        if not self.checkpoints_dir.is_dir():
            return []
        found = []
        for p in self.checkpoints_dir.iterdir():
            step = checkpoint_step(p)
            if step is not None and p.is_dir() and (not complete or _saved_whole(p)):
                found.append((step, p))
        return sorted(found)

    def remove_torn_checkpoints(self) -> list[str]:
        """Delete checkpoint folders whose save never finished (a crash, a full disk); their names."""
        whole = {p for _, p in self.checkpoints()}
        torn = [p for _, p in self.checkpoints(complete=False) if p not in whole]
        for p in torn:
            shutil.rmtree(p, ignore_errors=True)
        return [p.name for p in torn]

    def last_checkpoint(self) -> Path | None:
        """The newest complete checkpoint."""
        found = self.checkpoints()
        return found[-1][1] if found else None

    def delete(self) -> None:
        """Delete the folder; refused while a process trains it."""
        owner = run_owner(self.path)
        if owner is not None:
            raise RunError(f"{self.name} is training ({describe(owner)}); stop it before deleting it")
        shutil.rmtree(self.path)


def _saved_whole(checkpoint: Path) -> bool:
    """The Trainer writes trainer_state.json last: a checkpoint is whole when that file is there and
    complete (a disk that filled up while writing it leaves it cut short)."""
    try:
        return isinstance(json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def checkpoint_step(path: Path | str) -> int | None:
    """The step of a ``checkpoint-<step>`` folder name; None for any other name."""
    name = Path(path).name
    step = name.removeprefix("checkpoint-")
    return int(step) if name.startswith("checkpoint-") and step.isdigit() else None


def _json_number(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def read_metrics_from(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Records appended since byte ``offset``, and the offset to continue from.

    Reading only the new tail keeps a live view's cost independent of the run's length. A last line
    without its newline (being written, or cut by a crash) is left for the next read. Lines that are not
    a UTF-8 JSON object (garbage written by a crash or by hand, ``[1]``, ``"x"``) are skipped: every
    record returned is a dict.
    """
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
    except FileNotFoundError:
        return [], offset
    records, consumed = [], 0
    for raw in chunk.split(b"\n")[:-1]:
        consumed += len(raw) + 1
        try:
            record = json.loads(raw.decode("utf-8"))  # NaN/Infinity are kept as floats
        except (ValueError, RecursionError):  # not UTF-8, not JSON
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + consumed


@dataclass
class RunRecord:
    name: str
    path: str
    state: str  # one of LISTED_STATES
    model: str
    data: str
    created_at: float
    final_loss: float | None
    eval_loss: float | None
    runtime_s: float | None
    error: str | None
    resumable: bool

    @classmethod
    def from_folder(cls, folder: RunFolder, live_pids: set[int] | None = None) -> "RunRecord":
        """The run as a listing shows it. Each file is read on its own: one that cannot be read makes
        the run "damaged" (its error names the file), and what the other files say is still shown."""
        damaged = []

        def read(reader, default):
            try:
                return reader()
            except DamagedRunFile as e:
                damaged.append(e)
                return default

        status = read(lambda: folder.status(live_pids), {})
        cfg = read(folder.config, {})
        summary = read(folder.summary, {})
        state = status.get("state", "interrupted")
        resumable = state in ("interrupted", "stopped", "failed")
        if damaged:  # resumable only when status.json alone is damaged and the run has not reached its end
            resumable = [e.path.name for e in damaged] == ["status.json"] and not folder.has_final_results()
            state = "damaged"
        try:
            mtime = folder.path.stat().st_mtime
        except OSError:
            mtime = 0.0
        return cls(
            name=folder.name,
            path=str(folder.path),
            state=state,
            model=str(cfg.get("model") or "?"),
            data=str(cfg.get("data") or "?"),
            created_at=float(status.get("started_at") or mtime),
            final_loss=summary.get("final_loss"),
            eval_loss=(summary.get("eval") or {}).get("eval_loss"),
            runtime_s=summary.get("train_runtime_s"),
            error="; ".join(e.why for e in damaged) if damaged else status.get("error"),
            resumable=resumable and folder.last_checkpoint() is not None,
        )


def list_runs(root: Path | None = None, live_pids: set[int] | None = None) -> list[RunRecord]:
    """Every run under ``root``, newest first; a run whose files cannot be read is listed as "damaged"."""
    root = root or runs_dir()
    records = []
    for p in sorted(root.iterdir()) if root.is_dir() else []:
        if p.is_dir() and (p / "config.json").is_file():
            records.append(RunRecord.from_folder(RunFolder(p), live_pids))
    records.sort(key=lambda r: r.created_at, reverse=True)
    return records
