"""Deadline scheduling for ``--time-limit``: measure, degrade in steps, stop in time.

The budget counts from the start of the command (model loading, discovery and decoding included)
and ends ``reserve`` seconds before the limit, kept for writing the remaining rows and renaming
the output into place.  Before every batch the scheduler

1. estimates the seconds per image at the current level: measured over its recent batches, or,
   before any measurement there, extrapolated from another level's measurement by relative cost
   (members x (2 with TTA, 1 without)), or, before any measurement at all, found with a small
   probe batch;
2. if the images still to do cannot all fit in the time left at this level (their inference plus
   the measured wait for decoding), steps down to the next level - cheaper, recorded per image -
   as long as that is a real gain after the next level's load time; levels never go back up;
3. cuts the batch to what fits before the deadline (with a safety factor), or stops when not one
   more image fits: every image not reached then gets the status ``timeout``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

PROBE = 2  # images in the first batch when nothing has been measured yet
SAFETY = 1.25  # estimates are multiplied by this before checking that a batch fits


def reserve_seconds(time_limit: float, n_files: int) -> float:
    """Seconds kept at the end for the timeout rows, closing and renaming the output."""
    return 0.3 + min(0.02 * time_limit, 1.0) + 5e-6 * n_files


class _Rate:
    """Seconds per image over the last few batches (the first batch of a level - warm-up - is
    dropped as soon as there is a second one)."""

    def __init__(self, window: int = 8):
        self.samples: deque = deque(maxlen=window)
        self.first: Optional[tuple[float, int]] = None

    def add(self, seconds: float, images: int) -> None:
        if images <= 0:
            return
        if self.first is None and not self.samples:
            self.first = (seconds, images)
        else:
            self.samples.append((seconds, images))

    @property
    def value(self) -> Optional[float]:
        s = list(self.samples) or ([self.first] if self.first else [])
        n = sum(k for _, k in s)
        return sum(t for t, _ in s) / n if n else None


@dataclass
class Plan:
    level: int
    size: int


class Scheduler:
    def __init__(self, costs: Sequence[int], deadline: Optional[float],
                 load_estimate: Callable[[int], float] = lambda i: 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.costs = list(costs)
        self.deadline = deadline
        self.load_estimate = load_estimate
        self.clock = clock
        self.level = 0
        self.rates = [_Rate() for _ in self.costs]
        self.wait = _Rate(window=16)
        self.steps: list[tuple[int, int]] = []  # (level, images remaining) at each step down

    # -- measurements ------------------------------------------------------------------------
    def record_batch(self, level: int, seconds: float, images: int) -> None:
        self.rates[level].add(seconds, images)

    def record_wait(self, seconds: float, images: int) -> None:
        self.wait.add(seconds, max(1, images))

    def per_image(self, level: int) -> Optional[float]:
        v = self.rates[level].value
        if v is not None:
            return v
        for j, r in enumerate(self.rates):  # extrapolate from the nearest measured level
            if r.value is not None:
                return r.value * self.costs[level] / self.costs[j]
        return None

    # -- decisions ---------------------------------------------------------------------------
    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def plan(self, available: int, remaining: int) -> Optional[Plan]:
        """What to run next: ``available`` images are decoded and waiting, ``remaining`` (>=
        available) are still to do in total.  None: stop, nothing more fits."""
        if self.deadline is None:
            return Plan(self.level, available)
        left = self.time_left()
        if left <= 0:
            return None
        t = self.per_image(self.level)
        if t is None:
            return Plan(self.level, min(available, PROBE))
        w = self.wait.value or 0.0
        while self.level + 1 < len(self.costs) and remaining * (t + w) * SAFETY > left:
            nxt = self.level + 1
            t_next = self.per_image(nxt)
            gain = remaining * (t - t_next) - self.load_estimate(nxt)
            if gain <= 0:
                break
            self.level, t = nxt, t_next
            self.steps.append((nxt, remaining))
        fit = int(left / (t * SAFETY)) if t > 0 else available
        size = min(available, fit)
        if size < 1:
            return None
        return Plan(self.level, size)

    def freeze(self, level: int) -> None:
        """Never go below ``level`` (its next level could not be loaded)."""
        self.level = level
        self.costs = self.costs[:level + 1]
        self.rates = self.rates[:level + 1]
