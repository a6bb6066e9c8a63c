"""Paired comparisons of arms across label-efficiency results (benchmarks/label_efficiency.py).

Two configurations measured in separate work directories (e.g. stage 1 trained 15 vs 40 epochs)
share the labeled subsets (the seed draws them), the dev split and the test split, so their arms
pair by (fraction, seed).  Each ``--pair`` is ``ARM@NAME-ARM@NAME``; the result files are named
with ``--result NAME=FILE`` (a label_efficiency JSON: its ``runs`` hold every seed's scores).

    python benchmarks/compare_arms.py --result base=benchmarks/results/label_efficiency_e15.json \
        --result long=benchmarks/results/label_efficiency_xeon_distil.json \
        --pair b@long-b@base --pair a@long-a@base --pair b@long-g@long --split dev \
        --out benchmarks/results/stage1_epochs_dev

Differences are per seed; the interval is the 95% t interval of their mean (sample SD, ddof=1),
and the verdict follows it (label_efficiency.verdict).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit, t_interval, verdict  # noqa: E402  (one statistic for all results)


def scores(doc: dict, arm: str, split: str, metric: str = "macro_f1") -> dict[tuple[float, int], float]:
    """{(fraction, seed): ``metric`` (macro_f1 or accuracy) of ``arm`` on ``split``} over a result
    file's runs."""
    out = {}
    for r in doc["runs"]:
        v = r.get(split, {}).get(arm)
        if isinstance(v, dict) and v.get(metric) is not None:
            out[(r["fraction"], r["seed"])] = float(v[metric])
    return out


def parse_pair(text: str) -> tuple[tuple[str, str], tuple[str, str]]:
    try:
        left, right = text.split("-", 1)
        (a, na), (b, nb) = left.split("@"), right.split("@")
    except ValueError:
        raise SystemExit(f"error: --pair expects ARM@NAME-ARM@NAME, got {text!r}") from None
    return (a, na), (b, nb)


def compare(docs: dict[str, dict], pairs: list[str], split: str, metric: str = "macro_f1") -> list[dict]:
    rows = []
    for text in pairs:
        (a, na), (b, nb) = parse_pair(text)
        for name in (na, nb):
            if name not in docs:
                raise SystemExit(f"error: --pair {text}: no --result named {name!r}")
        sa, sb = scores(docs[na], a, split, metric), scores(docs[nb], b, split, metric)
        for frac in sorted({k[0] for k in sa} & {k[0] for k in sb}):
            keys = sorted(k for k in sa.keys() & sb.keys() if k[0] == frac)
            diffs = [sa[k] - sb[k] for k in keys]
            m, lo, hi = t_interval(diffs)
            p = {"fraction": frac, "a": f"{a}@{na}", "b": f"{b}@{nb}", "split": split, "metric": metric, "n": len(diffs),
                 "diff_mean": round(m, 4), "ci_low": None if lo != lo else round(lo, 4),
                 "ci_high": None if hi != hi else round(hi, 4),
                 "per_seed": {str(k[1]): round(d, 4) for k, d in zip(keys, diffs)},
                 "mean_a": round(sum(sa[k] for k in keys) / len(keys), 4),
                 "mean_b": round(sum(sb[k] for k in keys) / len(keys), 4)}
            p["verdict"] = verdict(p)
            rows.append(p)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--result", action="append", required=True, help="NAME=label_efficiency JSON")
    ap.add_argument("--pair", action="append", required=True, help="ARM@NAME-ARM@NAME")
    ap.add_argument("--split", choices=["dev", "test"], action="append", help="dev, test or both (repeat)")
    ap.add_argument("--metric", choices=["macro_f1", "accuracy"], action="append",
                    help="what is compared: macro_f1 (default), accuracy or both (repeat)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes .json and .md")
    args = ap.parse_args(argv)
    docs, files = {}, {}
    for item in args.result:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"error: --result expects NAME=FILE, got {item!r}")
        docs[name], files[name] = json.loads(Path(path).read_text()), path
    rows = [r for metric in (args.metric or ["macro_f1"]) for split in (args.split or ["dev"])
            for r in compare(docs, args.pair, split, metric)]
    doc = {"benchmark": "compare_arms", "commit": commit(), "results": files,
           "results_commits": {n: d.get("commit") for n, d in docs.items()},
           "results_overrides": {n: d.get("overrides") for n, d in docs.items()},
           "command": " ".join(["python", "benchmarks/compare_arms.py"] + (argv or sys.argv[1:])), "paired": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = [f"# Paired comparisons (`benchmarks/compare_arms.py`)", "",
             "Result files: " + ", ".join(f"`{n}` = {p} (overrides: {docs[n].get('overrides') or 'none'})"
                                          for n, p in files.items()), "",
             "| metric | split | fraction | a | b | seeds | mean a | mean b | a - b | 95% CI |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "-" if r["ci_low"] is None else f"{r['ci_low']:+.4f} to {r['ci_high']:+.4f}"
        lines.append(f"| {r['metric']} | {r['split']} | {r['fraction']:g} | {r['a']} | {r['b']} | {r['n']} | {r['mean_a']:.4f} | "
                     f"{r['mean_b']:.4f} | {r['diff_mean']:+.4f} | {ci} |")
    lines += ["", "Verdicts:", ""] + [f"- {r['metric']}, {r['split']}, {r['fraction']:g}: {r['verdict']}" for r in rows]
    lines += ["", f"Command: `{doc['command']}` (commit {doc['commit']})."]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
