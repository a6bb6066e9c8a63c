"""Every CPU serving backend of one export on a labeled split: do they serve the same ensemble +
pool graph (``ensemble.graph: pool``)?  The graph's nearest-neighbour search runs in each
backend's own precision (OpenVINO's bf16 hint, INT8 graphs keep its MatMul in FP32), while the
export's accuracy gate scores the members' terms out of fold - this is the check on the served
output, on held-out images.

    python benchmarks/graph_backends.py /tmp/qs3/runs/elpv/export /tmp/qs3/data/elpv \
        --out benchmarks/results/graph_backends
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from sklearn.metrics import f1_score  # noqa: E402

from label_efficiency import commit, cpu_name  # noqa: E402

BACKENDS = ("onnxruntime-cpu", "onnxruntime-int8", "onnxruntime-int8-qdq", "openvino", "openvino-bf16", "torch")


def main() -> None:
    from semivit.data.dataset import decode_many
    from semivit.data.layout import load_eval
    from semivit.serve.backends import open_backend
    from semivit.utils import read_json

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("data", type=Path, help="labeled images (DATA/test/<class>/ or as ssl eval takes them)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    t0 = time.time()
    meta = read_json(args.export / "meta.json")
    ls = load_eval(args.data, meta["classes"])
    dec = decode_many(ls.paths, int(meta["img_size"]))
    y = ls.labels[dec.ok]
    rows, ref = [], None
    for name in BACKENDS:
        try:
            be = open_backend(args.export, name)
        except Exception as e:  # noqa: BLE001 - unavailable here: recorded, not fatal
            rows.append({"backend": name, "skipped": str(e).splitlines()[0][:200]})
            continue
        p = np.concatenate([be.predict(dec.images[s:s + 32])[0] for s in range(0, len(dec.images), 32)])
        ref = p if ref is None else ref
        rows.append({"backend": name, "provider": be.describe(),
                     "macro_f1": round(float(f1_score(y, p.argmax(1), average="macro")), 4),
                     "accuracy": round(float((p.argmax(1) == y).mean()), 4),
                     "argmax_agreement_with_onnxruntime_fp32": round(float((p.argmax(1) == ref.argmax(1)).mean()), 4),
                     "max_abs_prob_diff_vs_onnxruntime_fp32": round(float(np.abs(p - ref).max()), 5)})
    doc = {"benchmark": "graph_backends", "command": " ".join(sys.argv), "commit": commit(), "machine": cpu_name(),
           "wall_seconds": round(time.time() - t0, 1), "export": str(args.export), "images": int(len(y)),
           "graph": meta.get("graph"), "serving_auto": (meta.get("serving") or {}).get("auto"), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    g = meta.get("graph") or {}
    lines = ["# One export, every CPU backend, on held-out images (`benchmarks/graph_backends.py`)", "",
             f"Machine: {doc['machine']}. Commit `{doc['commit']}`. Wall time {doc['wall_seconds']:.0f} s.  Export "
             f"`{args.export}` ({len(meta.get('members', []))} members, flip TTA"
             + (f", pool graph: {g.get('labeled')} labeled + {g.get('pool')} unlabeled nodes, k {g.get('neighbors')}, "
                f"share {g.get('share')}, in levels {g.get('levels')}" if g else ", no pool graph")
             + f"); {len(y)} labeled images of `{args.data}`; `--backend auto` serves `{doc['serving_auto']}`.", "",
             "| backend | macro F1 | accuracy | arg-max agreement with ONNX Runtime FP32 | max abs prob diff |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} | | | |")
        else:
            lines.append(f"| {r['backend']} | {r['macro_f1']:.4f} | {r['accuracy']:.4f} "
                         f"| {r['argmax_agreement_with_onnxruntime_fp32']:.4f} | {r['max_abs_prob_diff_vs_onnxruntime_fp32']:.5f} |")
    lines += ["", f"Command: `{doc['command']}`"]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
