"""Label spreading over the teacher's embeddings: the unlabeled pool's own structure (issue 13).

The teacher ensemble labels each unlabeled image on its own.  Label spreading (Zhou et al. 2004,
"Learning with local and global consistency"; used for deep semi-supervised learning by Iscen et
al. 2019, "Label propagation for deep semi-supervised learning") lets the labels flow from the
labeled images to their neighbours, and on through the pool, over a k-nearest-neighbour graph of
the stage-1 members' penultimate embeddings: an image whose neighbours are labeled (or confidently
labeled by the graph) one class is pulled towards it, whatever the teacher's head said alone.

``pseudo.propagate: spread`` mixes the two: ``p = m x teacher + (1 - m) x spread`` with
``m = pseudo.propagate_mix``, rows renormalised; the rule, the cluster cores and the soft targets
then read p.  An image whose graph component holds no labeled image gets no spread distribution
and keeps the teacher's probabilities.

The graph and the iteration are scikit-learn's ``LabelSpreading`` (knn kernel): a maintained
implementation, not written here.  What is written here is the embedding (each member's vectors
L2-normalised, then concatenated and scaled so every member counts the same) and the mixing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


def joint_embedding(members: Sequence[np.ndarray]) -> np.ndarray:
    """One vector per image from the ensemble members' embeddings: each member's rows
    L2-normalised, concatenated, divided by sqrt(members) (unit norm again, equal say per member)."""
    out = []
    for e in members:
        e = np.asarray(e, dtype=np.float64)
        out.append(e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12))
    return np.concatenate(out, axis=1) / np.sqrt(len(out))


def spread_all(labeled: np.ndarray, labels: np.ndarray, pool: np.ndarray, n_classes: int,
               neighbors: int, alpha: float) -> np.ndarray:
    """Label spreading from the ``labeled`` rows (class indices ``labels``) over the graph of them
    and the ``pool`` rows; returns EVERY node's class distribution, the labeled rows first
    ((n_labeled + n_pool) x n_classes; a row of zeros where the graph did not reach the node).
    ``alpha``: how much a node takes from its neighbours (0: labeled nodes keep their labels
    exactly; near 1: everything from the graph)."""
    from sklearn.semi_supervised import LabelSpreading

    labels = np.asarray(labels, dtype=int)
    x = np.concatenate([labeled, pool]).astype(np.float64)
    y = np.concatenate([labels, np.full(len(pool), -1, dtype=int)])
    k = max(1, min(int(neighbors), len(x) - 1))
    with np.errstate(divide="ignore", invalid="ignore"):  # unreached rows: 0/0, set to 0 below
        model = LabelSpreading(kernel="knn", n_neighbors=k, alpha=alpha, max_iter=200, tol=1e-4).fit(x, y)
    out = np.zeros((len(x), n_classes))
    out[:, model.classes_] = np.nan_to_num(model.label_distributions_)  # a class with no labeled image gets no mass
    return out


def spread(labeled: np.ndarray, labels: np.ndarray, pool: np.ndarray, n_classes: int,
           neighbors: int, alpha: float) -> np.ndarray:
    """:func:`spread_all`'s distributions of the ``pool`` rows (n_pool x n_classes)."""
    return spread_all(labeled, labels, pool, n_classes, neighbors, alpha)[len(labeled):]


@dataclass
class Propagated:
    probs: np.ndarray  # the mixed pool probabilities
    reached: int  # pool images the graph gave a distribution
    changed: int  # pool images whose arg-max the mixing changed


def mixture(teacher: np.ndarray, spread_dist: np.ndarray, teacher_share: float) -> tuple[np.ndarray, np.ndarray]:
    """``teacher_share`` x the teacher's probabilities + the rest x the spread distribution (each
    row normalised), rows renormalised, float64; rows the graph did not reach keep the teacher's.
    Returns (mixture, reached mask)."""
    teacher = np.asarray(teacher, dtype=np.float64)
    mass = spread_dist.sum(1, keepdims=True)
    reached = mass[:, 0] > 0
    sp = np.where(reached[:, None], spread_dist / np.where(mass > 0, mass, 1.0), teacher)
    p = teacher_share * teacher + (1.0 - teacher_share) * sp
    return p / p.sum(1, keepdims=True), reached


def mix_with_spread(teacher: np.ndarray, spread_dist: np.ndarray, teacher_share: float) -> Propagated:
    """:func:`mixture` as float32 probabilities, with how many rows the graph reached and how many
    arg-maxes it changed."""
    p, reached = mixture(teacher, spread_dist, teacher_share)
    return Propagated(p.astype(np.float32), int(reached.sum()), int((p.argmax(1) != np.asarray(teacher).argmax(1)).sum()))


def propagate(teacher: np.ndarray, pool: np.ndarray, labeled: np.ndarray, labels: np.ndarray, pcfg) -> Propagated:
    """``pseudo.propagate: spread`` over the pool: label spreading from the ``labeled`` images'
    joint embeddings (:func:`joint_embedding`) to the ``pool``'s, mixed with the teacher's
    probabilities."""
    dist = spread(labeled, labels, pool, teacher.shape[1], pcfg.propagate_neighbors, pcfg.propagate_alpha)
    return mix_with_spread(teacher, dist, pcfg.propagate_mix)
