"""Train one fold of a stage (stage 1 supervised, stage 3 retrain or EMA-Teacher) and the
stage-wide loop with resume: a fold with ``done.json`` is finished and is never retrained."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from semivit.data import transforms
from semivit.data.dataset import ArrayDataset
from semivit.trainer import distributed
from semivit.trainer.engine import UnlabeledPolicy, fit
from semivit.trainer.fold_workers import in_worker, train_parallel, worker_count
from semivit.trainer.losses import DistillationLoss, build_loss
from semivit.models.checkpoint import save_checkpoint
from semivit.models.networks import build_model
from semivit.pseudo.samples import Extra
from semivit.trainer.run import Run
from semivit.utils import atomic_write_json, info, read_json, seed_everything


@dataclass
class FoldSetup:
    """What :func:`train_fold` gets for one fold beyond the run's labeled data."""

    extra: Optional[Extra] = None  # extra training samples (pseudo-labels)
    init_state: Optional[dict] = None  # start from these weights (else the pre-trained backbone)
    make_policy: Optional[Callable[[torch.nn.Module], UnlabeledPolicy]] = None  # a semi-supervised term
    epochs: Optional[int] = None  # else train.epochs
    cfg: object = None  # the stage's own config when it differs from the run's


@dataclass
class FoldPlan:
    """How :func:`run_stage` trains each fold of a stage (a retrain strategy builds one)."""

    extra: Optional[Extra] = None  # the same extra samples for every fold
    per_fold: Optional[Callable[[int], FoldSetup]] = None  # fold k's own set-up, built only if fold k trains
    before_fold: Optional[Callable[[int], None]] = None  # called before fold k trains (refresh: stop check)

    def setup(self, k: int) -> FoldSetup:
        s = self.per_fold(k) if self.per_fold is not None else FoldSetup()
        if s.extra is None:
            s.extra = self.extra
        return s


def stage1_state(run: Run, k: int) -> dict:
    """The weights of stage-1 fold k's best model (a stage-3 student's starting point)."""
    from semivit.models.checkpoint import load_checkpoint

    model, _ = load_checkpoint(run.dir / "stage1" / f"fold{k}" / "best.pt")
    return {name: v.clone() for name, v in model.state_dict().items()}


def fold_seed(cfg, stage: str, k: int, distil_round: int = 1) -> int:
    """Fold k's seed.  Round 1 of stage 3 keeps stage 3's seeds whatever its directory (so with
    ``pseudo.rounds: 2`` its first round is the one-round run's stage 3); round r adds 20 (r-1)."""
    base = "stage3" if stage.startswith("stage3") else stage
    return cfg.seed * 1000 + {"stage1": 0, "stage3": 100}.get(base, 500) + 20 * (distil_round - 1) + k


def prepare_extra(run: Run, stage: str, k: int, extra: Optional[Extra], cfg=None) -> None:
    """What every fold of ``stage`` shares about its extra samples, computed once (by the first
    fold that trains, or by the parent before fold workers fork): their cached stem views (the
    frozen-stem hybrid) and, with ``pseudo.targets: view``, the teacher's targets on every view."""
    cfg = cfg if cfg is not None else run.cfg
    if run.stem is None or extra is None or not len(extra.images):
        return
    if extra.views is None:  # under torchrun: computed by rank 0, read by the others
        seed = fold_seed(cfg, stage, k, run.distil_round)
        extra.views = distributed.compute_once(
            run.dir / ".dist" / f"{stage}_extra_views.npy",
            lambda: run.augmented_views(extra.images, seed=seed + 50, what=f"{stage} unlabeled images"))
    if cfg.pseudo.targets == "view" and extra.labels.ndim == 2 and extra.view_labels is None:
        from semivit.trainer.methods import distil_rounds, teacher_stages
        from semivit.trainer.pipeline import view_targets

        teacher = teacher_stages(run.distil_round, distil_rounds(run.cfg))
        extra.view_labels = distributed.compute_once(
            run.dir / ".dist" / f"{stage}_view_targets.npy",
            lambda: view_targets(run, extra.views, teacher))


def train_fold(run: Run, stage: str, k: int, extra: Optional[Extra] = None,
               init_state: Optional[dict] = None,
               make_policy: Optional[Callable[[torch.nn.Module], UnlabeledPolicy]] = None,
               epochs: Optional[int] = None, cfg=None) -> dict:
    """Train fold ``k`` of ``stage``; writes best.pt, metrics.csv, val_probs.npy and done.json.
    ``cfg``: the stage's own config when it differs from the run's (the EMA-Teacher's
    ``ssl.ema.train``)."""
    cfg = cfg if cfg is not None else run.cfg
    out = run.stage_dir(stage, k)
    seed = fold_seed(cfg, stage, k, run.distil_round)  # a later distillation round: other seeds
    seed_everything(seed)
    tr = np.flatnonzero(run.folds != k)
    va = np.flatnonzero(run.folds == k)
    y = run.labeled.labels
    images, labels = run.images[tr], y[tr]
    weights = np.ones(len(tr), dtype=np.float32)
    n_cls = len(run.classes)
    if extra is not None and len(extra.images):
        if extra.labels.ndim == 2:  # soft pseudo-labels: make the labeled part one-hot too
            labels = np.eye(n_cls, dtype=np.float32)[labels]
        images = np.concatenate([images, extra.images])
        labels = np.concatenate([labels, extra.labels])
        weights = np.concatenate([weights, extra.weights.astype(np.float32)])
    # Class-balanced weights count the labeled part only: pseudo-labels must not re-balance.
    counts = np.bincount(y[tr], minlength=n_cls)
    criterion = build_loss(cfg.train, counts)
    if labels.ndim == 2 and cfg.pseudo.soft_loss == "ce":  # soft pseudo-labels: distil the teacher
        criterion = DistillationLoss(criterion)
    if run.stem is not None and make_policy is None:  # frozen stem: train on cached features
        from semivit.trainer.stem_cache import CachedViewsDataset, StemFeatures

        views = run.labeled_views[tr]
        if extra is not None and len(extra.images):
            prepare_extra(run, stage, k, extra, cfg)
            views = np.concatenate([views, extra.views])
            if cfg.pseudo.targets == "view" and labels.ndim == 2:  # the teacher on every view
                labeled = np.repeat(labels[:len(tr), None], views.shape[1], axis=1)  # one-hot in every view
                labels = np.concatenate([labeled, extra.view_labels])
        ds = CachedViewsDataset(views, labels, weights, generator=torch.Generator().manual_seed(seed))
        val_inputs = StemFeatures(run.labeled_views[va, 0])
    else:
        ds = ArrayDataset(images, labels, weights, transforms.build(cfg.train.augment, cfg.model.img_size, seed=seed))
        val_inputs = run.images[va]

    model = build_model(run.model_cfg_for(cfg), n_cls, pretrained=None if init_state is None else False)
    if init_state is not None:
        model.load_state_dict(init_state)
    policy = make_policy(model) if make_policy is not None else None

    def on_best(m, row):
        if not distributed.is_main():  # under torchrun rank 0 alone writes
            return
        save_checkpoint(out / "best.pt", m, cfg.model, run.classes, stage=stage, fold=k,
                        epoch=row["epoch"], val_macro_f1=row["val_macro_f1"], val_acc=row["val_acc"])

    share = cfg.pseudo.labeled_share if len(images) > len(tr) else None  # only with extra samples
    res = fit(model, ds, val_inputs, y[va], cfg, criterion, run.device, out_dir=out, policy=policy,
              desc=f"{stage} fold {k + 1}/{cfg.cv.folds}", seed=seed, epochs=epochs, on_best=on_best,
              mix=(len(tr), share) if share is not None else None)
    distributed.rank_log(f"{stage} fold {k + 1}/{cfg.cv.folds}: stopped after epoch {res.epochs_run} "
                         f"(best epoch {res.best_epoch}, val macro F1 {res.best_f1:.6f}, {res.steps} steps)")
    summary = {"stage": stage, "fold": k, "val_macro_f1": res.best_f1, "best_epoch": res.best_epoch,
               "epochs_run": res.epochs_run, "steps": res.steps, "stopped_early": res.stopped_early,
               "val_acc": res.history[res.best_epoch - 1]["val_acc"], "seconds": round(res.seconds, 1),
               "train_samples": int(len(images)), "extra_samples": int(len(images) - len(tr)),
               "val_samples": int(len(va)), "threads": res.threads, "fold_worker": in_worker(), "labeled_share": share,
               "labeled_draws": res.labeled_draws}
    if distributed.is_main():
        np.save(out / "val_probs.npy", res.val_probs)
        atomic_write_json(out / "done.json", summary)  # written last: marks the fold finished
    distributed.barrier()  # every rank sees this fold finished before the next one is looked at
    return summary


def run_stage(run: Run, stage: str, plan: Optional[FoldPlan] = None) -> list[dict]:
    """All folds of ``stage``; finished folds (done.json) are skipped, so a rerun resumes.

    ``plan`` says what each fold trains on and from where it starts (fold k's set-up is built
    only when fold k trains, so a finished fold costs nothing).
    """
    plan = plan or FoldPlan()
    done, todo = {}, []
    for k in range(run.cfg.cv.folds):
        path = run.stage_dir(stage, k) / "done.json"
        if path.is_file():
            done[k] = read_json(path)
            info(f"{stage} fold {k + 1}: already trained (val macro F1 {done[k]['val_macro_f1']:.3f})")
        else:
            todo.append(k)

    def launch(k: int):
        """Fold k's set-up, built when it starts: (the call that trains it, its epochs)."""
        if plan.before_fold is not None:
            plan.before_fold(k)
        f = plan.setup(k)
        # what the folds share, computed once here - with fold workers in the parent, before the
        # fork (a child's own computation would be repeated in every child and lost with it)
        if run.stem is not None and f.make_policy is None:
            _ = run.labeled_views
        prepare_extra(run, stage, k, f.extra, f.cfg)

        def train() -> dict:
            return train_fold(run, stage, k, extra=f.extra, init_state=f.init_state, make_policy=f.make_policy,
                              epochs=f.epochs, cfg=f.cfg)

        return train, f.epochs or (f.cfg if f.cfg is not None else run.cfg).train.epochs

    workers = worker_count(run.cfg, run.device, len(todo))
    if workers > 1:
        done.update(train_parallel(run, stage, todo, workers, launch))
    else:
        for k in todo:
            s = done[k] = launch(k)[0]()
            info(f"{stage} fold {k + 1}: val macro F1 {s['val_macro_f1']:.3f} at epoch {s['best_epoch']} "
                 f"({s['seconds']:.0f}s)")
    distributed.main_first(lambda: write_oof(run, stage))
    return [done[k] for k in range(run.cfg.cv.folds)]


def write_oof(run: Run, stage: str) -> Path:
    """Out-of-fold probabilities of ``stage`` for every labeled image: RUN/<stage>/oof.csv."""
    n_cls = len(run.classes)
    probs = np.zeros((len(run.labeled), n_cls), dtype=np.float32)
    for k in range(run.cfg.cv.folds):
        va = np.flatnonzero(run.folds == k)
        probs[va] = np.load(run.stage_dir(stage, k) / "val_probs.npy")
    path = run.dir / stage / "oof.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "fold", "pred"] + [f"p_{c}" for c in run.classes])
        for i in range(len(run.labeled)):
            w.writerow([run.labeled.rel(i), run.classes[run.labeled.labels[i]], int(run.folds[i]),
                        run.classes[int(probs[i].argmax())]] + [f"{p:.6f}" for p in probs[i]])
    np.save(run.dir / stage / "oof_probs.npy", probs)
    return path
