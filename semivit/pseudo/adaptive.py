"""Class-adaptive selection rules: pseudo-labels that reach every class (issue 13).

With a class-balanced loss and four imbalanced classes, one confidence threshold (or the
out-of-fold precision rule) pseudo-labels only the easy classes; the rare ones, which decide
macro F1, get nothing.  These rules give every class its share:

- ``quota``: per-class quotas aligned to the labeled class prior (CReST, Wei et al. 2021; DASO,
  Oh et al. 2022, select the top-k of each class): class c gets ``k_c = quota x pool x prior_c``
  pseudo-labels - its k_c most confident predictions - so the pseudo-labels follow the class
  balance of the labels instead of the classifier's bias.
- ``freematch``: FreeMatch's self-adaptive thresholds (Wang et al. 2023), in the offline form
  that a pool predicted once allows: the global level tau = mean max-probability over the pool
  (FreeMatch tracks it as an EMA during training), the class level = the mean probability of c
  over the pool normalised by its maximum; ``T_c = tau * p_c / max_k p_k``.  A class the model
  rarely predicts gets a lower bar.
- ``pseudo.align: prior`` (not a rule: it changes the probabilities every rule then reads):
  ReMixMatch's distribution alignment (Berthelot et al. 2020) over the pool - the classes'
  probabilities rescaled so that their mean over the pool is the labeled class prior.
- ``all``: every prediction (threshold 0): the teacher labels the whole pool, for soft-target
  distillation (``pseudo.soft: true``, ``pseudo.weight: one``) - Noisy Student / ensemble
  distillation.

Written here, not taken from a library: USB (the maintained semi-supervised library) implements
these inside its online training hooks, over per-batch model outputs; semivit selects once over a
pool predicted by the stage-1 ensemble, so the rules are a few lines over that matrix.
"""

from __future__ import annotations

import numpy as np

from semivit.errors import UserError
from semivit.pseudo.rules import RuleInputs, threshold_rule


def _pool(inp: RuleInputs, name: str) -> np.ndarray:
    if inp.pool_probs is None:  # the EMA-Teacher labels online, batch by batch: there is no pool
        raise UserError(f"pseudo-label rule '{name}' needs the unlabeled pool's predictions "
                        "(stage 2 or ssl refresh); the EMA-Teacher's ssl.threshold_mode takes global or oof")
    return inp.pool_probs


def quota_thresholds(probs: np.ndarray, prior: np.ndarray, share: float) -> np.ndarray:
    """Per class c, the confidence of the k_c-th most confident prediction of c in the pool, with
    k_c = max(1, round(share x len(pool) x prior_c)); all of c's predictions when there are fewer;
    ``inf`` when the pool has none."""
    n_cls = probs.shape[1]
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    quota = np.maximum(1, np.round(share * len(probs) * prior)).astype(int)
    conf, pred = probs.max(1), probs.argmax(1)
    out = np.full(n_cls, np.inf)
    for c in range(n_cls):
        mine = np.sort(conf[pred == c])[::-1]
        if len(mine):
            out[c] = mine[min(quota[c], len(mine)) - 1]
    return out


def align_to_prior(probs: np.ndarray, prior: np.ndarray, iters: int = 100, tol: float = 1e-6) -> np.ndarray:
    """Distribution alignment: per-class factors w such that the rows of ``probs * w``, each
    renormalised to sum 1, average to ``prior`` over the pool.  ReMixMatch takes one step of
    ``p * prior / mean(p)`` per batch against a running mean; with the whole pool at hand the step
    is repeated until the pool mean matches (a Sinkhorn-style fixed point, a few iterations).  A
    class with prior 0 gets probability 0; a class the pool never predicts stays at 0."""
    p = np.asarray(probs, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    prior = prior / prior.sum()
    w = np.ones(p.shape[1])
    q = p
    for _ in range(iters):
        q = p * w
        q = q / np.maximum(q.sum(1, keepdims=True), 1e-12)
        mean = q.mean(0)
        if np.abs(mean - prior).max() < tol:
            break
        w = w * np.where(mean > 0, prior / np.maximum(mean, 1e-12), 0.0)
    return q.astype(np.asarray(probs).dtype, copy=False)


def labeled_prior(inp: RuleInputs, why: str) -> np.ndarray:
    """The labeled images' class counts (from the run's stage-1 calibration data)."""
    if inp.calibration is None:
        raise UserError(f"{why} needs the labeled class counts (the run's stage 1)")
    _, labels = inp.calibration()
    return np.bincount(labels, minlength=inp.num_classes).astype(np.float64)


@threshold_rule("quota")
def prior_quota(inp: RuleInputs) -> np.ndarray:
    """Per-class top-k with k aligned to the labeled class prior (``pseudo.quota`` x pool size)."""
    probs = _pool(inp, "quota")
    return quota_thresholds(probs, labeled_prior(inp, "pseudo-label rule 'quota'"), inp.settings.quota)


def freematch_thresholds(probs: np.ndarray) -> np.ndarray:
    tau = float(probs.max(1).mean())
    local = probs.mean(0)
    return tau * local / local.max()


@threshold_rule("freematch")
def freematch(inp: RuleInputs) -> np.ndarray:
    """FreeMatch's self-adaptive class thresholds over the pool (offline form)."""
    return freematch_thresholds(_pool(inp, "freematch"))


@threshold_rule("all")
def every_prediction(inp: RuleInputs) -> np.ndarray:
    """Every prediction of the pool (soft-target distillation)."""
    return np.zeros(inp.num_classes)
