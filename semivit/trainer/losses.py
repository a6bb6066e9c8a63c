"""Losses: focal loss with class-balanced weights and per-sample weights; weighted CE.

Written here rather than taken from a library because none of the maintained ones (timm,
torchvision.ops.sigmoid_focal_loss) covers softmax focal loss *with* soft targets, class
weights and per-sample confidence weights together, which stage 3 needs.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def class_balanced_weights(counts: Sequence[int], beta: float = 0.9999) -> np.ndarray:
    """Cui et al. 2019, "Class-Balanced Loss Based on Effective Number of Samples".

    effective number E_c = (1 - beta^n_c) / (1 - beta); weight w_c = 1 / E_c, normalised so the
    weights sum to the number of classes.  A class with no samples gets weight 0.
    """
    counts = np.asarray(counts, dtype=np.float64)
    effective = (1.0 - np.power(beta, counts)) / (1.0 - beta)
    w = np.where(counts > 0, 1.0 / np.maximum(effective, 1e-12), 0.0)
    return w / w.sum() * np.count_nonzero(counts)


class FocalLoss(nn.Module):
    """Softmax focal loss  -sum_c alpha_c * t_c * (1 - p_c)^gamma * log p_c  per sample.

    ``target``: class indices (N,) or soft/probability targets (N, C).  ``sample_weight`` (N,)
    scales each sample's loss (pseudo-label confidence).  The batch loss is the mean over N.
    gamma = 0 and no class weights give exactly cross-entropy.
    """

    def __init__(self, gamma: float = 2.0, class_weights: Optional[torch.Tensor] = None,
                 label_smoothing: float = 0.0):
        super().__init__()
        self.gamma = gamma
        self.label_smoothing = label_smoothing
        self.register_buffer("class_weights", None if class_weights is None
                             else torch.as_tensor(class_weights, dtype=torch.float32))

    def per_sample(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        n_cls = logits.shape[1]
        if target.ndim == 1:
            target = F.one_hot(target.long(), n_cls).float()
        if self.label_smoothing:
            target = target * (1 - self.label_smoothing) + self.label_smoothing / n_cls
        logp = F.log_softmax(logits, dim=1)
        term = -target * logp
        if self.gamma:
            term = term * (1.0 - logp.exp()).clamp_min(0).pow(self.gamma)
        if self.class_weights is not None:
            term = term * self.class_weights.to(term.device)
        return term.sum(dim=1)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        loss = self.per_sample(logits, target)
        if sample_weight is not None:
            loss = loss * sample_weight.to(loss.device, loss.dtype)
        return loss.mean()


class DistillationLoss(nn.Module):
    """Labeled rows (one-hot targets) get ``hard`` - the configured focal loss with class
    weights; rows with soft targets (the teacher ensemble's probabilities) get plain
    cross-entropy to that distribution, without the focal factor and the class weights.

    With them, the minimum of the soft rows' loss is not at the teacher's distribution (focal
    loss is no proper scoring rule for soft targets: (1 - p)^gamma pulls the optimum away from
    p = t, and class weights re-balance a teacher that a class-balanced loss already balanced),
    so the student would learn a distorted teacher.
    """

    def __init__(self, hard: FocalLoss):
        super().__init__()
        self.hard = hard

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                sample_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        if target.ndim == 1:
            return self.hard(logits, target, sample_weight)
        logits = logits.float()
        one_hot = target.max(dim=1).values >= 1.0 - 1e-6
        soft = -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
        loss = torch.where(one_hot, self.hard.per_sample(logits, target), soft)
        if sample_weight is not None:
            loss = loss * sample_weight.to(loss.device, loss.dtype)
        return loss.mean()


def build_loss(train_cfg, counts: Sequence[int]) -> FocalLoss:
    """``train.loss``: focal (gamma from config) or ce (= focal with gamma 0), both class-weighted
    by effective number when ``train.class_balance_beta`` is set."""
    weights = None
    if train_cfg.class_balance_beta is not None:
        weights = torch.tensor(class_balanced_weights(counts, train_cfg.class_balance_beta), dtype=torch.float32)
    gamma = train_cfg.focal_gamma if train_cfg.loss == "focal" else 0.0
    return FocalLoss(gamma=gamma, class_weights=weights, label_smoothing=train_cfg.label_smoothing)
