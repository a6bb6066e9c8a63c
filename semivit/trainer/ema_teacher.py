"""Stage 3 as Semi-ViT's EMA-Teacher with probabilistic pseudo mixup (seed 05, sections 2-3).

One :class:`EMATeacherPolicy` plugs into the one training loop (:func:`engine.fit`):

- the teacher is an exponential moving average of the student,
  ``theta' = m * theta' + (1 - m) * theta`` after every optimiser step (buffers - BatchNorm
  statistics - are copied), and is the model validated, checkpointed and ensembled;
- each unlabeled image gives a weak view (to the teacher: pseudo-label ``y_i = argmax p``,
  confidence ``o_i = max p``) and a strong view (to the student);
- probabilistic pseudo mixup pairs sample i with j = N-1-i and mixes the strong views with
  ``lambda_i = o_i / (o_i + o_j)``; the mixed confidence is ``o*_i = max(o_i, o_j)`` and the
  sample counts when ``o*_i >= threshold``.  Each element is mixed by mixup or by CutMix (one of
  the two at random when both ``ssl.mixup_alpha`` and ``ssl.cutmix_alpha`` are > 0); CutMix
  pastes a box of area ~ (1 - lambda_i), clipped at the border, and lambda_i is then corrected to
  1 - (clipped box area) / (image area).  With ``ssl.prob_mixup: false`` and an alpha > 0 it is
  the paper's plain "pseudo mixup" (lambda ~ Beta(alpha, alpha), mask o_i >= threshold); with
  both alphas 0 it is the plain EMA-Teacher;
- ``ssl.threshold_mode: oof`` replaces the one threshold by one per class, calibrated like the
  pseudo-label stage's on stage-1 out-of-fold predictions (a class whose confident predictions
  never reach ``pseudo.target_precision`` gets none); a mixed pair then counts when either
  member passes its class's threshold - with one threshold for all classes that is equation (5);
- the unlabeled loss is ``ssl.ema.unlabeled_loss`` (the paper's: cross-entropy with label
  smoothing 0.1, no class weights) on the soft mixed pseudo-targets, averaged over all N_u
  images, ``L_u = 1/N_u sum_i [o*_i >= tau] * loss(x~_i, y~_i)``; the total is ``L_l + mu * L_u``;
- the stage trains with ``train.*`` overridden by ``ssl.ema.train`` (the paper's Table 13:
  CE + label smoothing, mixup/CutMix on the labeled side, AdamW wd 0.05, layer-wise LR decay
  0.75, warm-up, one cosine decay, a fixed number of epochs);
- a batch holds ``N_u = ssl.unlabeled_ratio * N_l`` unlabeled images and the unlabeled loader
  drives the epoch (the labeled loader cycles).

Semi-supervised fine-tuning starts from the supervised fine-tuned model: fold k's student and
teacher start from stage-1 fold k's best checkpoint (the paper's pipeline, Table 6).
"""

from __future__ import annotations

import copy
from typing import Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from semivit.data import transforms
from semivit.data.dataset import ArrayDataset, Preprocess
from semivit.trainer.engine import UnlabeledPolicy
from semivit.trainer.losses import FocalLoss, build_loss
from semivit.utils import info, warn


# ----------------------------------------------------------------------------- EMA
@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta' <- m * theta' + (1 - m) * theta`` for parameters; buffers are copied."""
    s_params = dict(student.named_parameters())
    for name, t in teacher.named_parameters():
        t.mul_(momentum).add_(s_params[name].detach().to(t.dtype), alpha=1.0 - momentum)
    s_bufs = dict(student.named_buffers())
    for name, b in teacher.named_buffers():
        b.copy_(s_bufs[name])


# ----------------------------------------------------------------------------- pseudo mixup
def pair_index(n: int) -> torch.Tensor:
    """Partner j of each sample i: the flipped batch (j = n-1-i), as timm's element mixup."""
    return torch.arange(n - 1, -1, -1)


def prob_mix_params(conf: torch.Tensor, j: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Equations (4) and (5): ``lambda_i = o_i / (o_i + o_j)`` and ``o*_i = max(o_i, o_j)``."""
    oj = conf[j]
    return conf / (conf + oj).clamp_min(1e-12), torch.maximum(conf, oj)


def pseudo_mask(conf: torch.Tensor, pseudo: torch.Tensor, thresholds: torch.Tensor,
                j: Optional[torch.Tensor] = None) -> torch.Tensor:
    """1 where a sample's loss counts.  Sample i passes when ``o_i >= tau[y_i]`` (one threshold
    per class; a global threshold is the same number for every class).  After probabilistic
    pseudo mixup with partner j it counts when either passes - with a global tau exactly
    ``o*_i = max(o_i, o_j) >= tau`` (equation 5)."""
    passes = conf >= thresholds.to(conf.device)[pseudo]
    if j is not None:
        passes = passes | passes[j]
    return passes.float()


def mix_batch(x: torch.Tensor, lam: torch.Tensor, j: torch.Tensor,
              use_cutmix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mix each x_i with x_j: mixup ``lam_i x_i + (1 - lam_i) x_j`` or CutMix (a box of x_j of
    area ~ (1 - lam_i) pasted into x_i, timm's box).  Returns (mixed x, effective lambda): for
    CutMix the lambda corrected by the clipped box, 1 - (pasted area) / (image area)."""
    from timm.data.mixup import cutmix_bbox_and_lam

    src = x.clone()
    out = x.clone()
    lam_eff = lam.detach().cpu().float().clone()
    for i in range(len(x)):
        li, k = float(lam_eff[i]), int(j[i])
        if k == i or li >= 1.0:
            continue
        if bool(use_cutmix[i]):
            (yl, yh, xl, xh), li = cutmix_bbox_and_lam(x[i].shape, li, correct_lam=True)
            out[i, :, yl:yh, xl:xh] = src[k, :, yl:yh, xl:xh]
            lam_eff[i] = li
        else:
            out[i] = src[i] * li + src[k] * (1.0 - li)
    return out, lam_eff.to(lam.device)


def mixed_targets(labels: torch.Tensor, lam: torch.Tensor, j: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``y~_i = lam_i onehot(y_i) + (1 - lam_i) onehot(y_j)``."""
    y = torch.nn.functional.one_hot(labels.long(), num_classes).float()
    lam = lam.float().unsqueeze(1).to(y.device)
    return lam * y + (1.0 - lam) * y[j]


def choose_modes(n: int, mixup: bool, cutmix: bool, rng: np.random.Generator) -> torch.Tensor:
    """Per element: True = CutMix, False = mixup (half and half when both are enabled)."""
    if mixup and cutmix:
        return torch.from_numpy(rng.random(n) < 0.5)
    return torch.full((n,), bool(cutmix and not mixup))


# ----------------------------------------------------------------------------- the policy
class EMATeacherPolicy(UnlabeledPolicy):
    def __init__(self, student: nn.Module, unlabeled: np.ndarray, cfg, criterion: FocalLoss,
                 device: torch.device, seed: int = 0, thresholds: Optional[np.ndarray] = None):
        self.cfg = cfg
        self.scfg = cfg.ssl
        if thresholds is None:
            thresholds = np.full(student.num_classes, cfg.ssl.threshold)
        self.thresholds = torch.as_tensor(np.asarray(thresholds, dtype=np.float32))  # per class, inf = never
        self.criterion = criterion.to(device)
        self.device = device
        self.teacher = copy.deepcopy(student).to(device)
        self.teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.images = unlabeled
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.num_classes = student.num_classes
        self._reset_stats()

    # -- the loop's hooks
    def loader(self) -> Optional[DataLoader]:
        if len(self.images) == 0:
            warn("EMA-Teacher: no unlabeled images; stage 3 trains on the labeled data only")
            return None
        size = self.cfg.model.img_size
        # seeded: unseeded, albumentations draws from the OS and the run is not reproducible
        views = [transforms.build(self.scfg.weak_augment, size, seed=self.seed + 1),
                 transforms.build(self.scfg.strong_augment, size, seed=self.seed + 2)]
        ds = ArrayDataset(self.images, transform=views)
        bs = self.scfg.unlabeled_ratio * self.cfg.train.batch_size
        g = torch.Generator().manual_seed(self.seed)
        from semivit.trainer import distributed

        sampler = distributed.sampler(ds, True, self.seed)  # this rank's share under torchrun
        world = distributed.current().world_size
        return DataLoader(ds, batch_size=bs, shuffle=sampler is None, sampler=sampler,
                          generator=g if sampler is None else None, drop_last=len(ds) // world >= bs,
                          num_workers=self.cfg.train.num_workers,
                          persistent_workers=self.cfg.train.num_workers > 0)

    def loss(self, student: nn.Module, ubatch, pre: Preprocess, step: int) -> torch.Tensor:
        (xw, xs), _, _, _ = ubatch
        xw = pre(xw.to(self.device, non_blocking=True))
        xs = pre(xs.to(self.device, non_blocking=True))
        with torch.no_grad():
            probs = torch.softmax(self.teacher(xw).float(), dim=1)
        conf, pseudo = probs.max(dim=1)
        n = len(xs)
        j = pair_index(n).to(conf.device)
        mixup_on, cutmix_on = self.scfg.mixup_alpha > 0, self.scfg.cutmix_alpha > 0
        if mixup_on or cutmix_on:
            modes = choose_modes(n, mixup_on, cutmix_on, self.rng)
            if self.scfg.prob_mixup:
                lam, _ = prob_mix_params(conf, j)
                mask = pseudo_mask(conf, pseudo, self.thresholds, j)
            else:  # plain pseudo mixup: lambda ~ Beta(alpha, alpha), mask on the sample's own confidence
                alpha = np.where(modes.numpy(), self.scfg.cutmix_alpha, self.scfg.mixup_alpha)
                alpha = np.maximum(alpha, 1e-6)
                lam = torch.from_numpy(self.rng.beta(alpha, alpha).astype(np.float32)).to(conf.device)
                mask = pseudo_mask(conf, pseudo, self.thresholds)
            xs, lam = mix_batch(xs, lam, j, modes)
        else:
            lam, mask = torch.ones_like(conf), pseudo_mask(conf, pseudo, self.thresholds)
        target = mixed_targets(pseudo, lam, j, self.num_classes)
        logits = student(xs)
        per_sample = self.criterion.per_sample(logits.float(), target)
        loss_u = (per_sample * mask).sum() / n  # 1/N_u sum_i [o*_i >= tau] loss_i  (equation 2)
        self._acc["loss_u"] += float(loss_u.detach())
        self._acc["mask"] += float(mask.mean())
        self._acc["conf"] += float(conf.mean())
        self._acc["n"] += 1
        return self.scfg.unlabeled_weight * loss_u

    def after_step(self, student: nn.Module) -> None:
        ema_update(self.teacher, student, self.scfg.ema_momentum)

    def eval_model(self, student: nn.Module) -> nn.Module:
        return self.teacher

    def stats(self) -> dict:
        n = max(self._acc["n"], 1)
        out = {"u_loss": round(self._acc["loss_u"] / n, 6), "u_mask_rate": round(self._acc["mask"] / n, 4),
               "u_teacher_conf": round(self._acc["conf"] / n, 4)}
        self._reset_stats()
        return out

    def _reset_stats(self) -> None:
        self._acc = {"loss_u": 0.0, "mask": 0.0, "conf": 0.0, "n": 0}


# ----------------------------------------------------------------------------- stage 3 wiring
def fold_plan(run):
    """Stage 3's :class:`~semivit.trainer.folds.FoldPlan`: fold k's student and teacher start from
    stage-1 fold k's best model, with the EMA policy; ``ssl.ema.train`` over ``train``."""
    from semivit.config import ssl_train_config
    from semivit.trainer.folds import FoldPlan, FoldSetup, fold_seed, stage1_state

    cfg = run.cfg.model_copy(update={"train": ssl_train_config(run.cfg)})  # ssl.ema.train on top

    def setup(k: int) -> FoldSetup:
        init_state = stage1_state(run, k)
        counts = np.bincount(run.labeled.labels[run.folds != k], minlength=len(run.classes))
        unlabeled = run.unlabeled[1]
        thresholds = fold_thresholds(run, k)

        def make_policy(student: nn.Module) -> EMATeacherPolicy:
            return EMATeacherPolicy(student, unlabeled, cfg, build_loss(cfg.ssl.ema.unlabeled_loss, counts),
                                    run.device, seed=fold_seed(cfg, "stage3", k), thresholds=thresholds)

        return FoldSetup(init_state=init_state, make_policy=make_policy, epochs=cfg.ssl.epochs, cfg=cfg)

    return FoldPlan(per_fold=setup)


def fold_thresholds(run, k: int) -> np.ndarray:
    """Per-class pseudo-label thresholds of fold k by the rule ``ssl.threshold_mode`` (the
    registry of semivit.pseudo.rules): ``global`` = ``ssl.threshold`` for every class; ``oof`` =
    calibrated on the stage-1 out-of-fold predictions of the *other* folds (each made by a single
    model that did not train on the image, as the teacher's are; fold k's validation labels are
    not used).  ``inf``: the class gets no pseudo-labels.  The teacher labels online, so a rule
    gets no pool predictions here."""
    from semivit.pseudo.rules import RuleInputs, class_thresholds

    cfg = run.cfg
    mode = cfg.ssl.threshold_mode
    other = run.folds != k

    def calibration():
        return np.load(run.dir / "stage1" / "oof_probs.npy")[other], run.labeled.labels[other]

    thr = class_thresholds(mode, RuleInputs(len(run.classes), cfg.ssl.threshold, cfg.pseudo, None, calibration))
    if mode != "global":
        info(f"stage3 fold {k + 1}: EMA-Teacher per-class thresholds ({mode} rule"
             + (f", out-of-fold precision >= {cfg.pseudo.target_precision}" if mode == "oof" else "") + "): "
             + ", ".join(f"{c} {t:.3f}" if np.isfinite(t) else f"{c} none" for c, t in zip(run.classes, thr)))
    return thr
