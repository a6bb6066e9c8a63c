"""Pseudo-labels from a pool's ensemble predictions: the threshold rule (semivit.pseudo.rules),
UMAP + KMeans cluster cores (seed 01) and the per-class cap - the one implementation stage 2
(``ssl train``) and ``ssl refresh`` both run.

1. ``threshold``: a prediction of class c with confidence >= the rule's threshold for c.
2. ``cluster``: the members' penultimate embeddings (concatenated, standardised) -> UMAP 2-D ->
   KMeans with k = number of classes; a cluster's purity is the share of its members whose
   predicted label is the cluster's majority label; clusters with purity >= ``pseudo.purity``
   give their ``core_fraction`` of members nearest the centroid (that carry the majority label).
   Only when the pool has at least max(10, 3 x classes) images.
3. Optional per-class cap (``pseudo.max_per_class``, highest confidence first).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from typing import Callable, Optional, Sequence

import numpy as np

from semivit.pseudo.rules import RuleInputs, class_thresholds


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


def enough_for_clusters(n_images: int, n_classes: int) -> bool:
    """UMAP + KMeans need a pool of at least max(10, 3 x classes) images."""
    return n_images >= max(10, 3 * n_classes)


@dataclass
class PoolLabels:
    labels: PseudoLabels
    thresholds: np.ndarray  # per class, as the configured rule gave them
    clusters: Optional[Clusters] = None  # None: clustering off, or the pool too small for it
    points: Optional[np.ndarray] = None  # the UMAP 2-D points (with clusters)
    probs: Optional[np.ndarray] = None  # the pool's probabilities the selection read (aligned: pseudo.align)


def label_pool(probs: np.ndarray, embeddings: Sequence[np.ndarray], pcfg, seed: int,
               calibration: Optional[Callable[[], tuple[np.ndarray, np.ndarray]]] = None) -> PoolLabels:
    """Select pseudo-labels for a pool from its ensemble ``probs`` and the members' penultimate
    ``embeddings`` by the ``pseudo.*`` config ``pcfg``: distribution alignment to the labeled
    prior (``pcfg.align``), the rule ``pcfg.threshold_mode``, the cluster cores (``pcfg.cluster``),
    the per-class cap."""
    n_cls = probs.shape[1]
    inp = RuleInputs(n_cls, pcfg.threshold, pcfg, probs, calibration)
    if pcfg.align == "prior":
        from semivit.pseudo.adaptive import align_to_prior, labeled_prior

        probs = align_to_prior(probs, labeled_prior(inp, "pseudo.align=prior"))
        inp = replace(inp, pool_probs=probs)
    thresholds = class_thresholds(pcfg.threshold_mode, inp)
    clusters, points = None, None
    if pcfg.cluster and enough_for_clusters(len(probs), n_cls):
        points = umap_2d(np.concatenate(list(embeddings), axis=1), pcfg.umap_neighbors, seed)
        clusters = cluster_cores(points, probs.argmax(1), n_cls, pcfg.purity, pcfg.core_fraction, seed)
    pl = select(probs, thresholds, clusters, pcfg.max_per_class)
    return PoolLabels(pl, thresholds, clusters, points, probs)
