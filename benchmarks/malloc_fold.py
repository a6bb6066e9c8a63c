"""What glibc's malloc settings cost the trainer: one stage-1 fold of the quick preset on the
ELPV demo data (its frozen-stem feature cache included), in a new process each, with glibc's
defaults (``SEMIVIT_MALLOC=system``) and with ``semivit.utils.keep_freed_memory`` (what ``ssl``
does): seconds, minor page faults, user and system CPU time.

    python benchmarks/malloc_fold.py [--data DATA] [--epochs 6] [--threads 1] [--out benchmarks/results/malloc_fold.json]

DATA defaults to the demo data written by ``ssl demo-data`` (made in a scratch folder if needed).
Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

CHILD = r"""
import json, resource, shutil, sys, time
from pathlib import Path
from semivit.utils import keep_freed_memory
applied = keep_freed_memory()
from semivit import config as cfgmod
from semivit.trainer.folds import train_fold
from semivit.trainer.run import open_run
out, data, epochs = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
shutil.rmtree(out, ignore_errors=True)
cfg = cfgmod.resolve(preset="quick", overrides=[f"train.epochs={epochs}", f"train.restart_epochs={epochs}",
                                                 "train.patience=1000"])
run = open_run(out, cfg, data)
_ = run.images
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.time()
d = train_fold(run, "stage1", 0)
r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.time()
print("RESULT", json.dumps({"keep_freed_memory": applied, "fold_seconds": round(t1 - t0, 1), "steps": d.get("steps"),
      "minor_page_faults": r1.ru_minflt - r0.ru_minflt, "system_seconds": round(r1.ru_stime - r0.ru_stime, 1),
      "user_seconds": round(r1.ru_utime - r0.ru_utime, 1)}))
"""


def main() -> None:
    from label_efficiency import commit, cpu_name
    from quickstart_time import cpu_flags

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "malloc_fold.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="semivit-malloc-"))
    data = args.data
    if data is None:
        data = work / "data"
        subprocess.run([sys.executable, "-m", "semivit.cli", "demo-data", str(data)], check=True,
                       stdout=subprocess.DEVNULL)
    rows = {}
    load_start = list(os.getloadavg())
    for mode in ("system", "kept"):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), SEMIVIT_QUIET="1",
                   SEMIVIT_MALLOC="system" if mode == "system" else "")
        out = subprocess.run([sys.executable, "-c", CHILD, str(work / f"run-{mode}"), str(data), str(args.epochs)],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows[mode] = json.loads([ln for ln in out.splitlines() if ln.startswith("RESULT")][-1].split(" ", 1)[1])
        print(mode, rows[mode], flush=True)
    doc = {"benchmark": "malloc_fold", "command": "python benchmarks/malloc_fold.py " + " ".join(sys.argv[1:]),
           "commit": commit(), "machine": {"cpu": cpu_name(), "usable_cpus": len(os.sched_getaffinity(0)),
                                           "cpu_flags": cpu_flags()},
           "threads": args.threads, "epochs": args.epochs, "load_average_start": load_start,
           "load_average_end": list(os.getloadavg()), "glibc_defaults": rows["system"], "kept": rows["kept"],
           "speedup": round(rows["system"]["fold_seconds"] / rows["kept"]["fold_seconds"], 2)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"{doc['speedup']}x -> {args.out}")


if __name__ == "__main__":
    main()
