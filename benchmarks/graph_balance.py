"""A dev probe for the pool graph: class-mass normalisation (Zhu, Ghahramani & Lafferty 2003) of the
graph's distribution at prediction time - each class's column scaled by (labeled class prior) /
(the pool's spread class mass), so a rare class is not outvoted by its common neighbours - against
the plain graph, on the default ensembles of finished label-efficiency work directories.

For each seed: label spreading over the labeled images + the pool (stage-1 embeddings, as
``ssl train``'s stage ``graph``), for k/alpha in (7, 0.8), (7, 0.5), (15, 0.8); every predicted
image takes its k nearest nodes' mean distribution, plain or class-mass normalised, mixed with
the ensemble at share 0.25/0.5/0.75.  The settings are ranked by mean DEV macro F1; the test
split is reported only.

    python benchmarks/graph_balance.py --work /tmp/lp/s0 ... /tmp/lp/s4 --run C-default --out benchmarks/results/graph_balance
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

from semivit import config as cfgmod  # noqa: E402
from semivit.models.ensemble import ensemble_weights  # noqa: E402
from semivit.pseudo.propagate import joint_embedding, mixture, spread_all  # noqa: E402
from semivit.trainer.infer import ensemble_predict  # noqa: E402
from semivit.trainer.run import Run  # noqa: E402
from graph_predict import node_query  # noqa: E402
from label_efficiency import Scorer, commit, cpu_name, members, short_verdict, t_interval, write_md  # noqa: E402

SETTINGS = ((7, 0.8), (7, 0.5), (15, 0.8))
SHARES = (0.25, 0.5, 0.75)


def one_seed(work: Path, run_name: str) -> dict:
    runs_dir = sorted(work.glob("runs-*"))[0]
    a = runs_dir / "A"
    cfg, data = cfgmod.load_run_config(a)
    run = Run(a, cfg, data)

    def embed(images, what):
        x = run.stem_features(images, tta=True, what=what)
        return ensemble_predict(run.dir, x, stages=["stage1"], tta=True, device=run.device, with_embeddings=True,
                                graph=False)[1]

    lab = joint_embedding(embed(run.images, "labeled images"))
    _, pool_images = run.unlabeled
    pool = joint_embedding(embed(pool_images, "pool"))
    labels = np.asarray(run.labeled.labels)
    n_cls = len(run.classes)
    prior = np.bincount(labels, minlength=n_cls) / len(labels)
    nodes = np.concatenate([lab, pool])
    ens = members(runs_dir / run_name, ["stage1", "stage3"])
    res = {}
    for k, alpha in SETTINGS:
        dist = spread_all(lab, labels, pool, n_cls, k, alpha)
        m = dist / np.maximum(dist.sum(1, keepdims=True), 1e-12)
        mass = m[len(lab):].mean(0)  # the pool's spread class mass
        for split in ("dev", "test"):
            sc = Scorer(data / split, run.classes, cfg.model.img_size)
            q = joint_embedding(embed(sc.images, split))
            w = ensemble_weights([mm["val_macro_f1"] for _, mm in ens])
            base = sum(wi * sc.member_probs(r, mm) for wi, (r, mm) in zip(w, ens))
            g = node_query(nodes, dist, q, k)
            gc = g * (prior / np.maximum(mass, 1e-12))
            for share in SHARES:
                for name, gg in (("plain", g), ("cmn", gc)):
                    p = mixture(base, gg, share)[0]
                    res[f"{split}|{k}|{alpha}|{share}|{name}"] = round(float(f1_score(sc.y, p.argmax(1), average="macro")), 4)
            res[f"{split}|base"] = round(float(f1_score(sc.y, base.argmax(1), average="macro")), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="*", type=Path, default=[])
    ap.add_argument("--run", default="C-default")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seeds-from", type=Path, default=None,
                    help="a JSON {work dir: per-seed scores} computed by this code earlier (with --computed-at)")
    ap.add_argument("--computed-at", default=None, help="with --seeds-from: COMMIT,WALL_SECONDS of that computation")
    args = ap.parse_args()
    t0 = time.time()
    if args.seeds_from:
        per = json.loads(args.seeds_from.read_text())
        per = per.get("seeds", per)
        sha_run, wall = (args.computed_at or f"{commit()},nan").split(",")
    else:
        per = {str(w): one_seed(w, args.run) for w in args.work}
        sha_run, wall = commit(), round(time.time() - t0, 1)
    works = list(per)
    keys = [k[4:] for k in per[works[0]] if k.startswith("dev|") and k != "dev|base"]
    mean = {sp: {k: float(np.mean([per[w][f"{sp}|{k}"] for w in works])) for k in keys + ["base"]} for sp in ("dev", "test")}
    ranked = sorted(keys, key=lambda k: -mean["dev"][k])
    default = "7|0.8|0.5|plain"  # the product's setting (ensemble.graph_* of the quick preset)
    best_cmn = next(k for k in ranked if k.endswith("cmn"))
    paired = []
    for sp in ("dev", "test"):
        d = [per[w][f"{sp}|{best_cmn}"] - per[w][f"{sp}|{default}"] for w in works]
        m, lo, hi = t_interval(d)
        paired.append({"split": sp, "a": best_cmn, "b": default, "n": len(d), "diff_mean": round(m, 4),
                       "ci_low": round(lo, 4), "ci_high": round(hi, 4), "per_seed": [round(x, 4) for x in d]})
    sha = commit()
    doc = {"benchmark": "graph_balance", "command": " ".join(sys.argv), "commit": sha_run, "machine": cpu_name(),
           "wall_seconds": float(wall), "run": args.run, "seeds": per, "mean": mean, "ranked_by_dev": ranked,
           "best_cmn": best_cmn, "default": default, "paired": paired,
           **({"summarised_at_commit": sha} if args.seeds_from else {})}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Class-mass normalisation of the pool graph, a dev probe (`benchmarks/graph_balance.py`)", "",
             f"Machine: {doc['machine']}. Computed at commit `{sha_run}`, wall time {float(wall):.0f} s (no training). "
             f"Run `{args.run}` of {len(works)} seeds ({', '.join(works)}).  Setting = k|alpha|the ensemble's share|"
             "plain or cmn; ranked by mean dev macro F1 (test reported only).", "",
             "| setting | dev macro F1 | test macro F1 |", "|---|---:|---:|"]
    def shown(k):  # "7|0.8|0.5|plain" -> "k 7, alpha 0.8, share 0.5, plain" (no | inside a table cell)
        n, a, s, kind = k.split("|")
        return f"k {n}, alpha {a}, share {s}, {kind}"

    lines += [f"| {shown(k)}{' (the product default)' if k == default else ''} | {mean['dev'][k]:.4f} | {mean['test'][k]:.4f} |"
              for k in ranked]
    lines += [f"| ensemble alone | {mean['dev']['base']:.4f} | {mean['test']['base']:.4f} |", "",
              "| split | a | b | a - b | 95% CI | per seed | verdict |", "|---|---|---|---:|---|---|---|"]
    lines += [f"| {p['split']} | {shown(p['a'])} | {shown(p['b'])} | {p['diff_mean']:+.4f} | {p['ci_low']:+.4f} to {p['ci_high']:+.4f} "
              f"| {', '.join(f'{x:+.4f}' for x in p['per_seed'])} | {short_verdict(p)} |" for p in paired]
    write_md(args.out, lines, doc | {"summarised_by": " ".join(sys.argv)}, {"x": 1} if args.seeds_from else {}, sha)


if __name__ == "__main__":
    main()
