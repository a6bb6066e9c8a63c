"""How label spreading's settings were chosen (``pseudo.propagate``, issue 13): a grid on the DEV split.

For each finished stage 1 of the label-efficiency benchmark (its work directory's run A and data),
the stage-1 members embed the labeled images, the unlabeled pool and the dev split; label spreading
(semivit.pseudo.propagate, the product's own functions) runs on the graph of all three with the
dev images unlabeled, as the pool's are, and its mixture with the teacher's probabilities labels
the dev images.  Scored: dev macro F1 (chooses the setting) and, for the record, the pool's
agreement with its held-back truth.  No training; the test split is not read.

    python benchmarks/propagate_grid.py --work /tmp/lp/s0 /tmp/lp/s1 --fraction 0.1 \
        --out benchmarks/results/propagate_grid
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
from semivit.data.layout import read_truth  # noqa: E402
from semivit.pseudo.propagate import joint_embedding, mix_with_spread, spread  # noqa: E402
from semivit.trainer.infer import ensemble_predict  # noqa: E402
from semivit.trainer.run import Run, decode_with_progress  # noqa: E402
from label_efficiency import commit, cpu_name  # noqa: E402  (the machine and commit lines of every result)

NEIGHBORS = (7, 15, 30)
ALPHAS = (0.2, 0.5, 0.8)
MIXES = (0.0, 0.5)  # the teacher's share; 1.0 = the teacher alone (reported as its own row)


def one_seed(work: Path, fraction: float) -> dict:
    runs = sorted(work.glob(f"runs-*-f{fraction:g}-s*/A"))
    if not runs:
        raise SystemExit(f"error: no runs-*-f{fraction:g}-s*/A in {work}")
    a = runs[0]
    cfg, data = cfgmod.load_run_config(a)  # the data directory the run was trained on
    run = Run(a, cfg, data)

    def embed(images, what):
        x = run.stem_features(images, tta=cfg.pseudo.tta, what=what)
        return ensemble_predict(run.dir, x, stages=["stage1"], tta=cfg.pseudo.tta, device=run.device,
                                with_embeddings=True, weighting=cfg.ensemble.weighting)

    classes = run.classes
    _, lab_e = embed(run.images, "labeled")
    paths, pool_images = run.unlabeled
    pool_p, pool_e = embed(pool_images, "pool")
    truth = read_truth(data, cfg.data.truth_file)
    pool_y = np.array([classes.index(truth[run.rel(p)]) for p in paths])
    dev_paths = sorted(p for p in (data / "dev").glob("*/*") if p.is_file())
    dec = decode_with_progress(dev_paths, cfg.model.img_size, "dev images")
    dev_y = np.array([classes.index(dev_paths[i].parent.name) for i in dec.ok])
    dev_p, dev_e = embed(dec.images, "dev")
    lab_j = joint_embedding(lab_e)
    unl_j = np.concatenate([joint_embedding(pool_e), joint_embedding(dev_e)])
    teacher = np.concatenate([pool_p, dev_p])
    n_pool = len(pool_p)

    def score(p):
        return {"dev_macro_f1": round(float(f1_score(dev_y, p[n_pool:].argmax(1), average="macro")), 4),
                "pool_accuracy": round(float((p[:n_pool].argmax(1) == pool_y).mean()), 4),
                "pool_macro_f1": round(float(f1_score(pool_y, p[:n_pool].argmax(1), average="macro")), 4)}

    rows = [{"neighbors": None, "alpha": None, "teacher_share": 1.0, **score(teacher)}]
    for k, alpha in itertools.product(NEIGHBORS, ALPHAS):
        dist = spread(lab_j, run.labeled.labels, unl_j, len(classes), k, alpha)
        for m in MIXES:
            rows.append({"neighbors": k, "alpha": alpha, "teacher_share": m,
                         **score(mix_with_spread(teacher, dist, m).probs)})
    return {"work": str(work), "run": str(a), "labeled": len(run.labeled), "pool": n_pool, "dev": len(dev_y),
            "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", nargs="+", type=Path, required=True, help="label_efficiency.py --work dirs, one per seed")
    ap.add_argument("--fraction", type=float, default=0.1, help="ELPV: labeled share; MNIST: labels per class")
    ap.add_argument("--out", type=Path, required=True, help="writes OUT.json and OUT.md")
    args = ap.parse_args()
    t0 = time.time()
    seeds = [one_seed(w, args.fraction) for w in args.work]
    keys = [(r["neighbors"], r["alpha"], r["teacher_share"]) for r in seeds[0]["rows"]]
    table = []
    for i, key in enumerate(keys):
        vals = {m: [s["rows"][i][m] for s in seeds] for m in ("dev_macro_f1", "pool_accuracy", "pool_macro_f1")}
        table.append({"neighbors": key[0], "alpha": key[1], "teacher_share": key[2],
                      **{f"{m}_mean": round(float(np.mean(v)), 4) for m, v in vals.items()},
                      "dev_macro_f1_per_seed": vals["dev_macro_f1"]})
    best = max(table[1:], key=lambda r: r["dev_macro_f1_mean"])
    sha = commit()
    doc = {"benchmark": "propagate_grid", "command": " ".join(sys.argv), "commit": sha, "machine": cpu_name(),
           "wall_seconds": round(time.time() - t0, 1), "fraction": args.fraction, "seeds": seeds,
           "table": table, "best_on_dev": best}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{args.out}.json").write_text(json.dumps(doc, indent=1))
    lines = ["# Label spreading's settings, chosen on the dev split (`benchmarks/propagate_grid.py`)", "",
             f"Machine: {doc['machine']}. Commit `{sha}`. Wall time {doc['wall_seconds']:.0f} s. "
             f"Fraction {args.fraction:g}; {len(seeds)} seeds' stage 1 ({', '.join(s['work'] for s in seeds)}); "
             "no training, the test split not read.", "",
             "Dev macro F1: the dev images join the graph unlabeled (as the pool's images do) and are labeled "
             "by the mixture; pool accuracy and macro F1: the pool's mixture against its held-back truth. "
             "teacher share 1.0 = the stage-1 ensemble alone.", "",
             "| neighbours | alpha | teacher share | dev macro F1 (mean) | per seed | pool accuracy | pool macro F1 |",
             "|---:|---:|---:|---:|---|---:|---:|"]
    for r in table:
        lines.append(f"| {r['neighbors'] if r['neighbors'] is not None else '-'} | {r['alpha'] if r['alpha'] is not None else '-'} "
                     f"| {r['teacher_share']} | {r['dev_macro_f1_mean']:.4f} | {', '.join(f'{v:.4f}' for v in r['dev_macro_f1_per_seed'])} "
                     f"| {r['pool_accuracy_mean']:.4f} | {r['pool_macro_f1_mean']:.4f} |")
    lines += ["", f"Best on dev: {best['neighbors']} neighbours, alpha {best['alpha']}, teacher share "
              f"{best['teacher_share']} (dev macro F1 {best['dev_macro_f1_mean']:.4f}; the teacher alone "
              f"{table[0]['dev_macro_f1_mean']:.4f}).", "", f"Command: `{doc['command']}`"]
    Path(f"{args.out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
