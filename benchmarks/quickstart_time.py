"""How long the default ``ssl train`` (and ``ssl export``) takes on this machine: README's quickstart.

Runs, in a scratch directory, exactly the quickstart's commands on the embedded ELPV demo data
(``ssl demo-data``, ``ssl train DATA --out RUN``, ``ssl export RUN``), times each as a new process,
and records the run's own stage timings, held-out scores, pseudo-label statistics and the serving
choice of the export, with the machine, the commit and the load average.

    python benchmarks/quickstart_time.py [--work /tmp/semivit-quickstart] [--out benchmarks/results/quickstart_time.json]

``--collect RUN --train-seconds S --export-seconds S`` records a run made by hand the same way
(the wall times measured with ``/usr/bin/time``) instead of training one.  Benchmark on a quiet
machine: on a 2-core box another CPU-heavy process slows training several times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit, cpu_name  # noqa: E402  (one machine description for all results)


def timed(cmd: list[str], cwd: Path) -> float:
    t0 = time.time()
    subprocess.run(cmd, cwd=cwd, check=True)
    return round(time.time() - t0, 1)


def cpu_flags() -> dict:
    """The CPU features that decide the fast paths, as semivit reads them (semivit.utils.cpu_flags)."""
    from semivit.utils import cpu_flags as flags

    have = flags()
    return {f: f in have for f in ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")}


def collect(run: Path, train_s: float, export_s: float | None, command: str, code: str | None = None) -> dict:
    heldout = json.loads((run / "heldout.json").read_text())
    stats = json.loads((run / "pseudo" / "stats.json").read_text())
    meta_path = run / "export" / "meta.json"
    serving = json.loads(meta_path.read_text()).get("serving") if meta_path.exists() else None
    cfg = yaml.safe_load((run / "config.yaml").read_text())["config"]
    ens = {k: {"macro_f1": round(v["macro_f1"], 4), "accuracy": round(v["accuracy"], 4)}
           for k, v in heldout.items() if isinstance(v, dict) and "macro_f1" in v}
    return {
        "benchmark": "quickstart_time", "command": command, "commit": code or commit(),
        "machine": {"cpu": cpu_name(), "usable_cpus": len(os.sched_getaffinity(0)), "cpu_flags": cpu_flags()},
        "load_average_end": None if code else list(os.getloadavg()),  # a collected run: measured earlier
        "preset": cfg.get("preset"), "pseudo": cfg.get("pseudo"),
        "train_wall_seconds": train_s, "export_wall_seconds": export_s,
        "stage_seconds": yaml.safe_load((run / "timings.yaml").read_text()),
        "heldout": ens,
        "pseudo_labels": {"selected": stats.get("selected"), "of": stats.get("unlabeled"),
                          "by_class": stats.get("by_class"),
                          "agreement_with_truth": (stats.get("truth") or {}).get("by_source")},
        "serving_auto": serving,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-quickstart"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quickstart_time.json")
    ap.add_argument("--collect", type=Path, help="an existing quickstart run (RUN) to record instead")
    ap.add_argument("--train-seconds", type=float)
    ap.add_argument("--export-seconds", type=float)
    ap.add_argument("--commit", help="with --collect: the code the run was made with, when not HEAD")
    args = ap.parse_args()
    if args.collect:
        if args.train_seconds is None:
            raise SystemExit("error: --collect needs --train-seconds (the measured wall time)")
        doc = collect(args.collect, args.train_seconds, args.export_seconds,
                      "ssl demo-data data/elpv && ssl train data/elpv --out runs/elpv && ssl export runs/elpv "
                      "(each under /usr/bin/time; recorded with " + " ".join(sys.argv) + ")", args.commit)
    else:
        ssl = [sys.executable, "-m", "semivit.cli"]
        args.work.mkdir(parents=True, exist_ok=True)
        run = args.work / "runs" / "elpv"
        if run.exists():
            raise SystemExit(f"error: {run} exists; give a fresh --work")
        timed(ssl + ["demo-data", "data/elpv"], args.work)
        train_s = timed(ssl + ["train", "data/elpv", "--out", "runs/elpv"], args.work)
        export_s = timed(ssl + ["export", "runs/elpv"], args.work)
        doc = collect(run, train_s, export_s, "python benchmarks/quickstart_time.py " + " ".join(sys.argv[1:]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"ssl train {doc['train_wall_seconds']:.0f} s, ssl export {doc['export_wall_seconds']} s -> {args.out}")


if __name__ == "__main__":
    main()
