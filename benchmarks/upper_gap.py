"""How much of the (a) -> (e) gap does (b) close?  Per seed, from committed results (issue 13).

(e), the all-labels upper bound, is the stage-1 ensemble trained on every label of the training
pool (label_efficiency.py --upper); the seed draws its folds and initialisation, the same seed of a
label-fraction run draws that run's labeled subset.  Per seed s this script takes (a) and (b) (and
the control (g)) of a label_efficiency result at one fraction and (e) of seed s, and reports
(b) - (a), (e) - (a) and the share of the gap closed, ((b) - (a)) / ((e) - (a)), with their mean and
95% t interval over the seeds (sample SD, ddof=1), plus the share of the mean gap closed by the
mean gain.  No training: it reads the files.

    python benchmarks/upper_gap.py --result benchmarks/results/label_efficiency.json --fraction 0.1 \
        --upper benchmarks/results/label_efficiency_rounds.json /tmp/leE/s1/result-upper-elpv-s1.json \
        --out benchmarks/results/upper_gap

``--upper`` takes label_efficiency result files (their ``upper_bound`` list) or the per-seed
``result-upper-elpv-s<seed>.json`` files a run writes in its --work.  Results: OUT.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit, t_interval  # noqa: E402  (one statistic for all results)


def upper_by_seed(paths: list[Path]) -> dict[int, dict]:
    """{seed: (e)'s record} from result files (``upper_bound``) or per-seed upper-bound files."""
    out: dict[int, dict] = {}
    for p in paths:
        doc = json.loads(Path(p).read_text())
        for u in (doc.get("upper_bound") or []) if "upper_bound" in doc else [doc]:
            if u and "seed" in u and "macro_f1" in u:
                out[int(u["seed"])] = u
    return out


def gap_rows(doc: dict, fraction: float, upper: dict[int, dict], b: str = "b") -> list[dict]:
    rows = []
    for r in sorted(doc["runs"], key=lambda r: r["seed"]):
        s = int(r["seed"])
        if r["fraction"] != fraction or s not in upper:
            continue
        arms = r["test"]
        a, bb, e = arms["a"]["macro_f1"], arms[b]["macro_f1"], upper[s]["macro_f1"]
        row = {"seed": s, "a": a, "b": bb, "e": e, "b_minus_a": round(bb - a, 4), "e_minus_a": round(e - a, 4),
               "gap_closed": round((bb - a) / (e - a), 4) if e != a else None,
               "e_accuracy": upper[s].get("accuracy"), "e_steps": upper[s].get("steps")}
        if "g" in arms:
            row["g"] = arms["g"]["macro_f1"]
            row["g_gap_closed"] = round((row["g"] - a) / (e - a), 4) if e != a else None
        rows.append(row)
    return rows


def interval(values: list[float]) -> dict:
    m, lo, hi = t_interval(values)
    ok = len(values) >= 2
    return {"mean": round(m, 4), "ci_low": round(lo, 4) if ok else None, "ci_high": round(hi, 4) if ok else None,
            "n": len(values)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", type=Path, required=True, help="a label_efficiency JSON with (a) and (b) per seed")
    ap.add_argument("--fraction", type=float, required=True)
    ap.add_argument("--upper", type=Path, nargs="+", required=True)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args(argv)
    doc = json.loads(a.result.read_text())
    rows = gap_rows(doc, a.fraction, upper_by_seed(a.upper))
    if not rows:
        sys.exit("error: no seed has both (a)/(b) in --result at that fraction and (e) in --upper")
    closed = [r["gap_closed"] for r in rows if r["gap_closed"] is not None]
    summary = {"b_minus_a": interval([r["b_minus_a"] for r in rows]), "e_minus_a": interval([r["e_minus_a"] for r in rows]),
               "gap_closed": interval(closed),
               "gap_closed_of_means": round(float(np.mean([r["b_minus_a"] for r in rows]) /
                                                  np.mean([r["e_minus_a"] for r in rows])), 4),
               "e": interval([r["e"] for r in rows]), "target_gap_closed": 0.5}
    if all("g_gap_closed" in r for r in rows):
        summary["g_gap_closed"] = interval([r["g_gap_closed"] for r in rows])
    out = {"benchmark": "upper_gap", "commit": commit(), "result": str(a.result), "fraction": a.fraction,
           "machine": doc.get("machine"), "upper": [str(p) for p in a.upper], "split": "test", "rows": rows,
           "summary": summary, "command": " ".join(["python", "benchmarks/upper_gap.py"] + (argv or sys.argv[1:]))}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")

    def ci(d: dict) -> str:
        return f"{d['mean']:+.4f}" + (f" (95% CI {d['ci_low']:+.4f} to {d['ci_high']:+.4f}, {d['n']} seeds)"
                                      if d["ci_low"] is not None else f" ({d['n']} seed)")

    s = summary
    reached = s["gap_closed"]["ci_low"] is not None and s["gap_closed"]["ci_low"] >= 0.5
    lines = ["# The (a) -> (e) gap: how much of it does (b) close?", "",
             f"Commit `{out['commit']}`. Read from {a.result} (fraction {a.fraction:g}; machine: {out['machine']}) and "
             f"the upper-bound records {', '.join(out['upper'])}. Test split. Command: `{out['command']}`.", "",
             "| seed | (a) | (b) | (g) | (e) all labels | (e) accuracy | (b) - (a) | (e) - (a) | share of the gap (b) closes |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['seed']} | {r['a']:.4f} | {r['b']:.4f} | {r.get('g', float('nan')):.4f} | {r['e']:.4f} | "
                     f"{r['e_accuracy']} | {r['b_minus_a']:+.4f} | {r['e_minus_a']:+.4f} | {r['gap_closed']} |")
    lines += ["", f"- (e) - (a): {ci(s['e_minus_a'])}; (e) {s['e']['mean']:.4f} mean.",
              f"- (b) - (a): {ci(s['b_minus_a'])}.",
              f"- Share of the gap (b) closes, per seed: {ci(s['gap_closed'])}; mean gain over mean gap: "
              f"{s['gap_closed_of_means']:.4f}.  Target >= 0.5: {'reached' if reached else 'NOT reached'}."]
    if "g_gap_closed" in s:
        lines.append(f"- The control (g), for comparison: {ci(s['g_gap_closed'])} of the gap.")
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out}.md")


if __name__ == "__main__":
    main()
