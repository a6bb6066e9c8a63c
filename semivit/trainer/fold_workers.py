"""Folds trained side by side: one process per fold, one thread each (CPU).

A stage's folds are independent (each has its own seed, data and output directory), so on a CPU
with N cores ``ssl train`` trains N folds at once, each in a forked child process with one
thread, instead of one fold at a time with N OpenMP threads.  Why (issue 16, measured in
benchmarks/results/fold_workers*.md):

- one thread per process has no OpenMP barrier to wait at.  Beside other CPU-bound processes, N
  threads in one process spend their time waiting for a sibling thread that the kernel has
  descheduled, and a single process can at best use one core's share: the thread governor
  (:mod:`semivit.trainer.threads`) kept ~0.4x of its quiet rate there; independent processes
  each keep their fair share of a core;
- a small ViT's matmuls scale poorly over threads (one thread trains at ~0.6x of two), so on a
  quiet machine N one-thread folds train more images per second than one N-thread fold.

A fold trained this way is exactly the fold that one fold at a time with one thread trains from
the same inputs (same seed, same single-threaded arithmetic); the result does not depend on which
worker trained it or when.  The children are forked (not spawned): they inherit the run's decoded
images and stem features without copying or pickling them.  Everything the folds share that is
computed once per stage (the stem features of the labeled views and of the pseudo-labelled
images, per-view targets, a fold teacher's set-up) is computed in the parent, with all its
threads, before the fork - so those inputs may differ in the last bits from a one-thread
process's.

``train.fold_workers``: ``auto`` (the default) uses one worker per core the process may use
(``OMP_NUM_THREADS`` when the user set it, else one per physical core), and 1 - one fold at a
time, all threads, the thread governor - with ``SEMIVIT_TRAIN_THREADS`` set; an integer asks for
that many (capped at the folds left).  Either way: one fold at a time on a GPU, under torchrun,
off Linux (fork is not safe with torch elsewhere), or with one fold left to train.
Written here rather than with ``concurrent.futures.ProcessPoolExecutor`` / ``multiprocessing.Pool``:
a pool forks its workers once, up front, so they would not see what the parent computes between
folds (a fold's set-up is built only when it starts), and a pool gives no way to watch the
children's epochs or to say which fold's process died and why.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Optional

from semivit.errors import UserError
from semivit.utils import info


class FoldWorkerError(RuntimeError):
    """A fold's worker process failed with something other than a user error (its traceback is
    in ``details``, also written to the fold's directory as worker_error.txt)."""

    def __init__(self, message: str, details: str = ""):
        super().__init__(message)
        self.details = details


def worker_count(cfg, device, n_todo: int, environ=None) -> int:
    """How many folds of a stage train at once (see the module docstring)."""
    from semivit.trainer import distributed
    from semivit.trainer.threads import fixed_threads
    from semivit.utils import physical_core_count

    env = os.environ if environ is None else environ
    asked = cfg.train.fold_workers
    if n_todo < 2 or getattr(device, "type", str(device)) != "cpu" or distributed.current().enabled:
        return 1
    if not sys.platform.startswith("linux"):  # forked children: safe on Linux only (macOS: not with torch)
        return 1
    if asked != "auto":  # validated: a whole number >= 1
        return min(asked, n_todo)
    if fixed_threads(env) is not None:  # the user fixed one process's threads: keep that meaning
        return 1
    try:
        budget = int(env.get("OMP_NUM_THREADS") or physical_core_count())
    except ValueError:
        budget = physical_core_count()
    return max(1, min(budget, n_todo))


@dataclass
class _Child:
    k: int
    process: object
    conn: object
    epochs: int
    metrics: Path  # the fold's metrics.csv: its finished epochs, for the progress line


_IN_WORKER = False


def in_worker() -> bool:
    """Whether this process is a fold worker (recorded in the fold's done.json)."""
    return _IN_WORKER


def _child_main(conn, train: Callable[[], dict], parent_pid: int) -> None:
    """In the forked child: one thread, no progress bar (the parent shows the stage's), train the
    fold, send ("ok", summary) or ("error", is_user_error, message, traceback); never return."""
    global _IN_WORKER
    code = 0
    _IN_WORKER = True
    try:
        _die_with_parent(parent_pid)
        import torch

        os.environ["SEMIVIT_TRAIN_THREADS"] = "1"  # no thread governor: one thread, no barrier
        os.environ["SEMIVIT_QUIET"] = "1"
        torch.set_num_threads(1)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the parent stops the children
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's (a refresh's stop flag)
        conn.send(("ok", train()))
    except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
        code = 1
        try:
            conn.send(("error", isinstance(e, UserError), str(e) or type(e).__name__, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - the parent sees the exit code instead
            pass
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)  # not the parent's atexit handlers or buffers: this is a fork


def _die_with_parent(parent_pid: int) -> None:
    """Linux: SIGKILL this child when the parent dies (prctl PR_SET_PDEATHSIG).  A parent killed
    without cleanup (the OOM killer, a power-cut test, ``kill -9``) would otherwise leave its fold
    workers training on and writing into the run that a rerun resumes."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl: nobody would stop this child
        os._exit(1)


def _epochs_done(path) -> int:
    """Rows in a fold's metrics.csv (rewritten atomically after every epoch)."""
    try:
        with open(path) as f:
            return max(0, sum(1 for _ in f) - 1)
    except OSError:
        return 0


def _describe_exit(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the kernel may have stopped it for lack of memory: try train.fold_workers=1)" \
            if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def train_parallel(run, stage: str, todo: list[int], workers: int,
                   launch: Callable[[int], tuple[Callable[[], dict], int]]) -> dict[int, dict]:
    """Train the folds ``todo`` of ``stage``, ``workers`` at a time, each in a forked child.

    ``launch(k)`` runs in the parent just before fold k's child starts (the refresh's stop check,
    fold k's set-up, the stage's shared features) and returns (the call that trains fold k,
    its number of epochs).  Returns {k: fold summary}.  A failing fold stops the others (their
    folds have no done.json, so a rerun trains them again) and raises its error in the parent:
    a :class:`UserError` as itself, anything else as :class:`FoldWorkerError`."""
    from semivit.progress import PlainProgress

    ctx = mp.get_context("fork")
    queue, running, results = list(todo), {}, {}
    info(f"{stage}: {len(todo)} folds, {workers} at a time (one process and one thread each; "
         "train.fold_workers)")
    t0 = time.time()
    try:
        # plain lines, never a live (rich) display: a fork must not copy a display's redirected
        # stdout/stderr or a refresh thread's lock into the children
        with PlainProgress(disable=bool(os.environ.get("SEMIVIT_QUIET"))) as bar:
            task = bar.add_task(f"{stage} folds", total=len(todo), status="")
            while queue or running:
                while queue and len(running) < workers:
                    k = queue.pop(0)
                    for stale in ("metrics.csv", "worker_error.txt"):  # an earlier, unfinished attempt's
                        (run.stage_dir(stage, k) / stale).unlink(missing_ok=True)
                    train, epochs = launch(k)
                    sys.stdout.flush()
                    sys.stderr.flush()
                    parent_conn, child_conn = ctx.Pipe(duplex=False)
                    p = ctx.Process(target=_child_main, args=(child_conn, train, os.getpid()), name=f"{stage}-fold{k}")
                    p.start()
                    child_conn.close()
                    running[k] = _Child(k, p, parent_conn, max(1, int(epochs)), run.stage_dir(stage, k) / "metrics.csv")
                ready = wait([c.conn for c in running.values()], timeout=1.0)
                for c in [c for c in running.values() if c.conn in ready]:
                    del running[c.k]
                    try:
                        msg = c.conn.recv()
                    except (EOFError, OSError):
                        msg = None
                    c.process.join()
                    c.conn.close()
                    if msg is None or msg[0] != "ok":
                        _raise_child_error(run, stage, c, msg)
                    s = msg[1]
                    results[c.k] = s
                    info(f"{stage} fold {c.k + 1}: val macro F1 {s['val_macro_f1']:.3f} at epoch "
                         f"{s['best_epoch']} ({s['seconds']:.0f}s, one thread)")
                now = sorted(running.values(), key=lambda c: c.k)
                epochs_done = [_epochs_done(c.metrics) for c in now]  # each file read once per poll
                bar.update(task, completed=len(results) + sum(min(1.0, e / c.epochs) for c, e in zip(now, epochs_done)),
                           status="  ".join(f"fold {c.k + 1}: epoch {e}/{c.epochs}" for c, e in zip(now, epochs_done)))
    finally:
        for c in running.values():  # an error or Ctrl-C: stop the folds still training
            if c.process.is_alive():
                c.process.terminate()
        for c in running.values():
            c.process.join(timeout=10)
            if c.process.is_alive():
                c.process.kill()
                c.process.join()
            c.conn.close()
    info(f"{stage}: {len(todo)} folds trained in {time.time() - t0:.0f}s by {workers} workers")
    return results


def _raise_child_error(run, stage: str, c: _Child, msg) -> None:
    where = f"{stage} fold {c.k + 1}"
    if msg is None:
        raise FoldWorkerError(f"{where}: its worker process died ({_describe_exit(c.process.exitcode)}); "
                              "rerun the same command to resume (finished folds are kept)")
    _, user, text, tb = msg
    if user:
        raise UserError(text)
    path = run.stage_dir(stage, c.k) / "worker_error.txt"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(tb)
    except OSError:
        pass
    raise FoldWorkerError(f"{where} failed: {text.splitlines()[0] if text else 'error'} (traceback: {path})", tb)
