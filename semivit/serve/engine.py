"""The prediction loop: decoded chunks in, batches through the backend under the scheduler's
plan, one row per file out (streamed, in file order, a chunk at a time)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from semivit.serve.backends import Backend, first_line
from semivit.serve.loader import DecodePool
from semivit.serve.scheduler import Scheduler
from semivit.serve.writers import Row, Writer
from semivit.utils import warn


@dataclass
class Counts:
    ok: int = 0
    error: int = 0
    timeout: int = 0
    per_level: Counter = field(default_factory=Counter)  # level index -> ok images
    switches: list[tuple[int, int, float]] = field(default_factory=list)  # (level, remaining, seconds to load)
    stopped_at: Optional[float] = None  # clock when the deadline stopped the work

    def add(self, row: Row) -> None:
        setattr(self, row.status, getattr(self, row.status) + 1)


def run_loop(backend: Backend, pool: DecodePool, sched: Scheduler, rel_paths: Sequence[str], writer: Writer,
             progress: Callable[[int], None] = lambda k: None, clock: Callable[[], float] = time.monotonic) -> Counts:
    n = len(rel_paths)
    counts = Counts()
    classes = backend.classes
    next_index = 0  # files before this index have their rows written
    stop = False

    def emit(rows: dict) -> None:
        for i in sorted(rows):
            writer.write(rows[i])
            counts.add(rows[i])
        writer.flush()
        progress(len(rows))

    while not stop:
        t_wait = clock()
        try:
            chunk = pool.next(timeout=sched.time_left() if sched.deadline is not None else None)
        except TimeoutError:
            break
        if chunk is None:
            break
        sched.record_wait(clock() - t_wait, chunk.stop - chunk.start)
        rows = {i: Row(rel_paths[i], "error", error=reason) for i, reason in chunk.errors}
        m, pos = len(chunk.indices), 0
        while pos < m:
            plan = sched.plan(m - pos, (m - pos) + (n - chunk.stop))
            if plan is None:
                stop = True
                break
            if plan.level != backend.level:
                t = clock()
                try:
                    backend.set_level(plan.level)
                except Exception as e:  # noqa: BLE001 - a broken lower level must not lose the run
                    warn(f"cannot switch to level {backend.levels[plan.level].name}: {first_line(e)}; staying at "
                         f"{backend.levels[backend.level].name}")
                    sched.freeze(backend.level)
                    continue
                counts.switches.append((plan.level, (m - pos) + (n - chunk.stop), clock() - t))
                continue  # plan again: the switch took time
            b = plan.size
            t = clock()
            try:
                probs, labels = backend.predict(chunk.images[pos:pos + b])
            except Exception as e:  # noqa: BLE001 - recorded per image, the run goes on
                reason = f"inference failed: {type(e).__name__}: {first_line(e)}"
                for i in chunk.indices[pos:pos + b]:
                    rows[int(i)] = Row(rel_paths[int(i)], "error", error=reason)
                pos += b
                continue
            sched.record_batch(plan.level, clock() - t, b)
            name = backend.levels[plan.level].name
            for j in range(b):
                i = int(chunk.indices[pos + j])
                lab = int(labels[j])
                rows[i] = Row(rel_paths[i], "ok", label=classes[lab], confidence=float(probs[j, lab]),
                              probs=probs[j], level=name)
            counts.per_level[plan.level] += b
            pos += b
        if stop:
            counts.stopped_at = clock()
            for i in chunk.indices[pos:]:
                rows[int(i)] = Row(rel_paths[int(i)], "timeout")
        emit(rows)
        next_index = chunk.stop
    if counts.stopped_at is None and next_index < n:
        counts.stopped_at = clock()
    pool.close(terminate=True)  # workers still decoding files that will not be reached
    if next_index < n:
        emit({i: Row(rel_paths[i], "timeout") for i in range(next_index, n)})
    return counts
