"""``ssl predict DIR``: every image under DIR gets exactly one row, within the time limit.

Exit codes: 0 when at least one image was predicted (errors and timeouts are counted in a
warning), 1 when files were found but none could be predicted (the output is still written),
2 for a usage problem with nothing written: missing or empty DIR, bad --shard, existing output
without --force, a model that cannot be found or loaded.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from semivit.data.discover import discover_images
from semivit.errors import UserError
from semivit.safe_io import path_text
from semivit.serve.backends import Backend, Level, open_backend
from semivit.serve.engine import run_loop
from semivit.serve.loader import DecodePool, default_workers
from semivit.serve.resolve import resolve_model_dir
from semivit.serve.scheduler import Scheduler, reserve_seconds
from semivit.serve.shard import parse_shard, select_shard
from semivit.serve.writers import check_format, check_output, open_writer
from semivit.utils import info as say  # no wrapping, no markup (paths may hold brackets)
from semivit.utils import warn

ENGINES = ("local", "ray")


@dataclass
class Summary:
    images: int
    ok: int
    errors: int
    timeouts: int
    seconds: float
    images_per_s: float  # predicted images / seconds, the whole command (model load included)
    backend: str
    provider: str  # what really runs, e.g. "onnxruntime 1.31.1 CPUExecutionProvider (2 intra-op threads)"
    model: str
    load_seconds: float
    levels: list[dict] = field(default_factory=list)  # name, tta, members, images
    steps: list[dict] = field(default_factory=list)  # time-limit step-downs: level, images_left, load_seconds
    ignored_files: int = 0
    shard: Optional[str] = None
    time_limit: Optional[float] = None
    out: str = ""
    format: str = "csv"
    exit_code: int = 0
    # seconds of the prediction loop alone (model loaded, decoding running ahead): ok images /
    # loop_seconds is the pipeline's steady rate, without interpreter start, discovery and load
    loop_seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class NotLoaded(Backend):
    """Stands in when the time limit is over before the model could even be loaded."""

    name = "none"

    def __init__(self, ref):
        super().__init__(ref)
        self.levels = [Level("full", bool(ref.meta.get("tta", True)), len(ref.meta.get("members", [])) or 1)]

    def _activate(self, i: int) -> None:
        pass

    def describe(self) -> str:
        return "not loaded: the time limit was over before the model could be loaded"


def command_start() -> float:
    """``time.monotonic()`` at which this command started.

    Run as the ``ssl`` console script, the budget counts from the process start (interpreter and
    imports included), read from /proc; called as a library (tests, other code) it counts from now.
    """
    now = time.monotonic()
    if Path(sys.argv[0]).name != "ssl":
        return now
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        age = uptime - start_ticks / os.sysconf("SC_CLK_TCK")
        if 0.0 <= age < 60.0:
            return now - age
    except (OSError, ValueError, IndexError):
        pass
    return now


def run_predict(dir: Path, model: Optional[Path], out: Path = Path("predictions.csv"),
                time_limit: Optional[float] = None, batch_size: int = 32, backend: str = "auto",
                shard: Optional[str] = None, fmt: str = "csv", force: bool = False,
                workers: Optional[int] = None, started: Optional[float] = None,
                backend_options: Optional[dict] = None, quiet: bool = False, engine: str = "local",
                address: Optional[str] = None) -> Summary:
    t0 = time.monotonic() if started is None else started
    clock = time.monotonic
    if engine not in ENGINES:
        raise UserError(f"--engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    if address is not None and engine != "ray":
        raise UserError("--address is the Ray cluster's address: it needs --engine ray")
    dir = Path(dir)
    if not dir.exists():
        raise UserError(f"input directory not found: {dir}")
    if not dir.is_dir():
        raise UserError(f"{dir} is not a directory")
    shard_t = parse_shard(shard)
    check_format(fmt)
    if batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if time_limit is not None and not (math.isfinite(time_limit) and time_limit > 0):
        raise UserError(f"--time-limit must be a positive number of seconds, not {time_limit:g} "
                        "(leave it out for no limit)")
    out = check_output(Path(out), force)
    if workers is None:
        workers = default_workers()  # a bad SEMIVIT_DECODE_WORKERS: one line before the model loads
    ref = resolve_model_dir(model)

    disc = discover_images(dir)
    if not disc.files:
        extra = f" ({disc.summary()})" if disc.ignored else ""
        raise UserError(f"no images in {dir}{extra}")
    rel_all = [path_text(p.relative_to(dir).as_posix()) for p in disc.files]
    sel = select_shard(rel_all, shard_t)
    rels = [rel_all[k] for k in sel]
    paths = [str(disc.files[k]) for k in sel]
    n = len(rels)
    deadline = None if time_limit is None else t0 + time_limit - reserve_seconds(time_limit, n)
    if engine == "ray":
        return _run_ray(ref, backend, address, paths, rels, batch_size, deadline, t0, fmt, out, disc.ignored,
                        shard, time_limit, quiet)

    # Decoding starts first: the workers fork before any runtime thread pool exists, and they
    # decode the first chunks while the model loads.
    late = deadline is not None and clock() >= deadline  # the limit went on starting up: load nothing
    pool = DecodePool([] if late else paths, ref.img_size, batch_size, workers)
    be = None
    try:
        t_load = clock()
        be = NotLoaded(ref) if late else open_backend(ref, backend, **(backend_options or {}))
        load_s = clock() - t_load
        log = (lambda m: None) if quiet else say
        log(f"model: {ref.describe()}")
        log(f"backend: {be.name} - {be.describe()} (loaded in {load_s:.2f} s)")
        if getattr(be, "why", None):
            log(f"  chosen at export: {be.why}")
        if disc.ignored:
            log(f"input: {disc.summary()}" + (f", shard {shard}: {n} of them" if shard_t else ""))
        elif shard_t:
            log(f"input: {len(rel_all)} images, shard {shard}: {n} of them")
        sched = Scheduler([lv.cost for lv in be.levels], deadline, be.load_estimate, clock)
        with open_writer(fmt, out, be.classes) as writer:
            t_loop = clock()
            counts = _loop(be, pool, sched, rels, writer, quiet)
            loop_s = clock() - t_loop
            seconds = clock() - t0
            summary = Summary(
                images=n, ok=counts.ok, errors=counts.error, timeouts=counts.timeout, seconds=round(seconds, 3),
                images_per_s=round(counts.ok / seconds, 2) if seconds > 0 else 0.0, backend=be.name,
                provider=be.describe(), model=ref.describe(), load_seconds=round(load_s, 3),
                levels=[{"name": lv.name, "tta": lv.tta, "members": lv.members, "images": counts.per_level.get(i, 0),
                         "pool_graph": lv.name in ((ref.meta or {}).get("graph") or {}).get("levels", [])}
                        for i, lv in enumerate(be.levels)],
                steps=[{"level": be.levels[lv].name, "images_left": left, "load_seconds": round(sec, 3)}
                       for lv, left, sec in counts.switches],
                ignored_files=disc.ignored, shard=shard, time_limit=time_limit, out=str(out), format=fmt,
                exit_code=0 if counts.ok or n == 0 else 1, loop_seconds=round(loop_s, 3))
            writer.commit(summary.to_dict())
    finally:
        pool.close(terminate=True)
        if be is not None:
            be.close()
    return summary


def _run_ray(ref, backend, address, paths, rels, batch_size, deadline, t0, fmt, out, ignored, shard,
             time_limit, quiet) -> Summary:
    """``--engine ray``: the rows come from a Ray Data pipeline (semivit.serve.ray_engine); they are
    written here with the same writers, in file order, one per file."""
    from contextlib import nullcontext

    from semivit.serve.ray_engine import import_ray, predict_rows_ray, ray_cluster

    clock = time.monotonic
    import_ray()  # a missing Ray is a one-line error before anything else happens
    if ref.export_dir is None:
        raise UserError(f"--engine ray serves an export with ONNX Runtime: run `ssl export {ref.run_dir}` first")
    late = deadline is not None and clock() >= deadline
    # the output is committed before a local Ray instance started here is shut down (seconds)
    with (nullcontext((None, 0.0)) if late else ray_cluster(address, clock)) as (ray, load_s):
        got, provider, cancel = ({}, "ray: not started, the time limit was over", lambda: None) if late else \
            predict_rows_ray(ray, paths, ref.export_dir, ref.img_size, batch_size, backend, deadline, clock)
        try:
            return _write_ray_rows(ref, got, provider, load_s, rels, t0, fmt, out, ignored, shard, time_limit,
                                   quiet)
        finally:
            cancel()  # after a time limit: stop what still runs, once the output is in place


def _write_ray_rows(ref, got, provider, load_s, rels, t0, fmt, out, ignored, shard, time_limit, quiet) -> Summary:
    from semivit.serve.ray_engine import to_row

    clock = time.monotonic
    log = (lambda m: None) if quiet else say
    log(f"model: {ref.describe()}")
    log(f"engine: {provider} (Ray ready in {load_s:.2f} s)")
    counts = {"ok": 0, "error": 0, "timeout": 0}
    levels = {}
    with open_writer(fmt, out, ref.classes) as writer:
        for i, rel in enumerate(rels):
            row = to_row(rel, got.get(i), list(ref.classes))
            writer.write(row)
            counts[row.status] += 1
            if row.level:
                levels[row.level] = levels.get(row.level, 0) + 1
        seconds = clock() - t0
        level_names = [lv["name"] for lv in (ref.meta.get("levels") or [])] or ["full"]
        summary = Summary(
            images=len(rels), ok=counts["ok"], errors=counts["error"], timeouts=counts["timeout"],
            seconds=round(seconds, 3), images_per_s=round(counts["ok"] / seconds, 2) if seconds > 0 else 0.0,
            backend="ray", provider=provider, model=ref.describe(), load_seconds=round(load_s, 3),
            levels=[{"name": level_names[0], "tta": bool(ref.meta.get("tta", True)),
                     "members": len(ref.meta.get("members", [])) or 1,
                     "images": sum(levels.values())}],
            ignored_files=ignored, shard=shard, time_limit=time_limit, out=str(out), format=fmt,
            exit_code=0 if counts["ok"] or not rels else 1)
        writer.commit(summary.to_dict())
    return summary


def _loop(be, pool, sched, rels, writer, quiet):
    from semivit.progress import progress_bar

    if quiet or os.environ.get("SEMIVIT_QUIET"):
        return run_loop(be, pool, sched, rels, writer)
    with progress_bar(transient=True) as prog:
        task = prog.add_task("predict", total=len(rels), status="")
        return run_loop(be, pool, sched, rels, writer, progress=lambda k: prog.advance(task, k))


def print_summary(s: Summary) -> None:
    say(f"predicted {s.ok} of {s.images} images in {s.seconds:.2f} s ({s.images_per_s:.1f} images/s, "
         f"{'Ray start' if s.backend == 'ray' else 'model load'} {s.load_seconds:.2f} s) -> {s.out}")
    say(f"  backend: {s.backend} - {s.provider}")
    for lv in s.levels:
        if lv["images"] or lv is s.levels[0]:
            say(f"  level {lv['name']}: TTA {'on' if lv['tta'] else 'off'}, {lv['members']} members"
                f"{' + pool graph' if lv.get('pool_graph') else ''}: "
                 f"{lv['images']} images")
    for st in s.steps:
        say(f"  time limit: stepped down to {st['level']} with {st['images_left']} images left "
            f"(loaded in {st['load_seconds']:.2f} s)")
    say(f"  ok {s.ok}, errors {s.errors}, timeouts {s.timeouts}"
         + (f"; time limit {s.time_limit:g} s" if s.time_limit else ""))
    if s.images == 0:
        warn(f"shard {s.shard} holds no images of this directory; wrote an empty {s.format} file")
    elif s.errors or s.timeouts:
        parts = [f"{s.errors} files could not be read" if s.errors else "",
                 f"{s.timeouts} images not reached before the time limit" if s.timeouts else ""]
        warn(f"{s.errors + s.timeouts} warnings: " + ", ".join(p for p in parts if p)
             + " (see the status and error columns)")
    if s.exit_code:
        warn("nothing could be predicted")


def predict_cli(dir: Path, model: Optional[Path] = None, out: Path = Path("predictions.csv"),
                time_limit: Optional[float] = None, batch_size: int = 32, backend: str = "auto",
                shard: Optional[str] = None, fmt: str = "csv", force: bool = False, engine: str = "local",
                address: Optional[str] = None) -> int:
    started = command_start()
    summary = run_predict(dir, model, out=out, time_limit=time_limit, batch_size=batch_size, backend=backend,
                          shard=shard, fmt=fmt, force=force, started=started, engine=engine, address=address)
    print_summary(summary)
    return summary.exit_code
