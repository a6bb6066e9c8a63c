"""Decoding in worker processes, ahead of the model, in order.

The file list is cut into chunks of ``chunk`` files; each chunk is decoded and resized with
:func:`semivit.data.decode.load_rgb` (the one resize function; JPEG draft mode) by a pool of
worker processes.  At most ``window`` chunks are in flight, so memory stays bounded however large
the directory is, while the workers stay ahead of the model.  Chunks come back in file order.

The pool is started (fork on Linux) before the model is loaded, so decoding overlaps model
loading, and no runtime thread pool exists yet in the parent when it forks.

The workers run at a lower CPU priority (``nice`` +10; ``SEMIVIT_DECODE_NICE`` sets it, 0 keeps
the parent's).  They only have to stay ahead of the model, and a worker that takes a core from
an inference thread stalls the whole batch.  With them at +10, ``ssl predict``'s steady state on
the quick preset's export reached 90% of the raw engine on pre-decoded arrays (179.9 vs 199.9
images/s, 2-core Xeon; benchmarks/results/speed.md, section 8); the AMD run before this change
had 67%.  Decoding a 300x300 PNG costs ~1 ms of CPU, which is most of the rest.  Where the model
waits for the workers instead (a GPU, a huge JPEG), the cores are idle and the priority changes
nothing.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import warnings
from collections import deque
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from semivit.data.decode import DecodeError, load_rgb, max_pixels


@dataclass
class Chunk:
    start: int  # index of the chunk's first file in the list
    stop: int  # one past its last file
    indices: np.ndarray  # list indices of the files that decoded, ascending
    images: np.ndarray  # (len(indices), S, S, 3) uint8
    errors: list[tuple[int, str]] = field(default_factory=list)  # (list index, reason)


def decode_chunk(start: int, paths: Sequence[str], size: int) -> Chunk:
    ok, imgs, errors = [], [], []
    for k, p in enumerate(paths):
        try:
            imgs.append(load_rgb(p, size))
            ok.append(start + k)
        except DecodeError as e:
            errors.append((start + k, str(e)))
        except Exception as e:  # noqa: BLE001 - one bad file must never stop the others
            msg = str(e).splitlines()[0] if str(e) else ""
            errors.append((start + k, f"unreadable: {type(e).__name__}: {msg}".rstrip(": ")))
    images = np.stack(imgs) if imgs else np.zeros((0, size, size, 3), np.uint8)
    return Chunk(start, start + len(paths), np.asarray(ok, dtype=np.int64), images, errors)


DECODE_NICE = 10


def decode_nice() -> int:
    """How much lower the decode workers' CPU priority is: ``SEMIVIT_DECODE_NICE`` (0-19), else 10."""
    from semivit.utils import env_int

    n = env_int("SEMIVIT_DECODE_NICE", 0, 19, what="a whole number from 0 to 19")
    return DECODE_NICE if n is None else n


def _worker_init(nice: int = 0) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled once, by the parent
    if nice:
        try:
            os.nice(nice)
        except OSError:  # not allowed here: decode at the parent's priority
            pass


def default_workers() -> int:
    env = os.environ.get("SEMIVIT_DECODE_WORKERS", "").strip()
    if env:
        try:
            return max(0, int(env))
        except ValueError:
            from semivit.errors import UserError

            raise UserError(f"SEMIVIT_DECODE_WORKERS must be a whole number (0: decode in the main "
                            f"process), not {env!r}") from None
    from semivit.utils import cpu_count

    return min(cpu_count(), 8)


class DecodePool:
    """``next(timeout)`` returns the next :class:`Chunk` in order, None at the end.

    ``workers=0`` decodes in the calling thread (no processes).
    """

    def __init__(self, paths: Sequence[str], size: int, chunk: int, workers: Optional[int] = None,
                 window: Optional[int] = None):
        max_pixels()  # a bad SEMIVIT_MAX_PIXELS is one line before any work, not an error row per file
        nice = decode_nice()
        self.paths = [str(p) for p in paths]
        self.size = int(size)
        self.chunk = max(1, int(chunk))
        self.workers = default_workers() if workers is None else max(0, int(workers))
        n_chunks = -(-len(self.paths) // self.chunk)
        self.workers = min(self.workers, n_chunks)
        self.window = window or (2 * self.workers + 2)
        self._next_start = 0
        self._pending: deque = deque()
        self.pool = None
        if self.workers > 0:
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            try:
                with warnings.catch_warnings():  # 3.12+: "process is multi-threaded, fork() may deadlock"
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self.pool = ctx.Pool(self.workers, initializer=_worker_init, initargs=(nice,))
            except OSError as e:  # no /dev/shm for the pool's semaphores, process limits, ...
                from semivit.utils import warn

                warn(f"cannot start decode worker processes ({e}); decoding in the main process")
                self.workers = 0
                return
            self._fill()

    def _fill(self) -> None:
        while len(self._pending) < self.window and self._next_start < len(self.paths):
            s = self._next_start
            e = min(s + self.chunk, len(self.paths))
            self._pending.append(self.pool.apply_async(decode_chunk, (s, self.paths[s:e], self.size)))
            self._next_start = e

    @property
    def done(self) -> bool:
        return not self._pending and self._next_start >= len(self.paths)

    def next(self, timeout: Optional[float] = None) -> Optional[Chunk]:
        """The next chunk; raises :class:`TimeoutError` if it is not ready within ``timeout`` s."""
        if self.pool is None:
            if self._next_start >= len(self.paths):
                return None
            s = self._next_start
            e = min(s + self.chunk, len(self.paths))
            self._next_start = e
            return decode_chunk(s, self.paths[s:e], self.size)
        if not self._pending:
            return None
        try:
            chunk = self._pending[0].get(timeout=None if timeout is None else max(0.0, timeout))
        except mp.TimeoutError:
            raise TimeoutError("decoding did not deliver in time") from None
        self._pending.popleft()
        self._fill()
        return chunk

    def close(self, terminate: bool = False) -> None:
        if self.pool is None:
            return
        if terminate or self._pending:
            self.pool.terminate()
        else:
            self.pool.close()
        self.pool.join()
        self.pool = None
        self._pending.clear()

    def __enter__(self) -> "DecodePool":
        return self

    def __exit__(self, *exc) -> None:
        self.close(terminate=True)
