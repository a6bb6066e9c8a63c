"""Stage 2 of a run: the stage-1 fold models (flip TTA, weighted by validation macro F1) predict
the unlabeled pool, and semivit.pseudo selects the pseudo-labels (the configured threshold rule,
UMAP+KMeans cluster cores, the per-class cap - seed 01).  Writes RUN/pseudo/pseudo_labels.csv,
predictions.csv, umap.png and stats.json (with the pseudo-labels' precision against held-back
truth when the data has it).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.pseudo.rules import describe
from semivit.pseudo.select import Clusters, PseudoLabels, label_pool
from semivit.utils import atomic_write_json, info, warn


def precision_report(pl: PseudoLabels, true: list[Optional[int]], classes: list[str]) -> dict:
    """Pseudo-label precision against held-back true labels, per source and per class."""
    rows = [(s, int(l), t) for s, l, t in zip(pl.source, pl.label, (true[i] for i in pl.index)) if t is not None]
    out: dict = {"scored": len(rows), "by_source": {}, "by_class": {}}
    if not rows:
        return out
    for key, groups in (("by_source", lambda r: r[0]), ("by_class", lambda r: classes[r[1]])):
        buckets: dict[str, list[bool]] = {}
        for r in rows:
            buckets.setdefault(groups(r), []).append(r[1] == r[2])
        out[key] = {g: {"count": len(v), "precision": round(float(np.mean(v)), 4)} for g, v in sorted(buckets.items())}
    out["precision"] = round(float(np.mean([r[1] == r[2] for r in rows])), 4)
    return out


def plot_umap(path: Path, points: np.ndarray, clusters: Clusters, pred: np.ndarray, classes: list[str],
              selected: np.ndarray, who: str = "the stage-1 ensemble") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.2))
    for ax, colour, title, names in (
        (axes[0], clusters.assignment, "KMeans clusters (purity)",
         [f"cluster {c}: purity {clusters.purity[c]:.2f} ({classes[clusters.majority[c]]})" for c in range(len(clusters.purity))]),
        (axes[1], pred, "predicted label (black ring: pseudo-labeled)", classes),
    ):
        for v in np.unique(colour):
            m = colour == v
            ax.scatter(points[m, 0], points[m, 1], s=6, alpha=0.7, label=names[int(v)])
        ax.set_title(title)
        ax.legend(fontsize=7, markerscale=2, loc="best")
        ax.set_xticks([])
        ax.set_yticks([])
    if len(selected):
        axes[1].scatter(points[selected, 0], points[selected, 1], s=14, facecolors="none", edgecolors="k", linewidths=0.5)
    axes[0].scatter(clusters.centroids[:, 0], clusters.centroids[:, 1], marker="x", c="k", s=60)
    fig.suptitle(f"UMAP of {who}'s penultimate embeddings (unlabeled pool)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pseudo(run, teacher: tuple[str, ...] = ("stage1",), out: str = "pseudo") -> dict:
    """Stage 2 for a run: the ensemble of the ``teacher`` stages (stage 1; a later distillation
    round: stage 1 + the previous round's students) labels the unlabeled pool; writes
    RUN/<out>/{pseudo_labels.csv, predictions.csv, umap.png, stats.json}.  The ``oof`` rule's
    calibration stays stage 1's out-of-fold predictions (the only ones no student has seen)."""
    from semivit.data.layout import read_truth
    from semivit.trainer.infer import ensemble_predict

    cfg, pcfg = run.cfg, run.cfg.pseudo
    who = "the stage-1 ensemble" if tuple(teacher) == ("stage1",) else f"the ensemble of {' + '.join(teacher)}"
    out = run.stage_dir(out)
    paths, images = run.unlabeled
    classes = run.classes
    stats: dict = {"unlabeled": len(paths)}
    if not len(paths):
        warn("no unlabeled images (DATA/unlabeled/ is missing or empty): stage 2 has nothing to label")
        _write_rows(out / "pseudo_labels.csv", [], classes)
        atomic_write_json(out / "stats.json", stats | {"selected": 0})
        return stats
    inputs = run.stem_features(images, tta=pcfg.tta, what="unlabeled pool")
    probs, embs = ensemble_predict(run.dir, inputs, stages=list(teacher), tta=pcfg.tta, device=run.device,
                                   with_embeddings=True, weighting=cfg.ensemble.weighting)
    if pcfg.extra_teachers:
        probs, stats["teachers"] = with_extra_teachers(run, paths, images, probs, teacher)
        who += " + " + " + ".join(f"{Path(t['run']).name} ({t['members']} members)" for t in stats["teachers"][1:])
    teacher_pred = probs.argmax(1)  # the teacher's own arg-max, before label spreading
    if pcfg.propagate != "none":
        probs, stats["propagate"] = with_propagation(run, probs, embs, teacher, out.name)
        who += " mixed with label spreading"
    oof = run.dir / "stage1" / "oof_probs.npy"
    raw_mean = probs.mean(0)
    pool = label_pool(probs, embs, pcfg, cfg.seed, calibration=lambda: (np.load(oof), run.labeled.labels))
    probs = pool.probs  # what the rule and the soft targets read (aligned to the prior: pseudo.align)
    pred = probs.argmax(1)
    if pcfg.align != "none":
        after = probs.mean(0)
        stats["align"] = {"to": pcfg.align,
                          "pool_mean_before": {c: round(float(m), 4) for c, m in zip(classes, raw_mean)},
                          "pool_mean_after": {c: round(float(m), 4) for c, m in zip(classes, after)}}
        info("distribution alignment: the pool's mean probability per class "
             + ", ".join(f"{c} {b:.3f} -> {a:.3f}" for c, b, a in zip(classes, raw_mean, after)))
    pl, clusters, points = pool.labels, pool.clusters, pool.points
    if clusters is not None:
        stats["clusters"] = [{"size": int(s), "majority": classes[int(m)], "purity": round(float(p), 4),
                              "pure": bool(p >= pcfg.purity)}
                             for s, m, p in zip(clusters.sizes, clusters.majority, clusters.purity)]
    elif pcfg.cluster:
        warn(f"only {len(paths)} unlabeled images: too few for UMAP + KMeans, using the confidence rule only")
    if pcfg.threshold_mode != "global":
        stats["thresholds"] = describe(pool.thresholds, classes)
        if pcfg.threshold_mode != "all":  # "all" has no threshold to report (0 for every class)
            info(f"per-class thresholds ({pcfg.threshold_mode} rule" + (f", out-of-fold precision >= {pcfg.target_precision}"
                                                                        if pcfg.threshold_mode == "oof" else "") + "): "
                 + ", ".join(f"{c} {t if t is not None else 'none'}" for c, t in stats["thresholds"].items()))
    rel = [run.rel(p) for p in paths]
    rows = [(rel[i], classes[l], c, s, probs[i]) for i, l, c, s in zip(pl.index, pl.label, pl.confidence, pl.source)]
    _write_rows(out / "pseudo_labels.csv", rows, classes)
    with open(out / "predictions.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "pred", "confidence", "cluster", "selected"])
        sel = set(pl.index.tolist())
        for i in range(len(paths)):
            w.writerow([rel[i], classes[pred[i]], f"{probs[i].max():.6f}",
                        int(clusters.assignment[i]) if clusters is not None else "", int(i in sel)])
    stats["selected"] = int(len(pl.index))
    stats["by_source"] = {s: pl.source.count(s) for s in sorted(set(pl.source))}
    stats["by_class"] = {classes[c]: int((pl.label == c).sum()) for c in range(len(classes))}
    truth = read_truth(run.data, cfg.data.truth_file)
    if truth:
        true = [classes.index(truth[r]) if truth.get(r) in classes else None for r in rel]
        stats["truth"] = precision_report(pl, true, classes)
        scored = [t for t in true if t is not None]
        if scored:
            stats["truth"]["pool_accuracy"] = round(float(np.mean([pred[i] == t for i, t in enumerate(true) if t is not None])), 4)
            if "propagate" in stats:
                stats["truth"]["teacher_pool_accuracy"] = round(float(np.mean(
                    [teacher_pred[i] == t for i, t in enumerate(true) if t is not None])), 4)
    if clusters is not None:
        plot_umap(out / "umap.png", points, clusters, pred, classes, pl.index, who)
        np.save(out / "umap.npy", points)
    atomic_write_json(out / "stats.json", stats)
    info(summary_line(stats, pcfg, who))
    return stats


def with_extra_teachers(run, paths: list, images: np.ndarray, probs: np.ndarray,
                        teacher: tuple[str, ...]) -> tuple[np.ndarray, list[dict]]:
    """``pseudo.extra_teachers``: the pool's probabilities from the ``teacher`` stages of this
    run (``probs``, already computed) mixed with those of every other run's stage-1 models, each
    run on the pool decoded at its own size (its models normalise as their weights expect).
    Every member of every teacher keeps the weight it would have in one ensemble of them all
    (ensemble.weighting over their validation macro F1), so a run's share is its members' sum."""
    from semivit.models.ensemble import ensemble_weights, members_from_stages, read_ensemble
    from semivit.progress import progress_bar
    from semivit.trainer.infer import ensemble_predict
    from semivit.trainer.methods import check_extra_teachers
    from semivit.trainer.run import decode_with_progress

    cfg = run.cfg
    groups = [(run.dir, list(teacher))] + [(p, ["stage1"]) for p in check_extra_teachers(cfg, run.classes, run.dir)]
    f1s = [[m["val_macro_f1"] for m in members_from_stages(d, st)] for d, st in groups]
    w = ensemble_weights([f for g in f1s for f in g], cfg.ensemble.weighting)
    shares = np.split(w, np.cumsum([len(g) for g in f1s])[:-1])
    # a group's ensemble (weights normalised within it) x its share = its members at their pooled
    # weights, because both weightings (f1, equal) are proportional to a per-member score
    mixed = probs * float(shares[0].sum())
    rows = [{"run": str(run.dir), "stages": list(teacher), "members": len(f1s[0]),
             "share": round(float(shares[0].sum()), 4), "img_size": cfg.model.img_size}]
    for (d, st), share, g in zip(groups[1:], shares[1:], f1s[1:]):
        size = int(read_ensemble(d)["img_size"])
        if size == cfg.model.img_size:
            theirs = images
        else:
            dec = decode_with_progress(paths, size, f"unlabeled images at {size} px for {d.name}",
                                       cfg.data.decode_workers)
            if len(dec.ok) != len(paths):
                raise UserError(f"pseudo.extra_teachers: {len(paths) - len(dec.ok)} unlabeled images "
                                f"no longer decode at {size} px")
            theirs = dec.images
        with progress_bar(transient=True) as bar:  # full models on pixels: minutes on a CPU
            task = bar.add_task(f"co-teacher {d.name} on the unlabeled pool", total=len(g), status="", unit="members")
            p = ensemble_predict(d, theirs, stages=st, tta=cfg.pseudo.tta, device=run.device,
                                 weighting=cfg.ensemble.weighting,
                                 progress=lambda done, _n: bar.update(task, completed=done))
        mixed = mixed + p * float(share.sum())
        rows.append({"run": str(d), "stages": st, "members": len(g), "share": round(float(share.sum()), 4),
                     "img_size": size})
    info("teacher ensemble: " + ", ".join(f"{Path(r['run']).name} {r['members']} members (share {r['share']:.3f}, "
                                          f"{r['img_size']} px)" for r in rows))
    return mixed.astype(np.float32), rows


def with_propagation(run, probs: np.ndarray, embs: list, teacher: tuple[str, ...],
                     out_dir: str = "pseudo") -> tuple[np.ndarray, dict]:
    """``pseudo.propagate: spread``: the ``teacher`` stages' members embed the labeled images too
    (their pool embeddings are ``embs``), labels spread over the graph of both, mixed with the
    pool's teacher ``probs`` (semivit.pseudo.propagate).  With ``pseudo.propagate_labels: fold``
    also once per fold from its training folds' labels, saved to RUN/<out_dir>/propagate_folds.npz
    for stage 3.  Checks the combination first."""
    from semivit.pseudo.propagate import joint_embedding, propagate
    from semivit.trainer.infer import ensemble_predict
    from semivit.trainer.methods import check_propagate
    from semivit.utils import atomic_path

    pcfg = run.cfg.pseudo
    check_propagate(run.cfg)
    inputs = run.stem_features(run.images, tta=pcfg.tta, what="labeled images")
    _, lab_embs = ensemble_predict(run.dir, inputs, stages=list(teacher), tta=pcfg.tta, device=run.device,
                                   with_embeddings=True, weighting=run.cfg.ensemble.weighting)
    pool, lab, labels = joint_embedding(embs), joint_embedding(lab_embs), np.asarray(run.labeled.labels)
    out = propagate(probs, pool, lab, labels, pcfg)
    stats = {"method": pcfg.propagate, "neighbors": pcfg.propagate_neighbors, "alpha": pcfg.propagate_alpha,
             "teacher_share": pcfg.propagate_mix, "labels": pcfg.propagate_labels, "reached": out.reached,
             "argmax_changed": out.changed}
    if pcfg.propagate_labels == "fold":  # fold k's targets: spread from its training folds' labels only
        folds = np.asarray(run.folds)
        per_fold = [propagate(probs, pool, lab[folds != k], labels[folds != k], pcfg) for k in range(run.cfg.cv.folds)]
        paths, _ = run.unlabeled
        with atomic_path(run.stage_dir(out_dir) / "propagate_folds.npz") as tmp, open(tmp, "wb") as f:
            np.savez(f, images=np.asarray([run.rel(p) for p in paths]),
                     probs=np.stack([p.probs for p in per_fold]).astype(np.float32))
        stats["fold_argmax_changed"] = [p.changed for p in per_fold]
    info(f"label spreading over {len(run.labeled)} labeled + {len(probs)} unlabeled images "
         f"({pcfg.propagate_neighbors} neighbours, alpha {pcfg.propagate_alpha:g}, teacher's share "
         f"{pcfg.propagate_mix:g}): the graph reached {out.reached}, the arg-max changed on {out.changed}")
    return out.probs, stats


def summary_line(stats: dict, pcfg, who: str = "the stage-1 ensemble") -> str:
    """Stage 2's one-line result.  Under the ``all`` rule nothing is selected by confidence: every
    unlabeled image gets the ensemble's prediction, so say that (and, for soft targets, that
    stage 3 distils the probabilities) instead of a threshold count that only repeats the total."""
    n, selected = stats["unlabeled"], stats["selected"]
    truth = stats["truth"]["precision"] if stats.get("truth", {}).get("scored") else None
    if pcfg.threshold_mode == "all":
        which = f"all {n} unlabeled images" if selected == n else f"{selected} of {n} unlabeled images"
        if selected != n and pcfg.max_per_class is not None:
            which += f" (at most {pcfg.max_per_class} per predicted class)"
        if pcfg.soft:
            msg = f"soft targets: {who}'s probabilities on {which} (distillation, no threshold)"
            return msg + (f"; its argmax agrees with held-back truth on {100 * truth:.1f}%" if truth is not None else "")
        msg = f"pseudo-labels: {who}'s predicted class on {which} (all rule: no threshold, hard labels)"
        return msg + (f"; correct vs held-back truth on {100 * truth:.1f}%" if truth is not None else "")
    msg = f"pseudo-labels: {selected} of {n} ({', '.join(f'{k} {v}' for k, v in stats['by_source'].items()) or 'none'})"
    if truth is not None:
        msg += f"; precision vs held-back truth {truth:.3f}"
    return msg


def _write_rows(path: Path, rows, classes: list[str]) -> None:
    from semivit.utils import atomic_path

    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "confidence", "source"] + [f"p_{c}" for c in classes])
        for r, label, conf, src, p in rows:
            w.writerow([r, label, f"{conf:.6f}", src] + [f"{x:.6f}" for x in p])


def read_pseudo_labels(path: Path, classes: list[str]) -> list[dict]:
    """Rows of pseudo_labels.csv with the label index and soft probabilities parsed."""
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["label_index"] = classes.index(r["label"])
        r["confidence"] = float(r["confidence"])
        r["probs"] = np.asarray([float(r[f"p_{c}"]) for c in classes], dtype=np.float32)
    return rows
