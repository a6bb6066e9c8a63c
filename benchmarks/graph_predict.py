"""Do the unlabeled images pay AT PREDICTION TIME?  A k-nearest-neighbour graph over the labeled
images and the unlabeled pool, in the stage-1 members' embedding space (issue 13).

Label spreading (semivit.pseudo.propagate, scikit-learn's LabelSpreading) carries the labels over a
graph of the labeled images + the unlabeled pool; a new image then takes the mean spread
distribution of its k nearest graph nodes (inductive: each image on its own, as ``ssl predict``
sees them), mixed with the ensemble's probabilities.  The same with the labeled images alone as
nodes ("labels" - a plain kNN refinement that needs no unlabeled image) tells what the pool adds;
the transductive variants let the predicted split join the graph unlabeled (as the grid of
benchmarks/propagate_grid.py did).

For each finished label-efficiency work directory (one seed; run A = stage 1, and where present
G = the control's second five and C-NAME = a candidate's stage 3): every setting of the grid is
scored on the dev split and the test split.  The setting of each mode is chosen by its mean dev
macro F1 over the seeds; the test split is reported only.

    python benchmarks/graph_predict.py --work /tmp/gp/s0 ... /tmp/gp/s4 --fraction 0.1 \
        --control benchmarks/results/label_efficiency_propagate.json --out benchmarks/results/graph_predict
"""

from __future__ import annotations

import argparse
import itertools
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
from semivit.pseudo.propagate import joint_embedding, mixture, spread, spread_all  # noqa: E402
from semivit.trainer.infer import ensemble_predict  # noqa: E402
from semivit.trainer.run import Run  # noqa: E402
from label_efficiency import Scorer, commit, cpu_name, members, short_verdict, t_interval, write_md  # noqa: E402

NEIGHBORS = (7, 15, 30)
ALPHAS = (0.2, 0.5, 0.8)
MIXES = (0.0, 0.25, 0.5, 0.75)  # the ensemble's share
MODES = ("pool", "labels", "pool_t", "labels_t")


def node_query(nodes: np.ndarray, dist: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Each query's mean (row-normalised) spread distribution over its k nearest nodes.  A node the
    graph did not reach (zero row) adds nothing but counts in the mean, so the row's mass is the
    reached share (the mixture renormalises); a query with none reached gets a zero row."""
    from sklearn.neighbors import NearestNeighbors

    mass = dist.sum(1, keepdims=True)
    norm = np.where(mass > 0, dist / np.where(mass > 0, mass, 1), 0.0)
    idx = NearestNeighbors(n_neighbors=min(k, len(nodes))).fit(nodes).kneighbors(queries, return_distance=False)
    return norm[idx].mean(1)


def one_seed(work: Path, fraction: float) -> dict:
    runs_dir = sorted(work.glob(f"runs-*-f{fraction:g}-s*"))
    if not runs_dir:
        raise SystemExit(f"error: no runs-*-f{fraction:g}-s* in {work}")
    runs_dir = runs_dir[0]
    a = runs_dir / "A"
    cfg, data = cfgmod.load_run_config(a)
    run = Run(a, cfg, data)
    classes = run.classes

    def embed(images, what):
        x = run.stem_features(images, tta=cfg.pseudo.tta, what=what)
        return ensemble_predict(run.dir, x, stages=["stage1"], tta=cfg.pseudo.tta, device=run.device,
                                with_embeddings=True, weighting=cfg.ensemble.weighting)[1]

    lab_j = joint_embedding(embed(run.images, "labeled"))
    _, pool_images = run.unlabeled
    pool_j = joint_embedding(embed(pool_images, "pool"))
    labels = run.labeled.labels
    # the ensembles whose probabilities the graph refines, scored exactly as label_efficiency.py does
    ensembles = {"a": members(a, ["stage1"])}
    if (runs_dir / "G").is_dir():
        ensembles["g"] = ensembles["a"] + members(runs_dir / "G", ["stage1"])
    for c in sorted(runs_dir.glob("C-*")):
        ensembles[f"cand_{c.name[2:]}"] = members(c, ["stage1", "stage3"])  # C holds a copy of A's stage 1
    nodes = np.concatenate([lab_j, pool_j])
    # every node's spread distribution per setting, with the pool and with the labels alone: the
    # same for both splits, so computed once
    dists = {(k, alpha): (spread_all(lab_j, labels, pool_j, len(classes), k, alpha),
                          spread_all(lab_j, labels, lab_j[:0], len(classes), k, alpha))
             for k, alpha in itertools.product(NEIGHBORS, ALPHAS)}
    out: dict = {"work": str(work), "labeled": len(labels), "pool": len(pool_j), "splits": {}}
    for split in ("dev", "test"):
        sc = Scorer(data / split, classes, cfg.model.img_size)
        q = joint_embedding(embed(sc.images, split))
        bases = {}
        for name, pairs in ensembles.items():
            w = ensemble_weights([m["val_macro_f1"] for _, m in pairs])
            bases[name] = sum(wi * sc.member_probs(r, m) for wi, (r, m) in zip(w, pairs))

        def f1(p):
            return round(float(f1_score(sc.y, p.argmax(1), average="macro")), 4)

        out["splits"][split] = {"base": {n: f1(p) for n, p in bases.items()}, "rows": []}
        for k, alpha in itertools.product(NEIGHBORS, ALPHAS):
            with_pool, labels_only = dists[(k, alpha)]
            g = {"pool": node_query(nodes, with_pool, q, k), "labels": node_query(lab_j, labels_only, q, k)}
            g["pool_t"] = spread(lab_j, labels, np.concatenate([pool_j, q]), len(classes), k, alpha)[len(pool_j):]
            g["labels_t"] = spread(lab_j, labels, q, len(classes), k, alpha)
            for mode, m in itertools.product(MODES, MIXES):
                out["splits"][split]["rows"].append(
                    {"mode": mode, "neighbors": k, "alpha": alpha, "share": m,
                     **{n: f1(mixture(p, g[mode], m)[0]) for n, p in bases.items()}})
    return out


def _key(r: dict) -> tuple:
    return (r["mode"], r["neighbors"], r["alpha"], r["share"])


def summarise(seeds: list[dict], control: dict | None) -> dict:
    """Per (mode, ensemble): the setting with the best mean dev macro F1, its per-seed dev and
    test scores, and the paired differences (95% t interval over the seeds)."""
    bases = list(seeds[0]["splits"]["dev"]["base"])
    per = {split: [{_key(r): r for r in s["splits"][split]["rows"]} for s in seeds] for split in ("dev", "test")}
    chosen, pairs = [], []
    for base, mode in itertools.product(bases, MODES):
        keys = [k for k in per["dev"][0] if k[0] == mode]
        best = max(keys, key=lambda k: np.mean([p[k][base] for p in per["dev"]]))
        row = {"ensemble": base, "mode": mode, "neighbors": best[1], "alpha": best[2], "share": best[3]}
        for split in ("dev", "test"):
            row[f"{split}_per_seed"] = [p[best][base] for p in per[split]]
            row[f"{split}_mean"] = round(float(np.mean(row[f"{split}_per_seed"])), 4)
            row[f"{split}_base_per_seed"] = [s["splits"][split]["base"][base] for s in seeds]
        chosen.append(row)

    def pair(label_a, va, label_b, vb, split):
        d = [x - y for x, y in zip(va, vb)]
        m, lo, hi = t_interval(d)
        pairs.append({"split": split, "a": label_a, "b": label_b, "n": len(d), "diff_mean": round(m, 4),
                      "ci_low": round(lo, 4), "ci_high": round(hi, 4), "per_seed": [round(x, 4) for x in d]})

    by = {(r["ensemble"], r["mode"]): r for r in chosen}
    for split in ("dev", "test"):
        for (base, mode), r in by.items():
            pair(f"{base}+{mode}", r[f"{split}_per_seed"], base, r[f"{split}_base_per_seed"], split)
            if mode in ("pool", "pool_t"):
                lab = by[(base, mode.replace("pool", "labels"))]
                pair(f"{base}+{mode}", r[f"{split}_per_seed"], f"{base}+{lab['mode']}", lab[f"{split}_per_seed"], split)
            if control and base != "g":
                pair(f"{base}+{mode}", r[f"{split}_per_seed"], "g (control file)", control[split], split)
            if "g" in bases and base != "g" and mode in ("pool", "pool_t"):
                for gm in dict.fromkeys(("labels", mode.replace("pool", "labels"))):  # once each
                    pair(f"{base}+{mode}", r[f"{split}_per_seed"], f"g+{gm}", by[("g", gm)][f"{split}_per_seed"], split)
    return {"chosen": chosen, "paired": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="*", type=Path, default=[], help="label_efficiency.py --work dirs, one per seed")
    ap.add_argument("--fraction", type=float, default=0.1, help="ELPV: labeled share; MNIST: labels per class")
    ap.add_argument("--control", type=Path, default=None,
                    help="a label_efficiency results JSON whose per-seed (g) (same stage 1) is paired with")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    ap.add_argument("--seeds-from", type=Path, default=None,
                    help="re-summarise the per-seed scores of an earlier OUT.json instead of computing them")
    args = ap.parse_args()
    t0 = time.time()
    if args.seeds_from:  # the scores as computed then (their commit and wall time are kept)
        earlier = json.loads(args.seeds_from.read_text())
        seeds = earlier["seeds"]
    else:
        if not args.work:
            ap.error("give --work (one directory per seed) or --seeds-from")
        earlier = {}
        seeds = [one_seed(w, args.fraction) for w in args.work]
    control = None
    if args.control:
        doc = json.loads(args.control.read_text())
        by_seed = {r["seed"]: r for r in doc["runs"] if r["fraction"] == args.fraction}
        ids = [int(str(s["work"]).rstrip("/").rsplit("s", 1)[-1]) for s in seeds]
        control = {split: [by_seed[i][split]["g"]["macro_f1"] for i in ids] for split in ("dev", "test")}
        # stage 1 must be the control file's: (a) reproduced seed for seed - and every ensemble the
        # control file scored too (its candidates, (g)) scores here as it did there
        for split, name in itertools.product(("dev", "test"), seeds[0]["splits"]["dev"]["base"]):
            if not all(name in by_seed[i][split] for i in ids):
                continue
            mine = [s["splits"][split]["base"][name] for s in seeds]
            theirs = [by_seed[i][split][name]["macro_f1"] for i in ids]
            if mine != theirs:
                raise SystemExit(f"error: ({name}) on {split} {mine} differs from the control file's {theirs}")
    summ = summarise(seeds, control)
    sha = commit()
    doc = {"benchmark": "graph_predict", "command": earlier.get("command", " ".join(sys.argv)),
           "commit": earlier.get("commit", sha), "machine": earlier.get("machine", cpu_name()),
           "wall_seconds": earlier.get("wall_seconds", round(time.time() - t0, 1)), "fraction": args.fraction,
           **({"summarised_by": " ".join(sys.argv), "summarised_at_commit": sha} if earlier else {}),
           "control": str(args.control) if args.control else None, "seeds": seeds, **summ}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Prediction over a graph of the labeled images and the unlabeled pool (`benchmarks/graph_predict.py`)", "",
             f"Machine: {doc['machine']}. Commit `{doc['commit']}`. Wall time {doc['wall_seconds']:.0f} s (no training). "
             f"Fraction {args.fraction:g}; {len(seeds)} seeds ({', '.join(s['work'] for s in seeds)}).", "",
             "Modes: `pool` - label spreading over the labeled images + the unlabeled pool, each predicted image "
             "takes the mean distribution of its k nearest nodes; `labels` - the same with the labeled images "
             "alone as nodes (no unlabeled image); `_t` - the predicted split joins the graph unlabeled "
             "(transductive).  share = the ensemble's weight in the mixture.  Each (ensemble, mode) takes the "
             "setting with the best mean dev macro F1 (so its dev score is optimistic: chosen among "
             f"{len(NEIGHBORS) * len(ALPHAS) * len(MIXES)} settings on those same dev images); the test split is "
             "reported only.  `g (control file)`: the compute-matched control of the control file, on the same "
             "stage 1 (checked: (a) reproduces it seed for seed).", "",
             "| ensemble | mode | k | alpha | share | dev macro F1 | ensemble alone (dev) | test macro F1 | ensemble alone (test) |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in summ["chosen"]:
        lines.append(f"| {r['ensemble']} | {r['mode']} | {r['neighbors']} | {r['alpha']} | {r['share']} | {r['dev_mean']:.4f} "
                     f"| {np.mean(r['dev_base_per_seed']):.4f} | {r['test_mean']:.4f} | {np.mean(r['test_base_per_seed']):.4f} |")
    lines += ["", "Paired differences (macro F1, per seed; 95% t interval, sample SD):", "",
              "| split | a | b | seeds | a - b | 95% CI | verdict |", "|---|---|---|---:|---:|---|---|"]
    for p in summ["paired"]:
        v = short_verdict(p)
        lines.append(f"| {p['split']} | {p['a']} | {p['b']} | {p['n']} | {p['diff_mean']:+.4f} "
                     f"| {p['ci_low']:+.4f} to {p['ci_high']:+.4f} | {v} |")
    write_md(args.out, lines, doc, earlier, sha)


if __name__ == "__main__":
    main()
