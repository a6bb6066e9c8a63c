"""Pseudo-label selection rules: which confidence makes a prediction a pseudo-label, per class.

A rule turns what is known (the configured global threshold, the ``pseudo.*`` settings, the
pool's ensemble probabilities, and - on demand - the stage-1 out-of-fold predictions of the
labeled images) into ONE THRESHOLD PER CLASS: a prediction of class c with confidence >= t[c] is
selected (``inf``: class c gets no pseudo-labels, from any source).  The config names the rule -
``pseudo.threshold_mode`` for stage 2 and ``ssl refresh``, ``ssl.threshold_mode`` for the
EMA-Teacher - and every one of them asks :func:`class_thresholds`, so all apply the same rule.

Adding a rule is one function and its registration; nothing else branches on the name::

    from semivit.pseudo.rules import RuleInputs, threshold_rule

    @threshold_rule("topk")
    def topk_quota(inp: RuleInputs) -> np.ndarray:
        '''Per class, the confidence of its k-th most confident prediction in the pool.'''
        if inp.pool_probs is None:   # the EMA-Teacher labels online: there is no pool
            raise UserError("threshold rule 'topk' needs the unlabeled pool's predictions")
        ...
        return thresholds  # shape (inp.num_classes,)

The config's validator accepts every registered name (a wrong one is a one-line error listing
them); a rule that needs a new setting adds that key to ``PseudoConfig`` and reads it from
``inp.settings``.  Write the rule in this module (or in a module imported at the end of it), so
that it is registered whenever the registry is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from semivit.errors import UserError
from semivit.utils import read_json


@dataclass
class RuleInputs:
    """What a rule may use.  ``calibration()`` loads (probabilities, true labels) of the labeled
    images as predicted out of fold by stage 1 - only when a rule calls it."""

    num_classes: int
    threshold: float  # the configured global threshold (pseudo.threshold or ssl.threshold)
    settings: Any  # the PseudoConfig: target_precision, min_support, max_per_class, ...
    pool_probs: Optional[np.ndarray] = None  # (N, C) ensemble probabilities of the pool; None online
    calibration: Optional[Callable[[], tuple[np.ndarray, np.ndarray]]] = None


Rule = Callable[[RuleInputs], np.ndarray]
_RULES: dict[str, Rule] = {}


def threshold_rule(name: str) -> Callable[[Rule], Rule]:
    """Register a rule under the config name ``name`` (decorator)."""
    def register(fn: Rule) -> Rule:
        _RULES[name] = fn
        return fn

    return register


def rule_names() -> list[str]:
    return list(_RULES)


def class_thresholds(name: str, inputs: RuleInputs) -> np.ndarray:
    """The rule ``name``'s thresholds, one float per class (``inf``: no pseudo-labels)."""
    if name not in _RULES:
        raise UserError(f"unknown pseudo-label threshold rule '{name}' (choose from {', '.join(_RULES)})")
    thr = np.asarray(_RULES[name](inputs), dtype=np.float64)
    return np.broadcast_to(thr, (inputs.num_classes,)).copy()


def describe(thresholds: np.ndarray, classes: list[str]) -> dict:
    """{class: threshold rounded, or None for 'no pseudo-labels'} - for stats and history."""
    return {c: (round(float(t), 4) if np.isfinite(t) else None) for c, t in zip(classes, thresholds)}


def run_calibration(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A run's stage-1 out-of-fold probabilities and the true labels of those images
    (RUN/stage1/oof_probs.npy rows follow RUN/folds.json's items)."""
    run_dir = Path(run_dir)
    doc = read_json(run_dir / "folds.json")
    classes = list(doc["classes"])
    labels = np.asarray([classes.index(it["label"]) for it in doc["items"]], dtype=np.int64)
    path = run_dir / "stage1" / "oof_probs.npy"
    if not path.is_file():
        raise UserError(f"{run_dir} has no stage-1 out-of-fold predictions ({path}): the threshold rule needs them")
    return np.load(path), labels


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


# ----------------------------------------------------------------------------- the rules
@threshold_rule("global")
def global_threshold(inp: RuleInputs) -> np.ndarray:
    """One threshold for every class (the seed's rule)."""
    return np.full(inp.num_classes, inp.threshold)


@threshold_rule("oof")
def out_of_fold(inp: RuleInputs) -> np.ndarray:
    """Per class, the lowest confidence at which the stage-1 out-of-fold predictions of that class
    reach ``pseudo.target_precision`` (with >= ``pseudo.min_support`` of them)."""
    if inp.calibration is None:
        raise UserError("threshold rule 'oof' needs the stage-1 out-of-fold predictions")
    probs, labels = inp.calibration()
    return oof_thresholds(probs, labels, inp.settings.target_precision, inp.settings.min_support)


# Rules written in other modules register on import (see the module docstring).
from semivit.pseudo import adaptive  # noqa: E402,F401
