"""The serving candidates an export built, gated and timed, as a results file.

``ssl export`` records in EXPORT/meta.json ("serving") every candidate it considered (its
out-of-fold macro F1 against FP32, the gate's verdict, images/s timed in a process of its own)
and which one ``ssl predict --backend auto`` will use.  This writes that record, with the machine
and the commit, to ``--out``.json/.md:

    ssl export runs/elpv --force   # (timed with /usr/bin/time or date)
    python benchmarks/export_candidates.py runs/elpv/export --export-seconds 210 \
        --out benchmarks/results/export_candidates
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit  # noqa: E402


def render(serving: dict, export_seconds: float | None, code: str, export: str) -> list[str]:
    m = serving.get("machine", {})
    flags = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f in (m.get("flags") or [])]
    t = serving.get("timing", {})
    lines = [f"# Serving candidates of the export `{export}` (`ssl export`)", "",
             f"Machine: {m.get('cpu', '?')} ({', '.join(flags) or 'no VNNI/bf16/AMX'}), {m.get('threads')} threads.  "
             + (f"Export wall time {export_seconds:.1f} s.  " if export_seconds else "")
             + f"Timing: {t.get('method', '?')}, {t.get('images')} images in batches of {t.get('batch')}, "
               f"{t.get('statistic', '')}.  Recorded at commit {code}.", "",
             f"Gate: {serving['gate']['metric']} within {serving['gate']['tolerance']} of {serving['gate']['reference']}; "
             f"{serving['gate']['validation']} ({serving['gate']['images']} images).", "",
             "| candidate | runs | out-of-fold macro F1 | drop vs FP32 | gate | images/s |", "|---|---|---|---|---|---|"]
    for c in serving["candidates"]:
        f1 = "-" if c.get("macro_f1") is None else f"{c['macro_f1']:.4f}"
        drop = "-" if c.get("drop") is None else f"{c['drop']:+.4f}"
        ips = f"{c['images_per_s']:.1f}" if c.get("images_per_s") else ""
        gate = c["status"] + (f": {c['reason']}" if c.get("reason") else "")
        lines.append(f"| {c['name']} | {c.get('runs', '')} | {f1} | {drop} | {gate} | {ips} |")
    lines += ["", f"`--backend auto`: **{serving['auto']}** - {serving['why']}"]
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("export", type=Path)
    ap.add_argument("--export-seconds", type=float, default=None)
    ap.add_argument("--out", type=Path, required=True, help="output stem: .json and .md")
    args = ap.parse_args(argv)
    meta = json.loads((args.export / "meta.json").read_text())
    serving = meta.get("serving")
    if not serving:
        raise SystemExit(f"error: {args.export}/meta.json has no serving record (export it with this semivit)")
    code = commit()
    doc = {"benchmark": "export_candidates", "commit": code, "export": str(args.export),
           "export_wall_seconds": args.export_seconds, "serving": serving}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(render(serving, args.export_seconds, code, str(args.export))) + "\n")
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
