"""``ssl predict DIR --engine ray [--address ADDR]``: the same rows, computed on a Ray cluster.

A Ray Data pipeline (Ray's own scheduling, back-pressure and retries - no home-made job system):

1. file listing: the driver lists DIR with the local engine's discovery (same files, same ignored
   ones, same ``--shard`` part) and makes a dataset of (index, path) rows;
2. decoding: ``map_batches`` tasks decode each batch with :func:`semivit.serve.loader.decode_chunk`,
   the local engine's decoder, so an undecodable file gets the very same ``error`` reason;
3. inference: ``map_batches`` on an actor pool; each actor holds one ONNX Runtime session (opened
   by the local engine's :class:`~semivit.serve.ort_session.OrtBackend`, same session options), on
   the CPU or - when the cluster has GPUs - one GPU per actor (``num_gpus=1``);
4. the driver gathers the rows and writes them, in file order, with the local engine's writers
   (same columns, same statuses, the same temporary-file-then-rename).

Every file gets exactly one row.  ``--time-limit`` counts from the process start as locally: the
driver stops waiting at the deadline and every file whose row has not come back is ``timeout``
(actors also turn batches that reach them after the deadline into timeouts without running them).
Ray runs the export's full level only (the local engine's step-down levels need one scheduler
that sees every batch).

Without ``--address`` (and without ``RAY_ADDRESS``) a local Ray instance is started for the
command and shut down after it; an instance already running in this process (``ray.init`` by the
caller) is used as it is.  On a remote cluster DIR, the model and the output's directory must be
readable by the workers under the same paths (a shared file system), and semivit must be
installed on every node.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from semivit.errors import UserError
from semivit.serve.writers import Row


GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "tensorrt")
DECODE_MEMORY = 256 * 1024 ** 2  # bytes a decode task asks Ray for


def import_ray():
    """``ray`` and ``ray.data``, or a one-line error saying how to get them."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install 'semivit[ray]' (or pip install 'ray[data]')") from None
    return ray


def decode_batch(batch: dict, size: int) -> dict:
    """Ray Data task: (idx, path) -> idx, image (uint8 N x S x S x 3; zeros where it failed), error."""
    from semivit.serve.loader import decode_chunk

    idx = np.asarray(batch["idx"], dtype=np.int64)
    paths = [str(p) for p in batch["path"]]
    chunk = decode_chunk(0, paths, size)  # the local engine's decoder: the same reasons
    images = np.zeros((len(paths), size, size, 3), np.uint8)
    if len(chunk.indices):
        images[chunk.indices] = chunk.images
    errors = [""] * len(paths)
    for k, reason in chunk.errors:
        errors[k] = reason
    return {"idx": idx, "image": images, "error": np.asarray(errors, dtype=object)}


class OrtActor:
    """Ray actor: one inference session (ONNX Runtime unless another export backend is asked
    for by name) for the export's full level, opened once."""

    def __init__(self, export_dir: str, backend: str, threads: int, deadline_wall: Optional[float]):
        from semivit.serve.backends import open_backend
        from semivit.serve.resolve import resolve_model_dir

        self.be = open_backend(resolve_model_dir(Path(export_dir)), backend, threads=threads)
        self.level = self.be.levels[0].name
        self.provider = self.be.describe()
        self.deadline_wall = deadline_wall  # time.time() after which batches become timeouts

    def __call__(self, batch: dict) -> dict:
        from semivit.serve.backends import first_line

        idx = np.asarray(batch["idx"], dtype=np.int64)
        errors = [str(e) for e in batch["error"]]
        n, c = len(idx), len(self.be.classes)
        status = np.asarray(["error" if e else "ok" for e in errors], dtype=object)
        label = np.full(n, -1, np.int64)
        probs = np.full((n, c), np.nan, np.float32)
        ok = np.flatnonzero(status == "ok")
        if len(ok) and self.deadline_wall is not None and time.time() >= self.deadline_wall:
            status[ok] = "timeout"
        elif len(ok):
            try:
                p, lab = self.be.predict(np.asarray(batch["image"])[ok])
                probs[ok], label[ok] = p, lab
            except Exception as e:  # noqa: BLE001 - recorded per image, as the local engine does
                reason = f"inference failed: {type(e).__name__}: {first_line(e)}"
                status[ok] = "error"
                for k in ok:
                    errors[k] = reason
        return {"idx": idx, "status": status, "label": label, "probs": probs,
                "error": np.asarray(errors, dtype=object), "level": np.asarray([self.level] * n, dtype=object),
                "provider": np.asarray([self.provider] * n, dtype=object)}


def _plan(backend: str, gpus: float, cpus: float) -> tuple[str, float, int]:
    """(backend name for the actors, GPUs per actor, number of actors)."""
    if backend == "torch":
        raise UserError("--engine ray serves an export; --backend torch (a run's checkpoints) runs locally only")
    if backend in ("auto", "onnxruntime"):
        name = "onnxruntime-cuda" if gpus >= 1 else "onnxruntime-cpu"
    elif backend == "tensorrt":
        name = "onnxruntime-tensorrt"
    else:
        name = backend
    on_gpu = name in GPU_BACKENDS
    if on_gpu and gpus < 1:
        raise UserError(f"--backend {backend} with --engine ray needs GPUs in the Ray cluster; it has none")
    if not on_gpu:  # onnxruntime-cpu, or a CPU backend asked for by name (e.g. openvino)
        # one CPU (and one ONNX Runtime thread) per actor; half the CPUs are left to decoding
        return name, 0.0, max(1, int(cpus) // 2)
    return name, 1.0, max(1, int(gpus))


@contextmanager
def ray_cluster(address: Optional[str], clock=time.monotonic):
    """Yields (ray, seconds it took to be ready): the running instance of this process, the
    cluster at ``address`` (or RAY_ADDRESS), else a new local instance shut down on exit."""
    ray = import_ray()
    t = clock()
    started_here = False
    if not ray.is_initialized():
        addr = address or os.environ.get("RAY_ADDRESS") or "local"
        kw = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        if addr == "local":
            from semivit.utils import cpu_count

            kw["num_cpus"] = cpu_count()
        import signal

        sigterm = signal.getsignal(signal.SIGTERM)  # ray.init installs its own, which outlives ray.shutdown
        try:
            ray.init(address=addr, **kw)
        except Exception as e:  # noqa: BLE001 - ConnectionError, RuntimeError, ...: one line
            from semivit.serve.backends import first_line

            raise UserError(f"cannot start or reach Ray at {addr}: {first_line(e)}") from None
        started_here = True
    try:
        yield ray, clock() - t
    finally:
        if started_here:
            ray.shutdown()
            signal.signal(signal.SIGTERM, sigterm)


def predict_rows_ray(ray, paths: list[str], export_dir: Path, img_size: int, batch_size: int, backend: str,
                     deadline: Optional[float], clock=time.monotonic) -> tuple[dict, str, Callable[[], None]]:
    """Run the pipeline; returns ({file index: (status, label index, probs, level, error)}, what ran,
    cancel).  ``deadline`` is on ``clock``: the rows missing when it passes are left out (the
    caller writes them as timeouts) and ``cancel()`` then stops what still runs."""
    res = ray.cluster_resources()
    name, gpus_per_actor, actors = _plan(backend, float(res.get("GPU", 0)), float(res.get("CPU", 1)))
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # per-dataset INFO lines and notes
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    wall_deadline = None if deadline is None else time.time() + (deadline - clock())
    ds = ray.data.from_items([{"idx": i, "path": p} for i, p in enumerate(paths)],
                             override_num_blocks=max(1, min(len(paths) // batch_size + 1, 200)))
    # decoding: stateless tasks.  Their own memory request (a batch of decoded images and the
    # files behind it) also keeps Ray from fusing them into the actors, where decoding would
    # wait for inference instead of running beside it.
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": int(img_size)}, batch_size=batch_size,
                        batch_format="numpy", num_cpus=1, memory=DECODE_MEMORY)
    ds = ds.map_batches(OrtActor, fn_constructor_kwargs={
        "export_dir": str(Path(export_dir).resolve()), "backend": name, "threads": 1,
        "deadline_wall": wall_deadline}, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors), num_gpus=gpus_per_actor, num_cpus=1)
    rows, provider, cancel = _gather(ds, deadline, clock)
    return rows, f"ray {ray.__version__}, {actors} actor{'s' if actors != 1 else ''} x " + (
        provider or f"{name} (no batch came back)"), cancel


def _gather(ds, deadline: Optional[float], clock) -> tuple[dict, Optional[str], Callable[[], None]]:
    """Consume the dataset in a thread; stop waiting at the deadline."""
    q: queue.Queue = queue.Queue()
    stop = threading.Event()

    def cancel() -> None:
        stop.set()
        if not thread.is_alive():
            return
        # Ray Data has no public way to cancel a streaming iteration from another thread; its
        # executor (kept on the dataset for clean-up at garbage collection) is shut down directly,
        # which ends the blocked iteration.  Without it, the pipeline drains: actors turn every
        # batch after the deadline into timeouts without running it.
        executor = getattr(ds, "_current_executor", None)
        if executor is not None:
            try:
                executor.shutdown(force=True)
            except Exception:  # noqa: BLE001 - best effort, the rows are already written
                pass
        thread.join(timeout=30)

    def consume():
        try:
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                if stop.is_set():
                    break  # leaving the iterator shuts the pipeline down (the rest are timeouts)
                q.put(b)
        except BaseException as e:  # noqa: BLE001 - handed to the driver thread
            q.put(e)
        q.put(None)

    thread = threading.Thread(target=consume, name="semivit-ray-gather", daemon=True)
    thread.start()
    rows, provider = {}, None
    while True:
        try:
            item = q.get(timeout=None if deadline is None else max(0.0, deadline - clock()))
        except queue.Empty:
            stop.set()
            break
        if item is None:
            break
        if isinstance(item, BaseException):
            from semivit.serve.backends import first_line

            cause = item
            while getattr(cause, "cause", None) is not None or cause.__cause__ is not None:
                nxt = getattr(cause, "cause", None) or cause.__cause__
                if nxt is cause:
                    break
                cause = nxt
            cancel()
            if isinstance(cause, UserError):
                raise UserError(str(cause)) from None
            raise UserError(f"the Ray pipeline failed: {first_line(item)}") from None
        for k in range(len(item["idx"])):
            rows[int(item["idx"][k])] = (str(item["status"][k]), int(item["label"][k]), item["probs"][k],
                                         str(item["level"][k]), str(item["error"][k]))
        if provider is None and len(item["provider"]):
            provider = str(item["provider"][0])
        if deadline is not None and clock() >= deadline:
            break
    stop.set()
    return rows, provider, cancel


def to_row(rel: str, got, classes: list[str]) -> Row:
    if got is None:
        return Row(rel, "timeout")
    status, lab, probs, level, error = got
    if status != "ok":
        return Row(rel, status, error=error or None)
    return Row(rel, "ok", label=classes[lab], confidence=float(probs[lab]), probs=np.asarray(probs), level=level)
