"""How good are the teacher's targets per cached view?  A diagnostic for ``pseudo.targets=view``.

With ``pseudo.targets: image`` (the default) a stage-3 student learns one soft target per pool
image - the stage-1 ensemble on the plain image and its mirror - whichever of the image's cached
augmented views it trains on.  With ``view`` it learns the ensemble's prediction on that very
view (consistent teaching).  This script recomputes, on a label-efficiency benchmark's finished
``C-<name>`` runs (no training), the stage-3 views exactly as fold 1 drew them (in a one-round
stage 3 that ran from its first fold; a resumed stage 3 draws them with the seed of the first fold
it trained) and reports:

  - the arg-max agreement with the held-back truth of the pool (``unlabeled_truth.csv``) of the
    image targets and of the view targets, view 0 (the plain image, no mirror) and the augmented
    views 1..V apart;
  - per class: the arg-max precision (of the images a target names as class c, the share that
    are c) and how many it names, image targets against the augmented views' targets;
  - how far the view targets move from the image target (mean total variation distance).

    python benchmarks/view_teacher.py --work /tmp/le-view/s0 ... /tmp/le-view/s4 --candidate view \
        --out benchmarks/results/view_teacher
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from label_efficiency import commit, cpu_name  # noqa: E402


def per_class(pred: np.ndarray, truth: np.ndarray, classes: list[str]) -> dict:
    out = {}
    for c, name in enumerate(classes):
        named = pred == c
        out[name] = {"named": int(named.sum()),
                     "precision": round(float((truth[named] == c).mean()), 4) if named.any() else None}
    return out


def pool_targets(run_dir: Path):
    """(run, stage 2's image targets (N, C), the pool's true classes (N,), the view targets
    (N, V, C) recomputed as stage 3's first fold drew the views)."""
    from semivit import config
    from semivit.data.layout import read_truth
    from semivit.trainer.folds import fold_seed
    from semivit.trainer.pipeline import pseudo_extra, view_targets
    from semivit.trainer.pseudo import read_pseudo_labels
    from semivit.trainer.run import open_run

    cfg, data = config.load_run_config(run_dir)
    run = open_run(run_dir, cfg, data, create=False)
    paths, _ = run.unlabeled
    extra = pseudo_extra(run)  # stage 2's soft targets, one per pool image (every image: rule "all")
    if len(extra.labels) != len(paths) or extra.labels.ndim != 2:
        raise SystemExit(f"error: {run_dir}: stage 2 did not give every pool image a soft target")
    truth_map = read_truth(run.data, cfg.data.truth_file)
    rows = read_pseudo_labels(run.dir / "pseudo" / "pseudo_labels.csv", run.classes)  # extra's order
    truth = np.asarray([run.classes.index(truth_map[r["image"]]) for r in rows])
    # fold 1's draw: the first stage-3 fold to train computes the views that every fold shares
    views = run.augmented_views(extra.images, seed=fold_seed(cfg, "stage3", 0) + 50, what="stage3 unlabeled images")
    return run, extra.labels, truth, view_targets(run, views, ("stage1",))


def one_run(run_dir: Path) -> dict:
    run, image_targets, truth, vt = pool_targets(run_dir)
    return summary(str(run_dir), run.classes, image_targets, truth, vt)


def summary(name: str, classes: list[str], image_targets: np.ndarray, truth: np.ndarray, vt: np.ndarray) -> dict:
    img_pred, view_pred = image_targets.argmax(1), vt.argmax(2)
    aug = view_pred[:, 1:].ravel()
    aug_truth = np.repeat(truth[:, None], vt.shape[1] - 1, axis=1).ravel()
    tv = 0.5 * np.abs(vt - image_targets[:, None, :]).sum(2)
    return {
        "run": name, "pool": len(truth), "views": int(vt.shape[1]),
        "agreement": {"image_targets": round(float((img_pred == truth).mean()), 4),
                      "view0_plain": round(float((view_pred[:, 0] == truth).mean()), 4),
                      "augmented_views": round(float((aug == aug_truth).mean()), 4)},
        "per_class": {"image_targets": per_class(img_pred, truth, classes),
                      "augmented_views": per_class(aug, aug_truth, classes)},
        "mean_tv_distance_to_image_target": {"view0_plain": round(float(tv[:, 0].mean()), 4),
                                             "augmented_views": round(float(tv[:, 1:].mean()), 4)},
        "classes": classes,
    }


def render(doc: dict) -> str:
    lines = ["# Teacher targets per cached view (`benchmarks/view_teacher.py`)", "",
             f"Machine: {doc['machine']}; commit {doc['commit']}; wall time {doc['wall_seconds']} s.  "
             f"Command: `{doc['command']}`.", "",
             "The stage-1 ensemble's soft targets for the unlabeled pool, scored against its held-back truth: "
             "*image* = one target per image (plain + mirror; what `pseudo.targets: image` trains on), "
             "*view 0* = the plain image without its mirror, *augmented* = the ensemble on each of the "
             "cached augmented views (what `pseudo.targets: view` trains on for those views).", "",
             "| seed run | arg-max agreement: image | view 0 | augmented views | mean TV distance to the image target: view 0 / augmented |",
             "|---|---:|---:|---:|---:|"]
    for r in doc["runs"]:
        a, d = r["agreement"], r["mean_tv_distance_to_image_target"]
        lines.append(f"| {r['run']} | {a['image_targets']:.4f} | {a['view0_plain']:.4f} | {a['augmented_views']:.4f} | "
                     f"{d['view0_plain']:.4f} / {d['augmented_views']:.4f} |")
    lines += ["", "Per class: arg-max precision (count named) - image targets / augmented views' targets.", ""]
    classes = doc["runs"][0]["classes"]
    lines += ["| seed run | " + " | ".join(classes) + " |", "|---|" + "---|" * len(classes)]

    def cell(x):
        return "-" if x["precision"] is None else f"{x['precision']:.2f} ({x['named']})"

    for r in doc["runs"]:
        pc = r["per_class"]
        lines.append(f"| {r['run']} | " + " | ".join(f"{cell(pc['image_targets'][c])} / {cell(pc['augmented_views'][c])}"
                                                      for c in classes) + " |")
    m = doc["mean"]
    lines += ["", f"Mean over the {len(doc['runs'])} runs: agreement image {m['image_targets']:.4f}, view 0 "
              f"{m['view0_plain']:.4f}, augmented {m['augmented_views']:.4f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, nargs="+", required=True, help="label_efficiency.py --work directories")
    ap.add_argument("--candidate", default="view", help="the C-<name> run whose stage 1 and stage 2 are read")
    ap.add_argument("--out", type=Path, required=True, help="output stem (.json and .md are written)")
    args = ap.parse_args(argv)
    t0 = time.time()
    runs = []
    for w in args.work:
        found = sorted(w.glob(f"runs-*/C-{args.candidate}"))
        if not found:
            raise SystemExit(f"error: no runs-*/C-{args.candidate} under {w}")
        for run_dir in found:
            runs.append(one_run(run_dir))
            print(json.dumps(runs[-1]["agreement"]), run_dir, flush=True)
    keys = ("image_targets", "view0_plain", "augmented_views")
    doc = {"benchmark": "view_teacher", "machine": cpu_name(), "commit": commit(),
           "command": "python benchmarks/view_teacher.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "wall_seconds": round(time.time() - t0, 1), "runs": runs,
           "mean": {k: round(float(np.mean([r["agreement"][k] for r in runs])), 4) for k in keys}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(render(doc))
    print(f"wrote {args.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
