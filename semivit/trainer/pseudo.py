"""Stage 2: pseudo-labels from ensemble confidence and UMAP+KMeans cluster cores (seed 01).

1. The stage-1 fold models (flip TTA, weighted by validation macro F1) predict the unlabeled pool.
2. ``threshold``: predictions with ensemble confidence >= ``pseudo.threshold``.
3. ``cluster``: the members' penultimate embeddings (concatenated, standardised) -> UMAP 2-D ->
   KMeans with k = number of classes; a cluster's purity is the share of its members whose
   predicted label is the cluster's majority label; clusters with purity >= ``pseudo.purity``
   give their ``core_fraction`` of members nearest the centroid (that carry the majority label).
4. Optional per-class cap (highest confidence first) and soft labels.
"""

from __future__ import annotations

import csv
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.utils import atomic_write_json, info, warn


@dataclass
class Clusters:
    assignment: np.ndarray  # cluster id per sample
    centroids: np.ndarray  # (k, 2)
    majority: np.ndarray  # majority predicted label per cluster
    purity: np.ndarray  # per cluster
    sizes: np.ndarray
    cores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # sample indices


def umap_2d(embeddings: np.ndarray, n_neighbors: int, seed: int) -> np.ndarray:
    """Standardise then UMAP to 2-D (umap-learn)."""
    from sklearn.preprocessing import StandardScaler

    x = StandardScaler().fit_transform(embeddings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # umap warns that random_state disables parallelism
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(n_neighbors, len(x) - 1), min_dist=0.0,
                            random_state=seed)
        return reducer.fit_transform(x)


def cluster_cores(points: np.ndarray, predicted: np.ndarray, k: int, purity_min: float,
                  core_fraction: float, seed: int = 0) -> Clusters:
    """KMeans(k) on ``points``; cores of the clusters whose purity >= ``purity_min``.

    Purity = share of a cluster's members whose predicted label is the cluster's majority label.
    A core is the ``core_fraction`` of a pure cluster's members nearest its centroid, among the
    members that carry the majority label (at least one per pure cluster).
    """
    from sklearn.cluster import KMeans

    k = min(k, len(points))
    km = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(points)
    assign = km.labels_
    majority = np.zeros(k, dtype=np.int64)
    purity = np.zeros(k)
    sizes = np.bincount(assign, minlength=k)
    cores: list[int] = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        if len(members) == 0:
            continue
        labels, counts = np.unique(predicted[members], return_counts=True)
        majority[c] = labels[counts.argmax()]
        purity[c] = counts.max() / len(members)
        if purity[c] < purity_min:
            continue
        agree = members[predicted[members] == majority[c]]
        dist = np.linalg.norm(points[agree] - km.cluster_centers_[c], axis=1)
        n_core = max(1, int(round(core_fraction * len(members))))
        cores += agree[np.argsort(dist)[:n_core]].tolist()
    return Clusters(assign, km.cluster_centers_, majority, purity, sizes, np.asarray(sorted(cores), dtype=np.int64))


@dataclass
class PseudoLabels:
    index: np.ndarray  # indices into the unlabeled pool
    label: np.ndarray  # hard label
    confidence: np.ndarray
    source: list[str]  # "threshold", "cluster" or "threshold+cluster"
    probs: np.ndarray  # (n, C) ensemble probabilities (soft labels)


def oof_thresholds(oof_probs: np.ndarray, labels: np.ndarray, target_precision: float,
                   min_support: int) -> np.ndarray:
    """Per-class confidence thresholds calibrated on out-of-fold predictions.

    For class c: among the labeled images the stage-1 models predicted as c (each by the model
    that did not train on it), the lowest confidence t such that those predicted c with
    confidence >= t are right at least ``target_precision`` of the time, with at least
    ``min_support`` of them.  ``inf`` when no threshold reaches the target (the class gets no
    confidence pseudo-labels).
    """
    n_cls = oof_probs.shape[1]
    conf, pred = oof_probs.max(1), oof_probs.argmax(1)
    out = np.full(n_cls, np.inf)
    for c in range(n_cls):
        m = pred == c
        if m.sum() < min_support:
            continue
        order = np.argsort(-conf[m], kind="stable")
        correct = (labels[m] == c)[order]
        prec = np.cumsum(correct) / np.arange(1, len(correct) + 1)
        ok = np.flatnonzero((prec >= target_precision) & (np.arange(1, len(correct) + 1) >= min_support))
        if len(ok):
            out[c] = conf[m][order][ok.max()]  # the largest prefix that still meets the target
    return out


def select(probs: np.ndarray, threshold, clusters: Optional[Clusters] = None,
           max_per_class: Optional[int] = None) -> PseudoLabels:
    """Combine the confidence rule and the cluster cores; apply the per-class cap.

    ``threshold`` is one number or one per class (``inf``: no pseudo-labels for that class,
    from either source).
    """
    conf = probs.max(1)
    pred = probs.argmax(1)
    thr = np.broadcast_to(np.asarray(threshold, dtype=np.float64), (probs.shape[1],))
    src: dict[int, str] = {int(i): "threshold" for i in np.flatnonzero(conf >= thr[pred])}
    label = pred.copy()
    if clusters is not None:
        for i in clusters.cores:
            i = int(i)
            maj = clusters.majority[clusters.assignment[i]]
            if not np.isfinite(thr[maj]):
                continue
            label[i] = maj
            src[i] = "threshold+cluster" if i in src else "cluster"
    idx = np.asarray(sorted(src), dtype=np.int64)
    if max_per_class is not None and len(idx):
        keep = []
        for c in np.unique(label[idx]):
            ids = idx[label[idx] == c]
            keep += ids[np.argsort(-conf[ids], kind="stable")[:max_per_class]].tolist()
        idx = np.asarray(sorted(keep), dtype=np.int64)
    # confidence of a pseudo-label = the ensemble's probability of the label it was given
    confidence = probs[idx, label[idx]] if len(idx) else np.zeros(0)
    return PseudoLabels(idx, label[idx], confidence, [src[int(i)] for i in idx], probs[idx])


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
              selected: np.ndarray) -> None:
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
    fig.suptitle("UMAP of the stage-1 ensemble's penultimate embeddings (unlabeled pool)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_pseudo(run) -> dict:
    """Stage 2 for a run: writes RUN/pseudo/{pseudo_labels.csv, predictions.csv, umap.png, stats.json}."""
    from semivit.data.layout import read_truth
    from semivit.trainer.infer import ensemble_predict

    cfg, pcfg = run.cfg, run.cfg.pseudo
    out = run.stage_dir("pseudo")
    paths, images = run.unlabeled
    classes = run.classes
    stats: dict = {"unlabeled": len(paths)}
    if not len(paths):
        warn("no unlabeled images (DATA/unlabeled/ is missing or empty): stage 2 has nothing to label")
        _write_rows(out / "pseudo_labels.csv", [], classes)
        atomic_write_json(out / "stats.json", stats | {"selected": 0})
        return stats
    probs, embs = ensemble_predict(run.dir, run.stem_features(images, tta=pcfg.tta), stages=["stage1"],
                                   tta=pcfg.tta, device=run.device, with_embeddings=True,
                                   weighting=cfg.ensemble.weighting)
    pred = probs.argmax(1)
    clusters, points = None, None
    if pcfg.cluster and len(paths) >= max(10, len(classes) * 3):
        points = umap_2d(np.concatenate(embs, axis=1), pcfg.umap_neighbors, cfg.seed)
        clusters = cluster_cores(points, pred, len(classes), pcfg.purity, pcfg.core_fraction, cfg.seed)
        stats["clusters"] = [{"size": int(s), "majority": classes[int(m)], "purity": round(float(p), 4),
                              "pure": bool(p >= pcfg.purity)}
                             for s, m, p in zip(clusters.sizes, clusters.majority, clusters.purity)]
    elif pcfg.cluster:
        warn(f"only {len(paths)} unlabeled images: too few for UMAP + KMeans, using the confidence rule only")
    threshold = pcfg.threshold
    if pcfg.threshold_mode == "oof":
        oof = np.load(run.dir / "stage1" / "oof_probs.npy")
        threshold = oof_thresholds(oof, run.labeled.labels, pcfg.target_precision, pcfg.min_support)
        stats["thresholds"] = {c: (round(float(t), 4) if np.isfinite(t) else None) for c, t in zip(classes, threshold)}
        info("per-class thresholds from out-of-fold precision >= "
             f"{pcfg.target_precision}: " + ", ".join(f"{c} {t if t is not None else 'none'}"
                                                      for c, t in stats["thresholds"].items()))
    pl = select(probs, threshold, clusters, pcfg.max_per_class)
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
    if clusters is not None:
        plot_umap(out / "umap.png", points, clusters, pred, classes, pl.index)
        np.save(out / "umap.npy", points)
    atomic_write_json(out / "stats.json", stats)
    msg = f"pseudo-labels: {stats['selected']} of {len(paths)} ({', '.join(f'{k} {v}' for k, v in stats['by_source'].items()) or 'none'})"
    if "truth" in stats and stats["truth"].get("scored"):
        msg += f"; precision vs held-back truth {stats['truth']['precision']:.3f}"
    info(msg)
    return stats


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
