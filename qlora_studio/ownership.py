"""Who owns a run: one live process trains a run folder, one run trains on a device.

Two locks, both advisory locks on a file (``fcntl.flock``) held by the owning process for as long as
it trains:
- the **run lock**, ``<run>/.owner.lock``: only its holder writes the run's checkpoints, metrics and
  status. Another process (the app, a second CLI) may watch the run, never resume or delete it.
- the **device lock**, ``<studio home>/locks/<device>.lock``: one training run per GPU (or on the
  CPU) across every process on this studio home, unless the user asks for more (``--allow-parallel``).

The kernel drops a process's locks when it ends, however it ends (kill -9 included), so there are no
stale locks to clean up. The file's content (pid, host, run, time) only names the holder in messages.
Where ``fcntl`` does not exist (Windows), a lock is held while its file names a live pid.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from .errors import StudioError
from .home import studio_home

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

RUN_LOCK = ".owner.lock"


class OwnedElsewhere(StudioError):
    """A run, or the device it needs, is held by another live process."""


class Lock:
    """One lock file. ``acquire`` never waits: it takes the lock or says who holds it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, **info) -> dict | None:
        """Take the lock, recording ``info`` (plus pid, host and time) in the file. Returns None when
        taken, else the holder's record (its pid, host, run...)."""
        if self._fd is not None:
            return None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        if not self._lock(fd):
            os.close(fd)
            return self._read() or {"pid": None}
        record = dict(info, pid=os.getpid(), host=socket.gethostname(), since=time.time())
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        except OSError:  # a full disk must not cost the lock: the record is only for messages
            pass
        self._fd = fd
        return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        try:
            os.ftruncate(fd, 0)
        except OSError:
            pass
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def holder(self) -> dict | None:
        """Who holds the lock (this process included, through another `Lock` object), or None."""
        if self._fd is not None:
            return self._read()
        if not self.path.exists():
            return None
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:
            return None
        try:
            if self._lock(fd):
                if fcntl is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                return None
        finally:
            os.close(fd)
        return self._read() or {"pid": None}

    # -- internals
    def _lock(self, fd: int) -> bool:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False
        record = self._read()  # no flock: held while the recorded pid lives on this host
        return not (record and record.get("host") == socket.gethostname() and pid_alive(record.get("pid")))

    def _read(self) -> dict | None:
        try:
            record = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None


def pid_alive(pid) -> bool:
    """Whether a process of this machine has that pid (one another user owns counts). Anything that is not
    a positive int -- a bool, None, 0 and negatives (which name process groups) -- names no process."""
    if isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OSError, OverflowError):
        return False
    return True


def run_lock(run_path: Path) -> Lock:
    return Lock(Path(run_path) / RUN_LOCK)


def device_lock(device: str) -> Lock:
    """The lock of one device ("cuda:0", "cpu") on this studio home."""
    safe = "".join(c if c.isalnum() else "-" for c in device)
    return Lock(studio_home() / "locks" / f"{safe}.lock")


def describe(holder: dict) -> str:
    """"process 1234 on this machine", for messages."""
    pid = holder.get("pid")
    host = holder.get("host")
    where = "this machine" if host in (None, socket.gethostname()) else str(host)
    return f"process {pid if pid else '?'} on {where}"


def run_owner(run_path: Path) -> dict | None:
    """The record of the live process training this run folder, or None."""
    return run_lock(run_path).holder()
