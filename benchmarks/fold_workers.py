"""Stage 1 of ``ssl train`` with its folds trained one at a time vs side by side, alone and
beside busy processes (issue 16: training under contention; semivit.trainer.fold_workers).

Each measurement is a new process that opens a run on the ELPV demo data (the quickstart's: 20%
labels, the quick preset), loads the stem features of the labeled views computed once by this
script (so every measurement times training alone, not the stem), and times
``run_stage(run, "stage1")`` - all folds, ``--epochs`` epochs each - as ``ssl train`` runs it:

- ``one fold at a time``: ``train.fold_workers=1``, every core's thread in one process, OpenMP's
  default wait policy and the thread governor (what ``ssl train`` did before fold workers);
- ``fold workers (auto)``: the default now, one forked process with one thread per core.

Each runs alone, then beside one busy process per usable core (``python -c 'while True: pass'``,
started first: a fair share is 0.5x), ``--repeats`` times, alternating.  The statistic: training
images per second of wall time over the whole stage (the folds' optimiser steps x batch size /
the stage's wall time).  Both modes train the same folds to the same result (the fold workers'
arithmetic is the one-thread run's), so the wall time is the whole difference.

    python benchmarks/fold_workers.py --out benchmarks/results/fold_workers

Results: OUT.{json,md} with the machine, the commit and the wall time.  Benchmark on a quiet
machine: the script starts its own competitors.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

MODES = {  # name -> (train.fold_workers, environment on top of the parent's)
    "one fold at a time (train.fold_workers=1: all threads, thread governor)": ("1", {"OMP_WAIT_POLICY": None}),
    "fold workers (train.fold_workers=auto, the default)": ("auto", {"OMP_WAIT_POLICY": None}),
}


def _config(workers: str, epochs: int):
    from semivit import config

    return config.resolve(overrides=[f"train.epochs={epochs}", f"train.restart_epochs={epochs}",
                                     f"train.fold_workers={workers}"])


def child(a) -> None:
    """One measurement: stage 1 of a fresh run directory; prints one JSON line."""
    import numpy as np

    from semivit.trainer.folds import run_stage
    from semivit.trainer.run import open_run

    out = Path(a.work) / f"run-{os.getpid()}"
    try:
        run = open_run(out, _config(a.workers, a.epochs), Path(a.data))
        run.__dict__["labeled_views"] = np.load(Path(a.work) / "labeled_views.npy")  # the cached_property, computed once
        t0 = time.perf_counter()
        folds = run_stage(run, "stage1")
        seconds = time.perf_counter() - t0
        images = sum(f["steps"] for f in folds) * run.cfg.train.batch_size
        print(json.dumps({"seconds": round(seconds, 2), "images": int(images),
                          "images_per_s": round(images / seconds, 2), "steps": [f["steps"] for f in folds],
                          "val_macro_f1": [round(f["val_macro_f1"], 6) for f in folds],
                          "threads": [f.get("threads") for f in folds]}), flush=True)
    finally:
        shutil.rmtree(out, ignore_errors=True)


def measure(a, workers: str, env: dict) -> dict:
    e = {**os.environ, "SEMIVIT_QUIET": "1", **env}
    e = {k: v for k, v in e.items() if v is not None}
    cmd = [sys.executable, __file__, "--child", "--workers", workers, "--epochs", str(a.epochs),
           "--data", str(a.data), "--work", str(a.work)]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()][-1:] or ["no output"]
        return {"error": f"exit {r.returncode}: {tail[0][:300]}"}
    return json.loads(lines[-1])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--epochs", type=int, default=8, help="epochs per fold (the quick preset trains 40)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--competitors", type=int, default=None, help="busy processes (default: one per usable core)")
    ap.add_argument("--data", type=Path, default=None, help="DATA (default: the ELPV demo data, 20%% labels)")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workers", default="auto", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        return child(a)
    if a.out is None:
        ap.error("--out is required")
    import numpy as np

    import speed
    from semivit.data.demo import ensure_default_data
    from semivit.trainer.run import open_run
    from semivit.utils import cpu_count

    t0 = time.time()
    a.data = Path(a.data or ensure_default_data(seed=0))
    a.work = Path(a.work or tempfile.mkdtemp(prefix="semivit-fold-workers-"))
    a.work.mkdir(parents=True, exist_ok=True)
    views = a.work / "labeled_views.npy"
    if not views.is_file():
        print("stem features of the labeled views (once)", flush=True)
        run = open_run(a.work / "views-run", _config("1", a.epochs), a.data)
        np.save(views, run.labeled_views)
        shutil.rmtree(a.work / "views-run", ignore_errors=True)
    cores = cpu_count()
    busy = cores if a.competitors is None else a.competitors
    rows = {name: {"alone": [], "loaded": []} for name in MODES}
    for rep in range(a.repeats):
        for name, (workers, env) in MODES.items():
            for where in ("alone", "loaded"):
                procs = speed.busy_processes(busy) if where == "loaded" else []
                try:
                    time.sleep(0.5 if procs else 0)
                    r = measure(a, workers, env)
                finally:
                    speed.stop(procs)
                rows[name][where].append(r)
                print(f"[{rep + 1}/{a.repeats}] {name}, {where}: {r.get('images_per_s', r.get('error'))} images/s "
                      f"({r.get('seconds')} s)", flush=True)
    summary = []
    for name, r in rows.items():
        al = [x["images_per_s"] for x in r["alone"] if "images_per_s" in x]
        lo = [x["images_per_s"] for x in r["loaded"] if "images_per_s" in x]
        row = {"mode": name, "alone_images_per_s": al, "loaded_images_per_s": lo}
        if al and lo:
            row.update({"alone_median": round(statistics.median(al), 2), "loaded_median": round(statistics.median(lo), 2),
                        "ratio": round(statistics.median(lo) / statistics.median(al), 3)})
        summary.append(row)
    base = summary[0].get("alone_median")
    for row in summary:
        if base and row.get("loaded_median"):
            row["loaded_vs_one_at_a_time_alone"] = round(row["loaded_median"] / base, 3)
        if base and row.get("alone_median"):
            row["alone_vs_one_at_a_time_alone"] = round(row["alone_median"] / base, 3)
    same = [x.get("val_macro_f1") for r in rows.values() for w in r.values() for x in w if "val_macro_f1" in x]
    m = speed.machine()
    doc = {"benchmark": "fold_workers", "machine": m["cpu_name"], "commit": m["git_commit"], "machine_info": m,
           "cores": cores, "competitors": busy, "competitor": "python -c 'while True: pass' (one busy core each)",
           "epochs_per_fold": a.epochs, "data": str(a.data), "repeats": a.repeats,
           "statistic": "training images (steps x batch) per second of the stage's wall time; median over repeats",
           "fair_share": round(min(1.0, cores / (cores + busy)) if busy else 1.0, 3), "target": 0.4,
           "summary": summary, "runs": rows,
           "fold_val_macro_f1_per_run": same,
           "wall_seconds": round(time.time() - t0, 1),
           "command": " ".join(["python", "benchmarks/fold_workers.py"] + (argv or sys.argv[1:]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Stage 1's folds one at a time vs side by side (fold workers), alone and beside busy processes", "",
             f"Machine: {doc['machine']} ({cores} usable cores). Commit `{doc['commit']}`. Wall time "
             f"{doc['wall_seconds']:.0f} s. Command: `{doc['command']}`.", "",
             f"ELPV demo data (20% labels), the quick preset's stage 1 with {a.epochs} epochs per fold; beside {busy} "
             f"competitor(s) ({doc['competitor']}): a fair share is {doc['fair_share']:g}x, issue 16's target >= 0.4x. "
             f"{doc['statistic']} ({a.repeats} repeats, alternating).", "",
             "| mode | alone images/s | beside busy | ratio | beside busy vs one-at-a-time alone | alone vs one-at-a-time alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        lines.append(f"| {r['mode']} | {r.get('alone_median', '-')} ({', '.join(map(str, r['alone_images_per_s']))}) | "
                     f"{r.get('loaded_median', '-')} ({', '.join(map(str, r['loaded_images_per_s']))}) | {r.get('ratio', '-')} | "
                     f"{r.get('loaded_vs_one_at_a_time_alone', '-')} | {r.get('alone_vs_one_at_a_time_alone', '-')} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}.md")


if __name__ == "__main__":
    main()
