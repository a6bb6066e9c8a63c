"""``ssl train``: stage 0 (optional MAE) -> stage 1 -> stage 2 -> stage 3 -> ensemble -> report.

Every stage is resumable: folds with done.json and stages with their output files are kept, so
rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.models.ensemble import members_from_stages, write_ensemble
from semivit.models.networks import normalization
from semivit.pseudo.samples import Extra, pseudo_samples
from semivit.trainer.folds import run_stage
from semivit.trainer.run import STAGES, Run, open_run
from semivit.utils import info, read_json, seed_everything, warn


def parse_stages(stages: Optional[str], cfg) -> list[str]:
    if not stages:
        chosen = list(STAGES)
    else:
        chosen = [s.strip() for s in stages.split(",") if s.strip()]
        bad = [s for s in chosen if s not in STAGES]
        if bad:
            raise UserError(f"unknown stage '{bad[0]}' (choose from {','.join(STAGES)})")
    if cfg.pretrain.method == "none" and "pretrain" in chosen:
        if stages and "pretrain" in stages:
            raise UserError("--stages pretrain needs a pre-training method: --set pretrain.method=mae")
        chosen.remove("pretrain")
    if cfg.ssl.method == "ema-teacher" and "pseudo" in chosen:
        chosen.remove("pseudo")  # the EMA-Teacher pseudo-labels online, inside stage 3
    return [s for s in STAGES if s in chosen]


def _stage1_done(run: Run) -> bool:
    return all((run.dir / "stage1" / f"fold{k}" / "done.json").is_file() for k in range(run.cfg.cv.folds))


def pseudo_extra(run: Run) -> Extra:
    """The pseudo-labeled images of stage 2 as extra training samples (weights = confidence)."""
    from semivit.trainer.pseudo import read_pseudo_labels

    rows = read_pseudo_labels(run.dir / "pseudo" / "pseudo_labels.csv", run.classes)
    paths, images = run.unlabeled
    index = {run.rel(p): i for i, p in enumerate(paths)}
    rows = [r for r in rows if r["image"] in index]
    idx = np.asarray([index[r["image"]] for r in rows], dtype=np.int64)
    return pseudo_samples(images[idx], [r["label_index"] for r in rows], [r["confidence"] for r in rows],
                          [r["probs"] for r in rows], run.cfg.pseudo)


def _timed(run: Run, stage: str, fn, *args, **kwargs):
    t0 = time.time()
    out = fn(*args, **kwargs)
    run.log_time(stage, time.time() - t0)
    return out


def run_training(data: Optional[Path], out: Optional[Path], cfg, stages: Optional[str] = None) -> Run:
    """The whole pipeline; under torchrun one DistributedDataParallel run (see
    :mod:`semivit.trainer.distributed`): the trainings are shared out, rank 0 writes."""
    from semivit.trainer import distributed as dist

    chosen = parse_stages(stages, cfg)
    d = dist.setup(cfg.device)
    try:
        return _run_training(data, out, cfg, chosen, d)
    finally:
        dist.teardown()


def _run_training(data: Optional[Path], out: Optional[Path], cfg, chosen: list[str], d) -> Run:
    from semivit.trainer import distributed as dist

    if d.enabled:
        if out is None:
            raise UserError("under torchrun give --out RUN (every rank must write into the same run directory)")
        dist.check_same_config(dist.config_hash(cfg, Path(data).expanduser().resolve() if data else None, chosen))
    record = {"world_size": d.world_size, "backend": d.backend} if d.enabled else None
    run = dist.main_first(lambda: open_run(out, cfg, data, distributed=record))
    if not d.is_main:
        run = open_run(out, cfg, data, create=False)
    seed_everything(cfg.seed)
    t_all = time.time()
    info(f"run {run.dir}: {len(run.labeled)} labeled images in {len(run.classes)} classes "
         f"({', '.join(f'{c}={n}' for c, n in zip(run.classes, run.labeled.counts()))}); "
         f"stages {','.join(chosen)}; device {run.device}; preset {cfg.preset}"
         + (f"; torchrun: {d.world_size} ranks ({d.backend})" if d.enabled else ""))
    # folds.json before anything trains: rank 0 writes it, every other rank then reads the same file
    dist.main_first(lambda: run.folds)
    _ = run.folds

    if "pretrain" in chosen:
        if not (run.dir / "pretrain" / "encoder.pt").is_file():
            from semivit.trainer.mae import run_mae

            if d.enabled:
                info("pretrain: MAE runs on rank 0 (the other ranks wait)")
            dist.main_first(lambda: _timed(run, "pretrain", run_mae, run))
        else:
            info("pretrain: encoder.pt exists, reusing it")

    if "supervised" in chosen:
        _timed(run, "supervised", run_stage, run, "stage1")
        dist.main_first(lambda: _write_current_ensemble(run))

    if "pseudo" in chosen:
        if not _stage1_done(run):
            raise UserError("stage 'pseudo' needs a finished stage 1: run --stages supervised first")
        if (run.dir / "pseudo" / "stats.json").is_file():
            info("pseudo: pseudo_labels.csv exists, reusing it")
        else:
            from semivit.trainer.pseudo import run_pseudo

            dist.main_first(lambda: _timed(run, "pseudo", run_pseudo, run))  # inference: rank 0

    if "retrain" in chosen:
        if not _stage1_done(run):
            raise UserError("stage 'retrain' needs a finished stage 1: run --stages supervised first")
        if cfg.ssl.method == "ema-teacher":
            from semivit.trainer.ema_teacher import fold_kwargs

            _timed(run, "retrain", run_stage, run, "stage3", fold_kwargs(run))
        else:
            if not (run.dir / "pseudo" / "stats.json").is_file():
                raise UserError("stage 'retrain' needs pseudo-labels: run --stages pseudo first")
            extra = pseudo_extra(run)
            info(f"stage 3: {len(run.labeled)} labeled + {len(extra.labels)} pseudo-labeled images per fold pool")
            _timed(run, "retrain", run_stage, run, "stage3", lambda k: {"extra": extra})
        dist.main_first(lambda: _write_current_ensemble(run))

    from semivit.trainer.report import write_report

    dist.main_first(lambda: _timed(run, "report", write_report, run))
    if d.enabled and d.is_main:
        import shutil

        shutil.rmtree(run.dir / ".dist", ignore_errors=True)  # the shared stem-feature cache
    info(f"done in {time.time() - t_all:.0f}s: ensemble in {run.dir / 'ensemble.json'}, report in {run.dir / 'report.md'}")
    return run


def _write_current_ensemble(run: Run) -> dict:
    members = members_from_stages(run.dir, ["stage1", "stage3"])
    if not members:
        warn("no trained members yet: ensemble.json not written")
        return {}
    doc = write_ensemble(run.dir, members, run.classes, run.cfg.model.img_size, run.cfg.ensemble.weighting,
                         norm=normalization(run.cfg.model))
    info(f"ensemble: {len(members)} members, weights "
         + ", ".join(f"{m['name']}={m['weight']:.3f}" for m in doc["members"]))
    return doc


def stage_summary(run_dir: Path, stage: str) -> list[dict]:
    return [read_json(p) for p in sorted(Path(run_dir, stage).glob("fold*/done.json"))]
