"""Are the stage-3 members' validation scores honest?  Ensemble weights by validation macro F1
against equal weights, re-scored on a label-efficiency benchmark's finished runs.

Stage 3's students learn the stage-1 ensemble's soft targets, and that ensemble's members were
trained on the labels of every fold but their own - so a fold-k student has, through its teacher,
seen fold k's validation labels.  Its validation macro F1 (which picks its epoch and sets its
ensemble weight, w_i = F1_i / sum F1) is then optimistic, and the 10-model ensemble leans on the
students.  This script measures that on runs that already exist (no training):

  - per fold: stage-3 validation macro F1 minus stage-1's (the same fold, the same images);
  - the stage-3 members' share of the ensemble weight;
  - every arm (a, each candidate, g) scored on dev and test with F1 weights (what ``ssl train``
    writes) and with equal weights, the per-seed paired difference with a 95% t interval.

    python benchmarks/ensemble_weighting.py --work /tmp/le-mix/s0 /tmp/le-mix/s1 ... \
        --out benchmarks/results/ensemble_weighting
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import Scorer, commit, cpu_name, members, t_interval, verdict  # noqa: E402

from semivit.models.ensemble import ensemble_weights  # noqa: E402
from semivit.utils import read_json  # noqa: E402


def arms_of(runs: Path) -> dict[str, list]:
    """{arm: [(run_dir, member)]} for the runs one benchmark seed left in ``runs``."""
    A = runs / "A"
    out = {"a": members(A, ["stage1"])}
    for C in sorted(runs.glob("C-*")):
        if any((C / "stage3").glob("fold*/done.json")):
            out[f"cand_{C.name[2:]}"] = members(A, ["stage1"]) + members(C, ["stage3"])
    if (runs / "G").is_dir():
        out["g"] = members(A, ["stage1"]) + members(runs / "G", ["stage1"])
    return out


def score(sc: Scorer, pairs: list, weighting: str) -> float:
    w = ensemble_weights([m["val_macro_f1"] for _, m in pairs], weighting)
    p = sum(wi * sc.member_probs(r, m) for wi, (r, m) in zip(w, pairs))
    from semivit.metrics import macro_f1

    return round(float(macro_f1(sc.y, p.argmax(1), len(sc.classes))), 4)


def one_seed(runs: Path, data: Path, rescore: bool = True) -> dict:
    """``rescore=False``: the validation-score comparison alone (read from the runs, no inference)."""
    arms = arms_of(runs)
    classes = read_json(runs / "A" / "ensemble.json")["classes"]
    size = read_json(runs / "A" / "ensemble.json")["img_size"]
    res: dict = {"runs": str(runs), "scores": {"dev": {}, "test": {}}, "folds": {}}
    for split in ("dev", "test") if rescore else ():
        sc = Scorer(data / split, classes, size)
        res["scores"][split] = {arm: {wt: score(sc, pairs, wt) for wt in ("f1", "equal")} for arm, pairs in arms.items()}
    s1 = {m["fold"]: m["val_macro_f1"] for _, m in arms["a"]}
    for arm, pairs in arms.items():
        if not arm.startswith("cand_"):
            continue
        s3 = [(m["fold"], m["val_macro_f1"]) for r, m in pairs if m.get("stage") == "stage3"]
        w = ensemble_weights([m["val_macro_f1"] for _, m in pairs])
        res["folds"][arm] = {"stage3_minus_stage1_val_f1": [round(f - s1[k], 4) for k, f in s3],
                             "stage3_weight_share": round(float(w[len(s1):].sum()), 4)}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="label_efficiency.py --work directories")
    ap.add_argument("--out", type=Path, required=True, help="output stem (.json and .md are written)")
    ap.add_argument("--leak-only", action="store_true",
                    help="only the stage-3 vs stage-1 validation scores (read from the runs; no inference)")
    args = ap.parse_args()
    t0 = time.time()
    seeds = []
    for work in args.work:
        for runs in sorted(work.glob("runs-*")):
            data = work / runs.name.replace("runs-", "data-", 1)
            if (runs / "A" / "ensemble.json").exists() and (data / "dev").is_dir():
                print(f"{'reading' if args.leak_only else 're-scoring'} {runs}", flush=True)
                seeds.append(one_seed(runs, data, not args.leak_only) | {"seed": runs.name.rsplit("-s", 1)[1]})
    arms = sorted({a for s in seeds for a in s["scores"]["test"]})
    paired, table = [], []
    for split in ("dev", "test"):
        for arm in arms:
            have = [s for s in seeds if arm in s["scores"][split]]
            f1w = [s["scores"][split][arm]["f1"] for s in have]
            eq = [s["scores"][split][arm]["equal"] for s in have]
            m, lo, hi = t_interval([e - f for e, f in zip(eq, f1w)])
            p = {"split": split, "a": f"{arm} equal weights", "b": f"{arm} F1 weights", "n": len(have),
                 "diff_mean": round(m, 4), "ci_low": None if np.isnan(lo) else round(lo, 4),
                 "ci_high": None if np.isnan(hi) else round(hi, 4)}
            paired.append(p)
            table.append({"split": split, "arm": arm, "n": len(have), "f1_weights": round(float(np.mean(f1w)), 4),
                          "equal_weights": round(float(np.mean(eq)), 4)})
    leak = {}
    for arm in sorted({a for s in seeds for a in s["folds"]}):
        d = [x for s in seeds if arm in s["folds"] for x in s["folds"][arm]["stage3_minus_stage1_val_f1"]]
        share = [s["folds"][arm]["stage3_weight_share"] for s in seeds if arm in s["folds"]]
        leak[arm] = {"folds": len(d), "stage3_minus_stage1_val_f1_mean": round(float(np.mean(d)), 4),
                     "stage3_minus_stage1_val_f1_min": round(float(np.min(d)), 4),
                     "stage3_weight_share_mean": round(float(np.mean(share)), 4)}
    doc = {"benchmark": "ensemble_weighting", "machine": cpu_name(), "commit": commit(),
           "command": " ".join(["python", "benchmarks/ensemble_weighting.py"] + sys.argv[1:]),
           "wall_seconds": round(time.time() - t0, 1), "table": table, "paired": paired, "leak": leak, "seeds": seeds}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    lines = ["# Ensemble weights: validation macro F1 vs equal, on the label-efficiency runs", "",
             f"Machine: {doc['machine']}. Commit `{doc['commit']}`. {len(seeds)} seeds. Wall time {doc['wall_seconds']:.0f} s "
             + ("(read from the runs' done.json: no inference)." if args.leak_only
                else "(no training: the members' probabilities are recomputed)."), "", "Reproduce: `" + doc["command"] + "`", "",
             "## Stage-3 validation scores against stage 1's on the same folds", "",
             "| candidate | folds | stage-3 minus stage-1 val macro F1 (mean / min) | stage-3 share of the ensemble weight |",
             "|---|---|---|---|"]
    lines += [f"| {a} | {v['folds']} | {v['stage3_minus_stage1_val_f1_mean']:+.4f} / {v['stage3_minus_stage1_val_f1_min']:+.4f} | "
              f"{v['stage3_weight_share_mean']:.3f} |" for a, v in leak.items()]
    if table:  # not with --leak-only
        lines += ["", "## Macro F1 by weighting (mean over seeds)", "", "| split | arm | seeds | F1 weights | equal weights |",
                  "|---|---|---|---|---|"]
        lines += [f"| {t['split']} | {t['arm']} | {t['n']} | {t['f1_weights']:.4f} | {t['equal_weights']:.4f} |" for t in table]
        lines += ["", "## Equal minus F1 weights, paired by seed", ""] + [f"- {p['split']}: {verdict(p)}" for p in paired]
    lines += [""]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print(f"wrote {args.out}.md")


if __name__ == "__main__":
    main()
