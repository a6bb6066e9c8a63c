"""Training beside busy processes, measured over a training-length window (issue 16).

speed.py's contention section measures each workload for ~10 s.  The thread governor
(semivit.trainer.threads) starts at all cores and first probes one thread after 8 steps, so in
10 s under contention (~20 steps) most of the window runs the count it is about to leave: that
row measures the governor's warm-up.  This script measures the same bare training loop
(benchmarks/engines.py ``train``: the quick preset's architecture, batch 32, the run's precision)
alone and beside one busy process per usable core (``--competitors``: another count; they start
before it), for ``--seconds`` windows (default 10 and 90): as ``ssl train`` runs it (OpenMP's
default wait policy, the thread governor), and fixed thread counts and wait policies
(``OMP_WAIT_POLICY=PASSIVE``; ``--spincount``: libgomp's GOMP_SPINCOUNT too); the statistic is speed.py's (median images/s over the passes of 2
steps).  The quick architecture's untrained weights: cost does not depend on them.

    python benchmarks/train_contention.py --seconds 10 60 --out benchmarks/results/train_contention

A rule tried and not adopted - ``ssl train`` on a machine already busy at its start sets
``OMP_WAIT_POLICY=PASSIVE`` - was measured with this script at commit aa24847
(benchmarks/results/train_contention_passive_at_start*.md; README Results).

Results: OUT.{json,md} with the machine, the commit and the wall time.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import predict_speed  # noqa: E402
import speed  # noqa: E402  (alone_and_loaded, thread_env, machine: one copy of each)


GOVERNOR = "thread governor (as `ssl train` runs it)"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, nargs="+", default=[10.0, 90.0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--spincount", type=int, nargs="*", default=[],
                    help="also 2 threads fixed and the thread governor at these GOMP_SPINCOUNT values")
    ap.add_argument("--competitors", type=int, default=None, help="busy processes beside it (default: one per usable core)")
    ap.add_argument("--only", nargs="*", default=None, help="workloads whose name contains one of these")
    a = ap.parse_args(argv)
    from semivit.utils import cpu_count

    t0 = time.time()
    cores = cpu_count()
    busy = cores if a.competitors is None else a.competitors
    work = Path(tempfile.mkdtemp(prefix="semivit-train-contention-"))
    run = predict_speed.untrained_quick_run(work, members=2)
    x = np.random.default_rng(0).integers(0, 255, (4 * a.batch, 128, 128, 3), dtype=np.uint8)
    np.save(work / "x.npy", x)
    common = ["--run", run, "--images", work / "x.npy", "--batch", a.batch, "--reps", 1, "--work", work / "engines"]
    unset = {"OMP_WAIT_POLICY": None}  # OpenMP's default, as `ssl train` runs (the governor's choice)
    workloads = {
        GOVERNOR: (["train", *common, "--steps", 2, "--governor", "--threads", cores], unset),
        f"{cores} threads fixed": (["train", *common, "--steps", 2, "--threads", cores], unset),
        "1 thread fixed": (["train", *common, "--steps", 2, "--threads", 1], unset),
        # OpenMP's wait policy set at process start (it cannot change once OpenMP has started):
        # workers sleep at once (PASSIVE) or spin only briefly (GOMP_SPINCOUNT, libgomp's knob)
        f"{cores} threads fixed, OMP_WAIT_POLICY=PASSIVE": (["train", *common, "--steps", 2, "--threads", cores],
                                                         {"OMP_WAIT_POLICY": "PASSIVE"}),
    }
    for n in a.spincount:  # more spin counts, fixed threads (a sweep), and the governor with it
        workloads[f"{cores} threads fixed, GOMP_SPINCOUNT={n}"] = (["train", *common, "--steps", 2, "--threads", cores],
                                                                {**unset, "GOMP_SPINCOUNT": str(n)})
        workloads[f"{GOVERNOR}, GOMP_SPINCOUNT={n}"] = (["train", *common, "--steps", 2, "--governor", "--threads", cores],
                                                      {**unset, "GOMP_SPINCOUNT": str(n)})
    if a.only:
        workloads = {k: v for k, v in workloads.items() if any(o in k for o in a.only)}
    rows = []
    for secs in a.seconds:
        for name, (argv_, env) in workloads.items():
            print(f"{name}, {secs:g} s", flush=True)
            row = speed.alone_and_loaded(name, [*argv_, "--seconds", secs], {**speed.thread_env(cores), **env}, busy)
            rows.append({**row, "seconds": secs})
            print(f"   {row.get('alone_images_per_s')} -> {row.get('loaded_images_per_s')} ({row.get('ratio')}x)", flush=True)
    # the ratio against what `ssl train` does alone (the governor's quiet throughput)
    quiet = {r["seconds"]: r.get("alone_images_per_s") for r in rows if r["workload"] == GOVERNOR}
    for r in rows:
        if quiet.get(r["seconds"]) and r.get("loaded_images_per_s"):
            r["ratio_vs_governor_alone"] = round(r["loaded_images_per_s"] / quiet[r["seconds"]], 3)
    m = speed.machine()  # CPU, flags, commit, load average: speed.py's own record
    doc = {"benchmark": "train_contention", "machine": m["cpu_name"], "commit": m["git_commit"], "machine_info": m,
           "cores": cores,
           "competitors": busy, "competitor": "python -c 'while True: pass' (one busy core each)", "batch": a.batch,
           "statistic": "median images/s over the passes (2 steps each) of one window", "fair_share": round(min(1.0, cores / (cores + busy)) if busy else 1.0, 3),
           "target": 0.4, "rows": rows, "wall_seconds": round(time.time() - t0, 1),
           "command": " ".join(["python", "benchmarks/train_contention.py"] + (argv or sys.argv[1:]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["# Training beside busy processes, by window length", "",
             f"Machine: {doc['machine']} ({cores} usable cores). Commit `{doc['commit']}`. Wall time {doc['wall_seconds']:.0f} s. "
             f"Command: `{doc['command']}`.", "",
             f"Beside {busy} competitor(s) ({doc['competitor']}): a fair share is {doc['fair_share']:g}x, issue 16's target >= 0.4x (beside one per core). "
             f"Quick preset architecture, batch {a.batch}; {doc['statistic']}.", "",
             "| workload | window s | alone images/s | beside busy | ratio | vs the governor alone |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        gov = (r["loaded"].get("governor") or {}) if isinstance(r.get("loaded"), dict) else {}
        note = f" (beside busy: ended at {gov.get('threads')} thread(s), {len(gov.get('switches', []))} switches)" if gov else ""
        lines.append(f"| {r['workload']}{note} | {r['seconds']:g} | {r.get('alone_images_per_s', '-')} | "
                     f"{r.get('loaded_images_per_s', r['loaded'].get('error', '-'))} | {r.get('ratio', '-')} | "
                     f"{r.get('ratio_vs_governor_alone', '-')} |")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}.md")


if __name__ == "__main__":
    main()
