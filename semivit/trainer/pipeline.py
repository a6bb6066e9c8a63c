"""``ssl train``: the registered stages (semivit.trainer.stages: pretrain -> supervised ->
pseudo -> retrain, each with its ensemble) in order, then the report.

Every stage is resumable: folds with done.json and stages with their output files are kept, so
rerunning the same command after an interruption continues where it stopped.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.pseudo.samples import Extra, pseudo_samples
from semivit.trainer.run import Run, open_run
from semivit.trainer.stages import get_stage, stage_names
from semivit.utils import info, read_json, seed_everything, warn


def parse_stages(stages: Optional[str], cfg) -> list[str]:
    """``--stages a,b`` -> the stages to run, in registry order, without those this config lacks."""
    names = stage_names()
    chosen = [s.strip() for s in stages.split(",") if s.strip()] if stages else list(names)
    bad = [s for s in chosen if s not in names]
    if bad:
        raise UserError(f"unknown stage '{bad[0]}' (choose from {','.join(names)})")
    explicit = set(chosen) if stages else set()
    for name in list(chosen):
        st = get_stage(name)
        if not st.applies(cfg):
            if name in explicit and st.not_applicable:
                raise UserError(st.not_applicable)
            chosen.remove(name)  # e.g. the EMA-Teacher pseudo-labels online, inside stage 3
    return [s for s in names if s in chosen]


def run_stages(run: Run, chosen: list[str], check_needs: bool = True) -> dict[str, float]:
    """Run the stages ``chosen`` (registry order) on ``run``; seconds per stage that ran."""
    from semivit.trainer import distributed as dist

    seconds = {}
    for name in chosen:
        st = get_stage(name)
        if check_needs:
            for need in st.needs(run.cfg):
                dep = get_stage(need)
                if not dep.is_done(run):
                    raise UserError(f"stage '{name}' needs {dep.output}: run --stages {need} first")
        if st.reuse and st.is_done(run):
            info(st.reuse)
            continue

        def timed(st=st):
            t0 = time.time()
            st.run(run)
            seconds[st.name] = time.time() - t0
            run.log_time(st.name, seconds[st.name])

        dist.main_first(timed) if st.rank0 else timed()
    return seconds


def write_run_report(run: Run, best_effort: bool = False) -> None:
    """RUN/report.md (rank 0 under torchrun); ``best_effort``: a failure is a warning (the report
    documents the model, it does not serve it)."""
    from semivit.trainer import distributed as dist
    from semivit.trainer.report import write_report

    def report():
        t0 = time.time()
        try:
            write_report(run)
        except Exception as e:  # noqa: BLE001
            if not best_effort:
                raise
            warn(f"report for {run.dir} not written: {type(e).__name__}: {e}")
        run.log_time("report", time.time() - t0)

    dist.main_first(report)


def _pseudo_rows(run: Run, pseudo_dir: str) -> list[dict]:
    """Rows of RUN/<pseudo_dir>/pseudo_labels.csv whose image is in the run's unlabeled pool."""
    from semivit.trainer.pseudo import read_pseudo_labels

    rows = read_pseudo_labels(run.dir / pseudo_dir / "pseudo_labels.csv", run.classes)
    if not rows:  # (no stage 2, or it selected nothing: the pool need not be decoded)
        return []
    index = {run.rel(p) for p in run.unlabeled[0]}
    return [r for r in rows if r["image"] in index]


def pseudo_extra(run: Run, pseudo_dir: str = "pseudo") -> Extra:
    """The pseudo-labeled images of stage 2 (or of a later distillation round's relabeling,
    ``pseudo_dir``) as extra training samples (weights = confidence)."""
    rows = _pseudo_rows(run, pseudo_dir)
    if not rows:
        size = run.cfg.model.img_size
        return pseudo_samples(np.zeros((0, size, size, 3), np.uint8), [], [], None, run.cfg.pseudo)
    paths, images = run.unlabeled
    index = {run.rel(p): i for i, p in enumerate(paths)}
    idx = np.asarray([index[r["image"]] for r in rows], dtype=np.int64)
    return pseudo_samples(images[idx], [r["label_index"] for r in rows], [r["confidence"] for r in rows],
                          [r["probs"] for r in rows], run.cfg.pseudo)


def view_targets(run: Run, views: np.ndarray, teacher: tuple[str, ...]) -> np.ndarray:
    """``pseudo.targets: view``: the ``teacher`` ensemble's probabilities (N, V, C) on each of the
    V cached stem views (N, V, C', h, w) of N images - no flip TTA: the view the student sees is
    the view the teacher judged (``pseudo.align: prior`` is refused with it: stage 2's alignment
    is fitted on the pool's per-image probabilities, not on these)."""
    from semivit.trainer.infer import ensemble_predict
    from semivit.trainer.stem_cache import StemFeatures

    n, v = views.shape[:2]
    flat = StemFeatures(views.reshape(n * v, *views.shape[2:]))
    probs = ensemble_predict(run.dir, flat, stages=list(teacher), tta=False, device=run.device,
                             weighting=run.cfg.ensemble.weighting)
    return probs.reshape(n, v, -1).astype(np.float32)


class FoldTeacher:
    """``pseudo.teacher: fold``: stage 2's pseudo-labeled images relabeled, for fold k, by stage-1
    fold k's model alone (flip TTA as stage 2), which never trained on fold k - so fold k's
    student learns nothing from its own validation labels.  Soft targets become that model's
    probabilities, hard labels its arg-max, confidence weights its maximum.  The images (and the
    cached stem views of them, computed by the first fold that trains) are shared by every fold;
    ``also``: samples appended unchanged (a refresh's accepted inbox pseudo-labels).  ``stage``:
    whose fold k teaches (a later distillation round: the previous round's fold-k student, which
    never saw fold k's labels either)."""

    def __init__(self, run: Run, extra: Extra, also: Optional[Extra] = None, stage: str = "stage1"):
        self.run, self.extra, self.also, self.stage = run, extra, also, stage
        self.inputs = None  # the images' stem features (or the images), computed once
        self.last: Optional[Extra] = None  # the previous fold's samples: their cached views are reused

    def probs(self, k: int) -> np.ndarray:
        from semivit.models.checkpoint import load_checkpoint
        from semivit.trainer.infer import predict_arrays

        run, tta = self.run, self.run.cfg.pseudo.tta
        if self.inputs is None:
            self.inputs = run.stem_features(self.extra.images, tta=tta, what="fold teachers' images")
        model, _ = load_checkpoint(run.stage_dir(self.stage, k) / "best.pt")
        return predict_arrays(model.to(run.device), self.inputs, device=run.device, tta=tta)

    def __call__(self, k: int) -> Extra:
        from semivit.pseudo.samples import concat

        p = self.probs(k)
        out = pseudo_samples(self.extra.images, p.argmax(1), p.max(1), p, self.run.cfg.pseudo)
        if self.also is not None and len(self.also.labels):
            out = concat(out, self.also)
        out.views = self.last.views if self.last is not None else None  # same images, same order
        self.last = out
        return out


class FoldPropagated(FoldTeacher):
    """``pseudo.propagate_labels: fold``: fold k's student learns, on stage 2's pseudo-labeled
    images, the teacher mixed with labels spread from fold k's training folds only (stage 2 saved
    them per fold in RUN/<pseudo_dir>/propagate_folds.npz), so its validation labels never reach
    its targets.  Everything else as :class:`FoldTeacher` (hard labels its arg-max, confidence
    weights its maximum, the cached views shared by every fold)."""

    def __init__(self, run: Run, extra: Extra, also: Optional[Extra] = None, pseudo_dir: str = "pseudo"):
        super().__init__(run, extra, also)
        path = run.dir / pseudo_dir / "propagate_folds.npz"
        if not path.is_file():
            raise UserError(f"{path} is missing: run stage 2 again (ssl train ... --stages pseudo,retrain) with "
                            "pseudo.propagate_labels: fold")
        with np.load(path) as z:
            where = {str(name): i for i, name in enumerate(z["images"])}
            self.table = z["probs"]
        rows = _pseudo_rows(run, pseudo_dir)
        if (self.table.shape[0] != run.cfg.cv.folds or len(rows) != len(extra.labels)
                or any(r["image"] not in where for r in rows)):
            raise UserError(f"{path} does not match RUN/{pseudo_dir}/pseudo_labels.csv: run stage 2 again")
        self.order = np.asarray([where[r["image"]] for r in rows], dtype=np.int64)

    def probs(self, k: int) -> np.ndarray:
        return self.table[k][self.order]


def run_training(data: Optional[Path], out: Optional[Path], cfg, stages: Optional[str] = None) -> Run:
    """The whole pipeline; under torchrun one DistributedDataParallel run (see
    :mod:`semivit.trainer.distributed`): the trainings are shared out, rank 0 writes."""
    from semivit.trainer import distributed as dist

    chosen = parse_stages(stages, cfg)
    d = dist.setup(cfg.device)
    try:
        run = _run_training(data, out, cfg, chosen, d)
        dist.barrier()  # leave together: no rank closes its gloo sockets while another still talks
        return run
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
    if "pseudo" in chosen or "retrain" in chosen:  # a wrong combination fails before stage 1 trains
        from semivit.trainer.methods import check_extra_teachers, check_propagate, check_view_targets

        check_extra_teachers(cfg, run.classes, run.dir)
        check_propagate(cfg)
        if "retrain" in chosen:
            check_view_targets(cfg, lambda: run.stem is not None)
    seed_everything(cfg.seed)
    t_all = time.time()
    info(f"run {run.dir}: {len(run.labeled)} labeled images in {len(run.classes)} classes "
         f"({', '.join(f'{c}={n}' for c, n in zip(run.classes, run.labeled.counts()))}); "
         f"stages {','.join(chosen)}; device {run.device}; preset {cfg.preset}"
         + (f"; torchrun: {d.world_size} ranks ({d.backend})" if d.enabled else ""))
    # folds.json before anything trains: rank 0 writes it, every other rank then reads the same file
    dist.main_first(lambda: run.folds)
    _ = run.folds

    run_stages(run, chosen)
    write_run_report(run)
    if d.enabled and d.is_main:
        import shutil

        shutil.rmtree(run.dir / ".dist", ignore_errors=True)  # the shared stem-feature cache
    info(f"done in {time.time() - t_all:.0f}s: ensemble in {run.dir / 'ensemble.json'}, report in {run.dir / 'report.md'}")
    return run


def stage_summary(run_dir: Path, stage: str) -> list[dict]:
    return [read_json(p) for p in sorted(Path(run_dir, stage).glob("fold*/done.json"))]
