"""The one training loop.  Stage 1, stage 3 and the EMA-Teacher all run through :func:`fit`.

Semi-supervised methods plug in as an :class:`UnlabeledPolicy` (USB style): the policy owns
the unlabeled loader (which then drives the epoch), adds its loss term, updates its state after
each optimiser step (EMA teacher) and names the model that is validated and checkpointed.
"""

from __future__ import annotations

import copy
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from sklearn.metrics import accuracy_score
from torch import nn
from torch.utils.data import DataLoader, WeightedRandomSampler

from semivit.data.dataset import ArrayDataset, Preprocess
from semivit.metrics import macro_f1
from semivit.models.networks import features_input
from semivit.progress import progress_bar
from semivit.trainer import distributed
from semivit.trainer.infer import autocast, predict_arrays
from semivit.trainer.losses import FocalLoss
from semivit.trainer.optim import OptimizerStep, build_optimizer, build_scheduler
from semivit.utils import atomic_write_csv
from semivit.trainer.stem_cache import CachedViewsDataset
from semivit.trainer.threads import governor_for_training


class EarlyStopping:
    """Stop when the metric has not improved by ``min_delta`` for ``patience`` epochs."""

    def __init__(self, patience: int = 5, min_delta: float = 0.001):
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf
        self.bad_epochs = 0

    def step(self, value: float) -> tuple[bool, bool]:
        """Returns (improved, stop)."""
        if value > self.best + self.min_delta:
            self.best, self.bad_epochs = value, 0
            return True, False
        self.bad_epochs += 1
        return False, self.bad_epochs >= self.patience


class UnlabeledPolicy:
    """Base class for a semi-supervised term in the loop (see module docstring)."""

    def loader(self) -> Optional[Iterable]:
        return None

    def loss(self, student: nn.Module, batch, pre: Preprocess, step: int) -> torch.Tensor:
        raise NotImplementedError

    def after_step(self, student: nn.Module) -> None:
        pass

    def eval_model(self, student: nn.Module) -> nn.Module:
        return student

    def stats(self) -> dict:
        return {}


@dataclass
class FitResult:
    best_f1: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)
    val_probs: Optional[np.ndarray] = None  # at the best epoch
    best_state: Optional[dict] = None
    seconds: float = 0.0
    steps: int = 0  # optimiser steps taken (compute-matched benchmark arms compare these)
    threads: Optional[dict] = None  # CPU: the thread governor's choice, probes and switches
    labeled_draws: Optional[float] = None  # with ``mix``: the share of drawn samples that were labeled


def draw_weights(n_labeled: int, n_extra: int, labeled_share: float,
                 within: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-sample draw probabilities for a dataset of ``n_labeled`` labeled rows followed by
    ``n_extra`` extra (pseudo-labeled) rows, so that a draw is labeled with probability
    ``labeled_share`` (FixMatch's separate labeled batch, as a sampler over one dataset).
    ``within``: relative weights inside each part (the balanced sampler's), else uniform."""
    w = np.ones(n_labeled + n_extra) if within is None else np.asarray(within, dtype=np.float64)
    parts = [(slice(0, n_labeled), labeled_share), (slice(n_labeled, n_labeled + n_extra), 1.0 - labeled_share)]
    out = np.zeros(len(w))
    for part, share in parts:
        total = w[part].sum()
        if total > 0:
            out[part] = share * w[part] / total
    return out / out.sum()


def _labeled_loader(ds: ArrayDataset, train_cfg, seed: int, mix: Optional[tuple[int, float]] = None) -> DataLoader:
    """Shuffled (or class-balanced) batches; under torchrun this rank's share of them.  ``mix``
    = (labeled rows at the start of ``ds``, their share of every draw): drawn with replacement,
    an epoch as long as ``ds``."""
    g = torch.Generator().manual_seed(seed)
    world = distributed.current().world_size
    drop_last = len(ds) // world > train_cfg.batch_size  # BatchNorm in the head needs > 1 sample
    if train_cfg.sampler == "balanced" or mix is not None:
        from sklearn.utils.class_weight import compute_sample_weight

        labels = ds.labels if ds.labels.ndim == 1 else ds.labels.reshape(len(ds), -1, ds.labels.shape[-1])[:, 0].argmax(1)
        w = compute_sample_weight("balanced", labels) if train_cfg.sampler == "balanced" else None
        if mix is not None:
            w = draw_weights(mix[0], len(ds) - mix[0], mix[1], within=w)
        sampler = distributed.sampler(ds, True, seed, weights=w) or WeightedRandomSampler(
            torch.as_tensor(w, dtype=torch.double), len(ds), generator=g)
        return DataLoader(ds, batch_size=train_cfg.batch_size, sampler=sampler, drop_last=drop_last,
                          num_workers=train_cfg.num_workers)
    sampler = distributed.sampler(ds, True, seed)  # DistributedSampler under torchrun, else None
    return DataLoader(ds, batch_size=train_cfg.batch_size, shuffle=sampler is None, sampler=sampler,
                      generator=g if sampler is None else None, drop_last=drop_last,
                      num_workers=train_cfg.num_workers, persistent_workers=train_cfg.num_workers > 0)


def _set_epoch(loader, epoch: int) -> None:
    """A distributed sampler reshuffles per epoch only when told the epoch."""
    s = getattr(loader, "sampler", None)
    if hasattr(s, "set_epoch"):
        s.set_epoch(epoch)


def _validate(model: nn.Module, val_images, batch_size: int, device, precision: str) -> np.ndarray:
    """Validation probabilities for every image; under torchrun each rank predicts its share and
    the shares are all-reduced, so every rank holds the same full array (and takes the same
    early-stopping and checkpoint decisions)."""
    if not distributed.current().enabled:
        return predict_arrays(model, val_images, batch_size=batch_size, device=device, precision=precision)
    idx = distributed.shard_indices(len(val_images))
    full = np.zeros((len(val_images), model.num_classes), dtype=np.float32)
    if len(idx):
        full[idx] = predict_arrays(model, val_images[idx], batch_size=batch_size, device=device,
                                   precision=precision)
    return distributed.all_reduce_rows(full)


def _mixer(train_cfg, num_classes: int):
    if train_cfg.mixup_alpha <= 0 and train_cfg.cutmix_alpha <= 0:
        return None
    from timm.data import Mixup

    return Mixup(mixup_alpha=train_cfg.mixup_alpha, cutmix_alpha=train_cfg.cutmix_alpha,
                 prob=train_cfg.mix_prob, label_smoothing=0.0, num_classes=num_classes)


def mix_soft(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, alpha: float, prob: float = 1.0,
             rng: Optional[np.random.Generator] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mixup for probability targets (rows of ``y`` sum to 1): one lam ~ Beta(alpha, alpha) per
    batch, example i mixed with N-1-i (timm's pairing), inputs, targets and sample weights alike.

    Written here because timm's ``Mixup`` one-hot encodes integer targets: a soft target (the
    teacher ensemble's probabilities, stage 3's default) needs the convex combination of the
    probability vectors themselves."""
    r = rng if rng is not None else np.random
    if alpha <= 0 or len(x) < 2 or r.random() >= prob:
        return x, y, w
    lam = float(r.beta(alpha, alpha))
    return (lam * x + (1 - lam) * x.flip(0), lam * y + (1 - lam) * y.flip(0), lam * w + (1 - lam) * w.flip(0))


def _forever(loader: Iterable):
    """Re-iterate ``loader`` without end: fresh shuffling and augmentation on every pass
    (``itertools.cycle`` would replay the first pass's cached batches)."""
    while True:
        yield from loader


def fit(model: nn.Module, train_ds: ArrayDataset, val_images: np.ndarray, val_labels: np.ndarray,
        cfg, criterion: FocalLoss, device: torch.device, out_dir: Optional[Path] = None,
        policy: Optional[UnlabeledPolicy] = None, desc: str = "train", seed: int = 0,
        epochs: Optional[int] = None, on_best: Optional[Callable[[nn.Module, dict], None]] = None,
        mix: Optional[tuple[int, float]] = None) -> FitResult:
    """Train ``model``; validate macro F1 every epoch; keep the best; stop early.

    ``train_ds`` yields uint8 images, or cached frozen-stem features (a
    :class:`~semivit.trainer.stem_cache.CachedViewsDataset`; ``val_images`` then is
    :class:`~semivit.trainer.stem_cache.StemFeatures`).
    ``on_best(model, row)`` is called when validation macro F1 improves (checkpointing).
    ``out_dir`` gets metrics.csv, rewritten after every epoch.
    ``mix`` = (n, share): the first n rows of ``train_ds`` are the labeled ones and make ``share``
    of every batch on average (``pseudo.labeled_share``; :func:`draw_weights`).
    """
    tcfg = cfg.train
    epochs = epochs or tcfg.epochs
    num_classes = model.num_classes
    model.to(device)
    criterion.to(device)
    pre = Preprocess.for_model(model).to(device)
    cached = isinstance(train_ds, CachedViewsDataset)
    loader = _labeled_loader(train_ds, tcfg, seed, mix)
    u_loader = policy.loader() if policy is not None else None
    steps = len(u_loader) if u_loader is not None else len(loader)
    mixer = _mixer(tcfg, num_classes)
    stopper = EarlyStopping(tcfg.patience, tcfg.min_delta)

    trainable = [p for p in model.backbone.parameters() if p.requires_grad]  # a frozen stem stays frozen

    def set_frozen(frozen: bool):
        for p in trainable:
            p.requires_grad_(not frozen)

    freeze = min(tcfg.freeze_epochs, epochs - 1) if tcfg.freeze_epochs else 0
    set_frozen(freeze > 0)
    net = distributed.wrap(model, device)  # DDP under torchrun (the parameters that train now)
    optimizer = build_optimizer(model, tcfg, lr=tcfg.freeze_lr if freeze else None)
    scheduler = build_scheduler(optimizer, tcfg, steps, epochs)
    optimizer_step = OptimizerStep(optimizer, device, tcfg.precision, tcfg.grad_clip, scheduler)

    result = FitResult(best_f1=-1.0, best_epoch=-1, epochs_run=0, stopped_early=False)
    governor = governor_for_training(device)  # CPU: threads chosen by measurement (contention)
    t_start = time.time()
    step = 0
    n_labeled_drawn, n_drawn = 0, 0
    with progress_bar() as bar:
        task = bar.add_task(desc, total=epochs * steps, status="")
        for epoch in range(epochs):
            if freeze and epoch == freeze:  # unfreeze: full model, differential LR, fresh schedule
                set_frozen(False)
                net = distributed.wrap(model, device)  # DDP again: now over every parameter
                optimizer = build_optimizer(model, tcfg)
                scheduler = build_scheduler(optimizer, tcfg, steps, epochs - freeze)
                optimizer_step.optimizer, optimizer_step.scheduler = optimizer, scheduler
            model.train()
            t0 = time.time()
            total, seen = 0.0, 0
            _set_epoch(loader, epoch)
            _set_epoch(u_loader, epoch)
            lab_iter = _forever(loader) if u_loader is not None else iter(loader)
            u_iter = iter(u_loader) if u_loader is not None else itertools.repeat(None)
            if governor is not None:
                governor.start()
            for _ in range(steps):
                x, y, w, idx = next(lab_iter)
                if mix is not None:
                    n_labeled_drawn += int((idx < mix[0]).sum())
                ubatch = next(u_iter)
                x = x.to(device, non_blocking=True)
                x, y, w = (pre(x) if x.dtype == torch.uint8 else x), y.to(device), w.to(device)
                if mixer is not None and len(x) % 2 == 0 and y.ndim == 1:
                    x, y = mixer(x, y)  # timm Mixup/CutMix pairs i with N-1-i
                    w = 0.5 * (w + w.flip(0))
                elif y.ndim == 2 and tcfg.mixup_alpha > 0:  # soft targets (stage 3): mixup only
                    x, y, w = mix_soft(x, y, w, tcfg.mixup_alpha, tcfg.mix_prob)
                with autocast(device, tcfg.precision), features_input(model, cached):
                    logits = net(x)
                loss = criterion(logits.float(), y, w)
                if policy is not None and ubatch is not None:
                    with autocast(device, tcfg.precision):
                        loss = loss + policy.loss(model, ubatch, pre, step)
                optimizer_step(loss, model)
                if policy is not None:
                    policy.after_step(model)
                step += 1
                total += float(loss.detach()) * len(x)
                seen += len(x)
                n_drawn += len(x)
                if governor is not None:
                    governor.step(len(x))
                busy = "" if governor is None or governor.current == governor.choices[0] else \
                    f"  {governor.current} thread (CPU contention)"
                bar.update(task, advance=1,
                           status=f"loss {total / max(seen, 1):.4f}  best F1 {max(result.best_f1, 0):.3f}{busy}")

            eval_model = policy.eval_model(model) if policy is not None else model
            probs = _validate(eval_model, val_images, max(64, tcfg.batch_size), device, tcfg.precision)
            pred = probs.argmax(1)
            f1 = macro_f1(val_labels, pred, num_classes)
            with torch.no_grad():
                vloss = float(criterion(torch.log(torch.from_numpy(probs).clamp_min(1e-8)),
                                        torch.from_numpy(val_labels))) if len(val_labels) else float("nan")
            row = {"epoch": epoch + 1, "train_loss": round(total / max(seen, 1), 6), "val_loss": round(vloss, 6),
                   "val_macro_f1": round(f1, 6), "val_acc": round(float(accuracy_score(val_labels, pred)), 6),
                   "lr": optimizer.param_groups[-1]["lr"], "seconds": round(time.time() - t0, 2)}
            if policy is not None:
                row.update(policy.stats())
            result.history.append(row)
            result.epochs_run = epoch + 1
            improved, stop = stopper.step(f1)
            if improved:
                result.best_f1, result.best_epoch, result.val_probs = f1, epoch + 1, probs
                result.best_state = copy.deepcopy({k: v.detach().cpu() for k, v in eval_model.state_dict().items()})
                if on_best is not None:
                    on_best(eval_model, row)
            if out_dir is not None and distributed.is_main():
                atomic_write_csv(Path(out_dir) / "metrics.csv", result.history)
            bar.update(task, status=f"epoch {epoch + 1}: F1 {f1:.3f} (best {result.best_f1:.3f} @ {result.best_epoch})")
            if stop and tcfg.early_stopping and epoch + 1 < epochs:
                result.stopped_early = True
                bar.update(task, completed=epochs * steps, status=f"early stop at epoch {epoch + 1}; best F1 {result.best_f1:.3f}")
                break
    result.seconds = time.time() - t_start
    result.steps = step
    result.threads = governor.summary() if governor is not None else None
    if mix is not None:
        result.labeled_draws = round(n_labeled_drawn / max(n_drawn, 1), 4)
    return result
