"""Small shared helpers: seeding, atomic writes, hashing, console output, devices."""

from __future__ import annotations

import csv
import functools
import hashlib
import io
import json
import os
import sys
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from rich.console import Console

console = Console(stderr=True, highlight=False)


def warn(msg: str) -> None:
    console.print("[yellow]warning:[/yellow] ", end="", soft_wrap=True)
    info(msg)


def info(msg: str) -> None:
    """A line on stderr: no hard wrap (log files), no markup - messages hold paths and install hints
    with brackets (``pip install 'semivit[openvino]'``) that rich would take for style tags."""
    console.print(msg, soft_wrap=True, markup=False)


def seed_everything(seed: int) -> None:
    """One seed for python, numpy and torch (and CUDA when present)."""
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))


@contextmanager
def atomic_path(path: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync and rename it into place.

    A process killed midway leaves only a ``.tmp`` file, never a half-written ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=suffix + ".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        # mkstemp creates the file 0600; give the result the mode a plain open() would have
        # (e.g. a registry or predictions.csv read by a serving user).
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        fsync_dir(path.parent)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@functools.lru_cache(maxsize=1)
def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_csv(path: Path, rows: list[dict]) -> None:
    """A training history (one dict per epoch) as CSV: a header with every key any row has, in
    first-seen order; rewritten atomically after every epoch (metrics.csv, MAE's loss.csv)."""
    if not rows:
        return
    keys: list = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=keys)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def read_format_json(path: Path, fmt: str, missing: str, wrong: str) -> dict:
    """A semivit JSON document (ensemble.json, meta.json): ``missing`` as the UserError when the
    file is absent, ``wrong`` (plus the format found) when its ``format`` is not ``fmt``."""
    from semivit.errors import UserError

    path = Path(path)
    if not path.is_file():
        raise UserError(missing)
    try:
        doc = read_json(path)
    except (ValueError, UnicodeDecodeError) as e:  # truncated or not JSON at all
        raise UserError(f"{wrong} (not valid JSON: {e})") from None
    if not isinstance(doc, dict) or doc.get("format") != fmt:
        raise UserError(f"{wrong} (format {doc.get('format') if isinstance(doc, dict) else None!r})")
    return doc


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a regular file; a FIFO/device raises OSError at once instead of blocking."""
    from semivit.safe_io import open_regular

    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def resolve_device(name: str = "auto"):
    """``auto`` -> cuda when available else cpu.  Asking for cuda without one is an error."""
    import torch

    from semivit.errors import UserError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is available")
    return torch.device(name)


def env_int(name: str, low: int, high: int | None = None, what: str = "a whole number",
            environ=None) -> int | None:
    """The environment variable ``name`` as an int in [low, high], None when unset or empty; any
    other value is a one-line UserError that names the variable and what it must be."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = None
    if n is None or n < low or (high is not None and n > high):
        from semivit.errors import UserError

        raise UserError(f"{name} must be {what}, not {raw!r}")
    return n


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset:
    """This CPU's feature flags (``/proc/cpuinfo``), read at run time: never assume them."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls: AVX512-BF16 or AMX-BF16 (without them bf16 is emulated and slow)."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_has_vnni() -> bool:
    """Fast int8 dot products: AVX512-VNNI, AVX-VNNI or AMX-INT8."""
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & cpu_flags())


def physical_core_count() -> int:
    """Physical cores this process may use: /proc/cpuinfo's (physical id, core id) pairs, capped
    by the affinity mask (os.sched_getaffinity) and a cgroup CPU quota."""
    import math

    n = cpu_count()
    try:
        cores, phys, core = set(), None, None
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":")[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":")[1].strip()
                elif not line.strip():
                    if core is not None:
                        cores.add((phys, core))
                    phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            n = min(n, len(cores))
    except OSError:
        pass
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, n)


def keep_freed_memory(environ=None) -> bool:
    """Tell glibc's malloc to keep freed memory for reuse instead of handing it back to the OS.

    PyTorch's CPU allocator has no cache: every tensor is a ``posix_memalign`` and a ``free``.
    glibc serves blocks above its mmap threshold with a fresh ``mmap`` and unmaps (or trims) them
    on free, so each training step faults its activations' pages in again and the kernel zeroes
    them: measured on the quick preset (one stage-1 fold, 1 thread, 2-core AMD EPYC;
    benchmarks/results/malloc_fold.json), 10.6 M minor page faults and 26.1 s of system time in a
    55.8 s fold; with these two settings 0.27 M faults, 1.1 s and 26.6 s.  The usual advice (PyTorch's CPU performance guide) is to preload jemalloc or
    tcmalloc; ``mallopt`` gets the same effect for this workload with no extra library or
    ``LD_PRELOAD``.  Freed memory stays with the process (its RSS stays at its peak, as with a
    caching allocator).  ``SEMIVIT_MALLOC=system`` leaves glibc's defaults; a non-glibc libc is
    left alone.  Returns whether the settings were applied."""
    env = os.environ if environ is None else environ
    if env.get("SEMIVIT_MALLOC", "").lower() == "system" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
    # blocks up to 1 GiB from the heap (not mmap); never trim the heap's top below 2 GiB free
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1))


def cpu_runtime_defaults(environ=None, training: bool = False) -> dict:
    """OpenMP defaults for the PyTorch paths (training, ``--backend torch``), set before torch is
    imported (OpenMP reads them once, at start-up); a value the user set is kept.

    - ``OMP_NUM_THREADS``: one thread per usable physical core (affinity mask and cgroup quota
      respected; SMT siblings add no matmul throughput).
    - ``OMP_WAIT_POLICY=PASSIVE`` (not for ``training``): idle OpenMP workers sleep instead of
      spinning between parallel regions.  Spinning workers burn the time slices another process
      on the same cores needs and, worse, are descheduled while the next region waits for them:
      beside one busy process per core PyTorch fell far below its fair share
      (benchmarks/results/speed.md, contention).  Training keeps OpenMP's default (spin a while,
      then sleep): quietly it trains 1.36x faster than PASSIVE (speed.md: 210.4 vs 154.4 images/s), and
      its loop has a thread governor (:mod:`semivit.trainer.threads`) that drops to one thread -
      no barrier to wait at - when other processes compete.

    ONNX Runtime (``session.intra_op.allow_spinning=0``) and OpenVINO (single-threaded streams,
    CPU pinning off) get the same robustness through their own session options.  Returns what
    was set."""
    env = os.environ if environ is None else environ
    done = {}
    defaults = [("OMP_NUM_THREADS", str(physical_core_count()))]
    if not training:
        defaults.append(("OMP_WAIT_POLICY", "PASSIVE"))
    for key, value in defaults:
        if not env.get(key):
            env[key] = done[key] = value
    return done
