"""One serving backend timed in a process of its own: ``python -m semivit.serve.timing``.

``ssl export`` (:mod:`semivit.export.candidates`) starts one of these per serving candidate that
passed the accuracy gate, so that each engine runs with its own thread pools - ONNX Runtime's
intra-op threads, OpenVINO's TBB workers, OpenMP - as it does under ``ssl predict``.  Several
engines opened in one process share and disturb those pools, and the ranking they gave there was
not the one each engine has on its own.  The export drives the rounds, one process computing at a
time, so the rounds stay interleaved over the candidates (a passing load burst hits them all alike).

Protocol (one JSON object per line on the process's original stdout; anything a library prints
goes to stderr):

    start-up   open the backend with :func:`semivit.serve.backends.open_backend` as ``ssl predict``
               does, warm it up on every batch shape, then write
               ``{"ready": true, "runs": DESCRIBE, "pid": PID, "load_seconds": S}``
               - or ``{"error": MESSAGE}`` and exit 2 when it cannot be opened
    "round"    time passes over all the batches until at least ``--seconds`` have passed
               (one pass at least), then write ``{"images_per_s": X, "passes": K, "seconds": S}``
    EOF/"quit" exit 0
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def _batches(images, batch: int) -> list:
    import numpy as np

    return [np.ascontiguousarray(images[s:s + batch]) for s in range(0, len(images), batch)]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m semivit.serve.timing", description=__doc__.splitlines()[0])
    ap.add_argument("--export", type=Path, required=True, help="the export directory (its graph files)")
    ap.add_argument("--meta", type=Path, required=True, help="its meta.json document (the export's, in the making)")
    ap.add_argument("--backend", required=True, help="the backend's registry name")
    ap.add_argument("--images", type=Path, required=True, help=".npy of uint8 NHWC images at the model's size")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=0, help="inference threads (0: the backend's default)")
    ap.add_argument("--seconds", type=float, default=2.0, help="least seconds of timing per round")
    a = ap.parse_args(argv)
    # the protocol keeps the original stdout; fd 1 (and sys.stdout) now go to stderr
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)

    def say(doc: dict) -> None:
        proto.write(json.dumps(doc) + "\n")
        proto.flush()

    import numpy as np

    from semivit.errors import UserError
    from semivit.serve.backends import open_backend
    from semivit.serve.resolve import ModelRef

    meta = json.loads(a.meta.read_text())
    ref = ModelRef(path=a.export, export_dir=a.export, run_dir=None, classes=list(meta["classes"]),
                   img_size=int(meta["img_size"]), meta=meta)
    images = np.load(a.images)
    batches = _batches(images, max(1, a.batch))
    t = time.perf_counter()
    try:
        be = open_backend(ref, a.backend, **({"threads": a.threads} if a.threads else {}))
        shapes = set()
        for b in batches:  # warm-up: first-call allocations and kernel selection, per batch shape
            if b.shape not in shapes:
                shapes.add(b.shape)
                be.predict(b)
    except UserError as e:
        say({"error": str(e).splitlines()[0] if str(e) else type(e).__name__})
        return 2
    say({"ready": True, "runs": be.describe(), "pid": os.getpid(), "load_seconds": round(time.perf_counter() - t, 2)})
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "quit":
            break
        if cmd != "round":
            continue
        passes, t0 = 0, time.perf_counter()
        while True:
            for b in batches:
                be.predict(b)
            passes += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= a.seconds:
                break
        say({"images_per_s": passes * len(images) / elapsed, "passes": passes, "seconds": round(elapsed, 3)})
    be.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
