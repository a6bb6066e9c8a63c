"""One refresh per registry at a time, clean stops between steps, disk-space checks, and the
test hook that makes a refresh kill itself at a named step.

Lock: ``fcntl.flock`` on ``REGISTRY/refresh.lock`` (exclusive, non-blocking).  The file holds
the holder's pid, host, start time and command line, for the message the second refresh prints.
A lock left by a dead process is not a problem to solve: the kernel releases an flock when its
holder's file descriptor closes, which happens when the process dies (even by SIGKILL).  The
next refresh therefore simply acquires it, finds the old holder's pid still written inside, and
says that it took over a stale lock.  (flock is advisory and local: keep the registry on a local
disk, not NFS, if two machines could run refresh on it.)
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

from semivit.errors import UserError
from semivit.utils import info, warn

EXIT_LOCKED = 3  # another refresh holds the registry's lock
EXIT_LOW_DISK = 4  # not enough free disk space: nothing was changed
KILL_ENV = "SEMIVIT_TEST_KILL_AT"


class RegistryBusy(UserError):
    exit_code = EXIT_LOCKED


class LowDiskSpace(UserError):
    exit_code = EXIT_LOW_DISK


class StopRequested(BaseException):
    """SIGINT/SIGTERM arrived: raised at once, from the signal handler, wherever the refresh is.
    That is safe because every step already survives a SIGKILL at any point (and here the
    ``finally`` blocks still run: temporary files removed, the lock released).  A BaseException,
    like KeyboardInterrupt, so that no ``except Exception`` on the way (one bad file must not
    stop the others...) can swallow it."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FileLock:
    """``with FileLock(path, what):`` - exclusive flock, or :class:`RegistryBusy` at once."""

    def __init__(self, path: Path, what: str = "refresh", blocking: bool = False):
        self.path = Path(path)
        self.what = what
        self.blocking = blocking
        self.fd: Optional[int] = None
        self.previous: dict = {}

    def __enter__(self) -> "FileLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
                   if holder else "another process")
            raise RegistryBusy(f"another {self.what} is running on {self.path.parent} ({who}); "
                               f"not starting a second one (lock {self.path})") from None
        self.fd = fd
        self.previous = _read_holder(fd)
        if self.previous and self.previous.get("pid") != os.getpid():
            alive = _pid_alive(int(self.previous.get("pid", 0) or 0))
            warn(f"took over a stale {self.what} lock from pid {self.previous.get('pid')} "
                 f"(started {self.previous.get('started')}; "
                 f"{'pid now reused by another process' if alive else 'no longer running'}): "
                 "the kernel released its flock when it died")
        doc = {"pid": os.getpid(), "host": socket.gethostname(),
               "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(doc) + "\n").encode(), 0)
        os.fsync(fd)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)  # an empty lock file = released cleanly
            finally:
                fcntl.flock(self.fd, fcntl.LOCK_UN)
                os.close(self.fd)
                self.fd = None


def _read_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        return json.loads(raw) if raw else {}
    except (OSError, ValueError):
        return {}


# ---------------------------------------------------------------- clean stops between steps

class StopFlag:
    """Installs SIGINT/SIGTERM handlers that stop the refresh promptly: the handler raises
    :class:`StopRequested` in the main thread, which unwinds whatever it was doing (a training
    epoch, a decode, a wait) through its ``finally`` blocks, so the lock is released and nothing
    half-written stays visible within moments -- what systemd's ``TimeoutStopSec`` or
    ``timeout`` expect.  :meth:`check` raises it again wherever the first one was swallowed."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._old: dict = {}

    def _handler(self, signum, frame):
        name = signal.Signals(signum).name
        first = not self.requested
        self.requested = name
        if first:
            warn(f"{name}: stopping now (the registry stays consistent; the next refresh redoes the rest)")
        raise StopRequested(name)

    def __enter__(self) -> "StopFlag":
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: no handlers, nothing to restore
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)

    def check(self) -> None:
        if self.requested:
            raise StopRequested(self.requested)

    def as_stop(self, error: BaseException) -> Optional[StopRequested]:
        """The StopRequested that ``error`` really is, or None.  A library may catch the handler's
        exception and raise its own in its place (pydantic-core wraps it in a ``SchemaError`` when
        the signal lands while it builds a validator): once a stop was requested, whatever unwinds
        the refresh is that stop, not a failure."""
        if isinstance(error, StopRequested):
            return error
        if self.requested:
            stop = StopRequested(self.requested)
            stop.__cause__ = error
            return stop
        return None

    def sleep(self, seconds: float) -> None:
        """Sleep up to ``seconds``, waking early (with StopRequested) on a stop signal."""
        end = time.monotonic() + seconds
        while True:
            self.check()
            left = end - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 1.0))


NO_STOP = StopFlag()  # never installed: check() is a no-op unless someone sets .requested


# ---------------------------------------------------------------- disk space

def dir_size(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def check_disk(where: Path, need_bytes: int, reserve_mb: float, what: str) -> None:
    """Refuse (:class:`LowDiskSpace`) unless ``need_bytes`` + ``reserve_mb`` are free at ``where``."""
    free = shutil.disk_usage(where).free
    need = int(need_bytes + reserve_mb * 2**20)
    if free < need:
        raise LowDiskSpace(f"not enough free disk space for {what} in {where}: {free / 2**20:.0f} MiB free, "
                           f"need about {need / 2**20:.0f} MiB ({need_bytes / 2**20:.0f} MiB estimated + "
                           f"{reserve_mb:.0f} MiB reserve, registry.yaml min_free_mb); nothing was changed")


# ---------------------------------------------------------------- crash-test hook

def kill_point(step: str) -> None:
    """Tests: ``SEMIVIT_TEST_KILL_AT=<step>`` makes the process SIGKILL itself here (no cleanup,
    no flushing: exactly what a power cut or the OOM killer does); ``<step>@<seconds>`` kills it
    that many seconds after it reaches the step, i.e. in the middle of whatever follows.

    Steps, in order: ingest (after the first committed batch), pseudo (labels computed, not yet
    committed), train (stage-3 fold 1 about to start: fold 0 done when folds train one
    at a time, still training beside it with fold workers), export (before the export starts),
    exporting (the first graph written and verified, the export half done),
    publish (manifest written, before the rename), published (visible, undecided), switch /
    switched (around the switch of ``current``), decided (before the final status is written).
    """
    want = os.environ.get(KILL_ENV)
    if not want:
        return
    name, _, delay = want.partition("@")
    if name != step:
        return
    if delay:
        import threading

        t = threading.Timer(float(delay), lambda: os.kill(os.getpid(), signal.SIGKILL))
        t.daemon = True
        t.start()
        return
    info(f"[test] SIGKILL at step '{step}'")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)
