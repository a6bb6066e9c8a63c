"""Deadline scheduling for ``--time-limit``: measure, degrade in steps, stop in time.

The budget counts from the start of the command (model loading, discovery and decoding included)
and ends ``reserve`` seconds before the limit, kept for writing the remaining rows and renaming
the output into place.  Estimates are multiplied by ``SAFETY`` before they are compared with the
time left.  Before every batch the scheduler

1. estimates the seconds per image at each level: measured over the level's recent batches (its
   first batch, a warm-up, is dropped once there is another), or extrapolated from a measured level
   by relative cost (members x 2 with flip TTA, x 1 without); before any measurement at all it
   runs a 2-image warm-up batch, then one batch (as large as the warm-up's pessimistic estimate
   allows) that measures - small batches cost more per image, so they never decide a step down;
2. keeps the current level for this batch when the images left can still all be done - all at
   this level, or this batch here and the rest at the next level (its load time included);
   otherwise it steps down to the next level and asks again.  So the best level runs for as many
   images as the budget allows, then the next one takes over (no TTA first, then fewer members);
   levels never go back up, and every image records the level that predicted it;
3. at the cheapest level (when even that cannot finish) it runs what fits, cutting the last batch
   to the time left, and stops when not one more image fits: every image not reached then gets
   the status ``timeout``.

The time spent waiting for decoded images is measured too and counted per image in step 2.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

PROBE = 2  # images in the warm-up batch
SAFETY = 1.25  # estimates are multiplied by this before checking that work fits


def reserve_seconds(time_limit: float, n_files: int) -> float:
    """Seconds kept at the end for the timeout rows, closing and renaming the output."""
    return 0.3 + min(0.02 * time_limit, 1.0) + 5e-6 * n_files


class _Rate:
    """Seconds per image over the last few batches; the first batch (warm-up) is kept apart."""

    def __init__(self, window: int = 8):
        self.samples: deque = deque(maxlen=window)
        self.warmup: Optional[tuple[float, int]] = None

    def add(self, seconds: float, images: int) -> None:
        if images <= 0:
            return
        if self.warmup is None:
            self.warmup = (seconds, images)
        else:
            self.samples.append((seconds, images))

    @property
    def steady(self) -> Optional[float]:
        n = sum(k for _, k in self.samples)
        return sum(t for t, _ in self.samples) / n if n else None

    @property
    def any(self) -> Optional[float]:
        if self.steady is not None:
            return self.steady
        return self.warmup[0] / self.warmup[1] if self.warmup else None


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
        """Steady measurement at ``level``, else extrapolated from the nearest level with a steady
        measurement, else from any warm-up measurement; None before any batch ran."""
        if self.rates[level].steady is not None:
            return self.rates[level].steady
        for attr in ("steady", "any"):
            for j in sorted(range(len(self.rates)), key=lambda j: abs(j - level)):
                v = getattr(self.rates[j], attr)
                if v is not None:
                    return v * self.costs[level] / self.costs[j]
        return None

    # -- decisions ---------------------------------------------------------------------------
    def time_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - self.clock()

    def _finishes(self, batch: int, remaining: int, budget: float) -> bool:
        """Can ``batch`` images run at the current level and all ``remaining`` still be done - at
        this level, or the rest at the next one (one step at a time: no TTA before fewer members)?"""
        w = self.wait.steady or self.wait.any or 0.0
        here = self.per_image(self.level) + w
        if remaining * here <= budget:
            return True
        j = self.level + 1
        return j < len(self.costs) and (
            batch * here + self.load_estimate(j) + (remaining - batch) * (self.per_image(j) + w) <= budget)

    def plan(self, available: int, remaining: int) -> Optional[Plan]:
        """What to run next: ``available`` images are decoded and waiting, ``remaining`` (>=
        available) are still to do in total.  None: stop, nothing more fits."""
        if self.deadline is None:
            return Plan(self.level, available)
        left = self.time_left()
        if left <= 0:
            return None
        budget = left / SAFETY
        if not any(r.steady is not None for r in self.rates):
            # a small first batch warms the session up; the next one, a full batch (cut to what the
            # warm-up's pessimistic estimate says fits), measures.  No step down on a warm-up alone.
            t = self.per_image(self.level)
            size = min(available, PROBE) if t is None else min(available, int(budget / t) if t > 0 else available)
            return Plan(self.level, size) if size >= 1 else None
        batch = min(available, remaining)
        start, target = self.level, None
        for j in range(start, len(self.costs)):
            self.level = j
            if self._finishes(batch, remaining, budget):
                target = j
                break
        if target is None:  # nothing finishes everything: the level that gets the most images done
            w = self.wait.steady or self.wait.any or 0.0
            target = max(range(start, len(self.costs)),
                         key=lambda j: (budget - (self.load_estimate(j) if j != start else 0.0))
                         / (self.per_image(j) + w))
        self.level = target
        if target != start:
            self.steps.append((target, remaining))
        t = self.per_image(self.level)
        fit = int(budget / t) if t > 0 else available
        size = min(available, fit)
        return Plan(self.level, size) if size >= 1 else None

    def freeze(self, level: int) -> None:
        """Never go below ``level`` (its next level could not be loaded)."""
        self.level = level
        self.costs = self.costs[:level + 1]
        self.rates = self.rates[:level + 1]
