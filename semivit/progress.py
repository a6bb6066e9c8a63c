"""Progress for long work (training epochs, decoding, prediction).

On a terminal: rich progress bars on stderr.  Without one (cron, systemd, ``ssl train ... >
log.txt 2>&1``) a live bar cannot redraw, and rich would print its last frame squeezed into 80
columns (``135/1… 0:00… 0:00:…``), so :class:`PlainProgress` writes plain, whole lines instead:
one for every epoch-level status (a status update without progress, e.g. ``epoch 3: F1 0.61``),
one every ``SEMIVIT_LOG_EVERY`` seconds (default 60) while the work advances, and one when the
display closes (``done``, with the last status).  ``SEMIVIT_PROGRESS=plain`` / ``rich`` forces either; ``SEMIVIT_QUIET=1`` turns both
off (CI logs stay short).
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Callable, Optional, Union

from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from semivit.utils import console


def _hms(seconds: float) -> str:
    return str(timedelta(seconds=int(max(seconds, 0))))


class PlainProgress:
    """The subset of :class:`rich.progress.Progress` this package uses (``add_task``, ``update``,
    ``advance``, context manager), printing one readable line per event instead of a live bar.

    Written here rather than configured in rich: rich's non-terminal mode prints nothing until the
    end and then the last frame of the bar, which is exactly the unreadable log this replaces."""

    def __init__(self, every_s: Optional[float] = None, clock: Callable[[], float] = time.monotonic,
                 write: Optional[Callable[[str], None]] = None, disable: bool = False):
        if every_s is None:
            every_s = float(os.environ.get("SEMIVIT_LOG_EVERY", "60") or 60)
        self.every_s = every_s
        self.clock = clock
        self.disable = disable
        self._write = write or (lambda line: console.print(line, markup=False, highlight=False,
                                                           soft_wrap=True))
        self._tasks: dict[int, dict] = {}

    # -- context manager
    def __enter__(self) -> "PlainProgress":
        return self

    def __exit__(self, *exc) -> None:
        for tid, t in self._tasks.items():
            if not t["ended"]:
                self._line(tid, final=True)

    # -- rich's API (the part used here)
    def add_task(self, description: str, total: Optional[float] = None, completed: float = 0,
                 status: str = "", unit: str = "", **_fields) -> int:
        """``unit`` (a field rich ignores): what is counted, printed after the count
        (``3200/15744 views (20%)``)."""
        tid = len(self._tasks)
        now = self.clock()
        self._tasks[tid] = {"desc": description, "total": total, "completed": completed, "start": now,
                            "start_completed": completed, "last": now, "status": status, "ended": False,
                            "unit": unit}
        return tid

    def update(self, task_id: int, advance: Optional[float] = None, completed: Optional[float] = None,
               total: Optional[float] = None, description: Optional[str] = None,
               status: Optional[str] = None, **_fields) -> None:
        t = self._tasks[task_id]
        if total is not None:
            t["total"] = total
        if description is not None:
            t["desc"] = description
        moved = advance is not None or completed is not None
        if advance is not None:
            t["completed"] += advance
        if completed is not None:
            t["completed"] = completed
        if status is not None:
            t["status"] = status
        if t["ended"]:
            return
        if not moved and status:  # an epoch-level message: always worth a line
            self._line(task_id)
        elif moved and self.clock() - t["last"] >= self.every_s:
            self._line(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    # -- output
    def _line(self, task_id: int, final: bool = False) -> None:
        t = self._tasks[task_id]
        now = self.clock()
        t["last"] = now
        if final:
            t["ended"] = True
        if self.disable:
            return
        done, total = t["completed"], t["total"]
        elapsed = now - t["start"]
        parts = [f"{t['desc']}:"]
        unit = f" {t['unit']}" if t["unit"] else ""
        if total:
            parts.append(f"{int(done)}/{int(total)}{unit} ({100.0 * done / total:.0f}%)")
        else:
            parts.append(f"{int(done)}{unit}")
        parts.append(f"elapsed {_hms(elapsed)}")
        rate_done = done - t["start_completed"]
        if total and not final and rate_done > 0 and done < total:
            parts.append(f"eta {_hms(elapsed / rate_done * (total - done))}")
        if final:
            parts.append("done")
        line = " ".join(parts)
        if t["status"]:
            line += f" | {t['status']}"
        self._write(time.strftime("%H:%M:%S ") + line)


def _plain() -> bool:
    mode = os.environ.get("SEMIVIT_PROGRESS", "").strip().lower()
    if mode in ("plain", "rich"):
        return mode == "plain"
    return not console.is_terminal


def progress_bar(transient: bool = False) -> Union[Progress, PlainProgress]:
    """A progress display on stderr: rich bars on a terminal, plain lines otherwise (see the
    module docstring); ``SEMIVIT_QUIET=1`` turns it off."""
    quiet = bool(os.environ.get("SEMIVIT_QUIET"))
    if _plain():
        return PlainProgress(disable=quiet)
    return Progress(
        SpinnerColumn(),
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=transient,
        disable=quiet,
    )
