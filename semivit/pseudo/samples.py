"""Pseudo-labels -> extra training samples: the one conversion stage 3 of ``ssl train`` and the
retrain of ``ssl refresh`` both use (hard label, or with ``pseudo.soft`` the ensemble's
probabilities; loss weight = the pseudo-label's confidence with ``pseudo.weight: confidence``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np


@dataclass
class Extra:
    """Extra training samples for a fold (pseudo-labels): never used for validation."""

    images: np.ndarray
    labels: np.ndarray  # int (N,) or soft (N, C)
    weights: np.ndarray  # per-sample loss weights (confidence)
    views: Optional[np.ndarray] = None  # cached stem features, filled once and shared by all folds
    view_labels: Optional[np.ndarray] = None  # pseudo.targets=view: soft targets (N, views, C), filled once


def pseudo_samples(images: np.ndarray, labels: Sequence[int], confidences: Sequence[float],
                   probs: Optional[Sequence[Sequence[float]]], pcfg) -> Extra:
    """One row per image of ``images``: its pseudo-label index, confidence and (for soft labels)
    the ensemble's probabilities (None when they are not known: hard labels then)."""
    if not len(labels):
        return Extra(images[:0], np.zeros(0, np.int64), np.zeros(0, np.float32))
    if pcfg.soft and probs is not None:
        y = np.asarray(probs, dtype=np.float32)
    else:
        y = np.asarray(labels, dtype=np.int64)
    if pcfg.weight == "confidence":
        w = np.asarray(confidences, dtype=np.float32)
    else:
        w = np.ones(len(labels), dtype=np.float32)
    assert len(images) == len(y) == len(w), (len(images), len(y), len(w))
    return Extra(images, y, w)


def concat(a: Extra, b: Extra) -> Extra:
    """Both sets of samples; one hard and one soft: both soft (one-hot)."""
    if not len(a.labels):
        return b
    if not len(b.labels):
        return a
    la, lb = a.labels, b.labels
    if la.ndim != lb.ndim:
        n = max(x.shape[1] for x in (la, lb) if x.ndim == 2)
        la = np.eye(n, dtype=np.float32)[la] if la.ndim == 1 else la
        lb = np.eye(n, dtype=np.float32)[lb] if lb.ndim == 1 else lb
    return Extra(np.concatenate([a.images, b.images]), np.concatenate([la, lb]),
                 np.concatenate([a.weights, b.weights]))
