"""How many CPU threads the training loop uses, chosen by measurement while it trains.

A small ViT's training step is hundreds of short parallel regions.  On a quiet machine OpenMP's
spinning workers make them fast (benchmarks/results/speed.md, 2-core Xeon, quick preset: 210.4
images/s with two spinning threads, 154.4 with ``OMP_WAIT_POLICY=PASSIVE``); beside other
CPU-bound processes every region waits at its barrier for a sibling thread that the kernel has
descheduled, and two threads fall to 67.4 (0.32x; in runs by hand, 34 to 97 images/s from one
run to the next), while one thread, with no barrier to wait at, is steadier.  No fixed setting
is right for both machines, and a training run lasts long enough for the load to change, so
:class:`ThreadGovernor` measures: after the first few steps, and then every ``probe_every`` steps,
it runs a few steps at the other thread count (all usable cores, or one) and keeps whichever
trained more images per second.  Two steps in a row much slower than the best the current
setting has done (another process started) trigger a probe at once.  Probes back off (the
interval doubles, up to ``max_every``) while the choice holds: a quiet machine loses ~1-2% to them.

``SEMIVIT_TRAIN_THREADS=N`` fixes the count (no probing); with one usable core there is nothing
to choose.  The governor only calls ``set_threads`` (``torch.set_num_threads``), so OpenMP's
wait policy stays whatever the environment gives it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

from semivit.utils import env_int

ENV = "SEMIVIT_TRAIN_THREADS"


def fixed_threads(environ=None) -> Optional[int]:
    """``SEMIVIT_TRAIN_THREADS`` as a positive int, None when unset; a bad value is a UserError."""
    return env_int(ENV, 1, what="a positive whole number of threads", environ=environ)


class ThreadGovernor:
    """Call :meth:`start` where timing begins (after validation, at each epoch's start) and
    :meth:`step` after every optimiser step with the images it trained on."""

    def __init__(self, max_threads: int, set_threads: Optional[Callable[[int], None]] = None,
                 clock: Callable[[], float] = time.perf_counter, probe_every: int = 48,
                 probe_steps: int = 4, max_every: int = 768, slow: float = 1.6, margin: float = 0.05,
                 first_probe: int = 8):
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.choices = [int(max_threads), 1] if max_threads > 1 else [1]
        self.set_threads, self.clock = set_threads, clock
        self.probe_steps, self.slow, self.margin = int(probe_steps), float(slow), float(margin)
        self.min_every, self.max_every = int(probe_every), int(max_every)
        self.every = int(first_probe)  # learn the machine early; then every probe_every, backing off
        self.current = self.choices[0]  # the chosen count
        self.running = self.current  # the count the next step runs with
        self.best: dict[int, float] = {}  # threads -> best (lowest) median seconds per image seen
        self._recent: list[float] = []  # seconds per image of the chosen count since its last probe
        self._probe: list[float] = []
        self._since = 0  # steps at the chosen count since the last probe
        self._t: Optional[float] = None
        self._skip = True  # the first step after a switch or a pause warms up: not measured
        self.switches: list[tuple[int, int]] = []  # (step, threads) whenever the choice changed
        self.probes = 0
        self.steps = 0
        self.set_threads(self.current)

    @property
    def active(self) -> bool:
        return len(self.choices) > 1

    def start(self) -> None:
        self._t = self.clock()
        self._skip = True

    def _use(self, n: int) -> None:
        if n != self.running:
            self.set_threads(n)
            self.running = n
        self._skip = True

    def step(self, images: int) -> None:
        now = self.clock()
        t, self._t = self._t, now
        self.steps += 1
        if not self.active or t is None or images <= 0:
            return
        if self._skip:
            self._skip = False
            return
        per = (now - t) / images
        if self.running != self.current:  # probing the other count
            self._probe.append(per)
            if len(self._probe) >= self.probe_steps:
                self._decide()
            return
        self._recent.append(per)
        self._since += 1
        best = self.best.get(self.current)
        recent = statistics.median(self._recent[-self.probe_steps:])
        if len(self._recent) >= self.probe_steps and (best is None or recent < best):
            self.best[self.current] = recent
        contention = best is not None and len(self._recent) >= 2 and \
            min(self._recent[-2:]) > self.slow * best  # two slow steps in a row: the load changed
        if self._since >= self.every or contention:
            if contention:
                self.every = self.min_every
            self._probe = []
            self.probes += 1
            self._use(next(c for c in self.choices if c != self.current))

    def _decide(self) -> None:
        here = statistics.median(self._recent[-self.probe_steps:]) if self._recent else float("inf")
        there = statistics.median(self._probe)
        other = self.running
        if there < here * (1 - self.margin):  # the other count trains faster now: switch
            self.current = other
            self.switches.append((self.steps, other))
            self.best[other] = there
            self.every = self.min_every
        else:
            self.every = min(self.max_every, self.every * 2)  # the choice holds: probe less often
        self._recent, self._probe, self._since = [], [], 0
        self._use(self.current)

    def summary(self) -> dict:
        return {"threads": self.current, "choices": self.choices, "probes": self.probes,
                "switches": [{"step": s, "threads": n} for s, n in self.switches]}


_GOVERNOR: Optional[ThreadGovernor] = None


def governor_for_training(device) -> Optional[ThreadGovernor]:
    """The process's governor for CPU training loops (one for all of them: what it learnt about
    the machine's load carries from one fold to the next), or None: CUDA, a fixed
    ``SEMIVIT_TRAIN_THREADS``, or torch already limited to one thread (``OMP_NUM_THREADS=1``)."""
    global _GOVERNOR
    import torch

    if getattr(device, "type", str(device)) != "cpu":
        return None
    fixed = fixed_threads()
    if fixed is not None:
        torch.set_num_threads(fixed)
        return None
    if _GOVERNOR is None:
        # torch's count when training first starts: OMP_NUM_THREADS (the user's, or one per
        # physical core from semivit.utils.cpu_runtime_defaults); the governor changes it later
        _GOVERNOR = ThreadGovernor(torch.get_num_threads())
    return _GOVERNOR if _GOVERNOR.active else None
