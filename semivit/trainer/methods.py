"""Retraining strategies (stage 3) and pre-training methods (stage 0), by their config names.

Stage 3 trains every fold again by ``ssl.method``; a strategy turns a run into a
:class:`~semivit.trainer.folds.FoldPlan` - what each fold trains on and from where it starts -
and says which stages it needs before it.  Adding one is one function and its registration::

    from semivit.trainer.methods import FoldPlan, retrain_method

    @retrain_method("noisy-student", needs=("supervised", "pseudo"))
    def noisy_student(run) -> FoldPlan:
        '''Soft targets from the stage-1 teacher, a noised student.'''
        ...
        return FoldPlan(extra=..., per_fold=lambda k: FoldSetup(make_policy=...))

The config accepts every registered name (``ssl.method``; a wrong one is a one-line error that
lists them), the pipeline runs the ``needs`` first (a stage a method does not need - the
pseudo-label stage for the EMA-Teacher - is left out), and ``ssl refresh`` retrains through the
same stage.  Keep this module light (no torch at import): the config imports it to validate
names; import what a strategy needs inside its function.

Pre-training methods (``pretrain.method``, "none" = no stage 0) register the same way with
:func:`pretrain_method`; the function writes RUN/pretrain/encoder.pt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from semivit.errors import UserError


@dataclass(frozen=True)
class RetrainMethod:
    name: str
    plan: Callable  # (run) -> FoldPlan
    needs: tuple[str, ...]  # stages that must have finished (by name, see semivit.trainer.stages)


_RETRAIN: dict[str, RetrainMethod] = {}
_PRETRAIN: dict[str, Callable] = {}


def retrain_method(name: str, needs: tuple[str, ...] = ("supervised",)):
    """Register a stage-3 strategy under the ``ssl.method`` name ``name`` (decorator)."""
    def register(fn):
        _RETRAIN[name] = RetrainMethod(name, fn, tuple(needs))
        return fn

    return register


def pretrain_method(name: str):
    """Register a stage-0 pre-training under the ``pretrain.method`` name ``name`` (decorator)."""
    def register(fn):
        _PRETRAIN[name] = fn
        return fn

    return register


def distil_rounds(cfg) -> int:
    """How many times stage 3 runs: ``pseudo.rounds`` for a strategy that learns from stage 2's
    pseudo-labels, else once (the EMA-Teacher pseudo-labels online)."""
    return cfg.pseudo.rounds if "pseudo" in get_retrain(cfg.ssl.method).needs else 1


def round_dirs(r: int, rounds: int) -> tuple[str, str, str]:
    """Distillation round ``r`` of ``rounds`` -> (the run subdirectory of its pseudo-labels, of
    its students, and the stage whose fold models taught it: ``pseudo.teacher: fold``).  Round 1
    learns stage 2's labels (RUN/pseudo, from stage 1); round r > 1 the ensemble of stage 1 +
    round r-1's students (RUN/pseudo_round<r>).  The last round's students are RUN/stage3 - the
    ensemble's second five - and earlier rounds' RUN/stage3_round<r>."""
    pseudo = "pseudo" if r == 1 else f"pseudo_round{r}"
    students = "stage3" if r == rounds else f"stage3_round{r}"
    teacher = "stage1" if r == 1 else f"stage3_round{r - 1}"
    return pseudo, students, teacher


def teacher_stages(r: int, rounds: int) -> tuple[str, ...]:
    """The stages whose ensemble labels the pool for distillation round ``r``: stage 1, and from
    round 2 on stage 1 + round r-1's students."""
    return ("stage1",) if r == 1 else ("stage1", round_dirs(r, rounds)[2])


def check_view_targets(cfg, cached: Callable[[], bool]) -> None:
    """``pseudo.targets: view`` needs soft targets from the ensemble on cached stem views, in the
    pseudo-label strategy; checked when a run starts, before anything trains.  ``cached()`` says
    whether the run has the stem cache (asked only for ``view``: it builds the run's stem)."""
    if cfg.pseudo.targets != "view":
        return
    why = ("ssl.method: pseudo-label" if cfg.ssl.method != "pseudo-label" else
           "pseudo.soft: true" if not cfg.pseudo.soft else
           "pseudo.teacher: ensemble" if cfg.pseudo.teacher != "ensemble" else
           "pseudo.align: none" if cfg.pseudo.align != "none" else
           "the stem-feature cache (train.cache_views > 0 and a hybrid model with a frozen stem)" if not cached() else None)
    if why:
        raise UserError(f"pseudo.targets=view needs {why}")


def check_propagate(cfg) -> None:
    """``pseudo.propagate: spread`` changes stage 2's probabilities of the pool: it needs the
    pseudo-label strategy reading them as they are written (the ensemble's, one target per image);
    checked when a run starts, before anything trains."""
    p = cfg.pseudo
    if p.propagate == "none":
        if p.propagate_labels != "all":
            raise UserError(f"pseudo.propagate_labels={p.propagate_labels} needs pseudo.propagate: spread")
        return
    why = ("ssl.method: pseudo-label" if cfg.ssl.method != "pseudo-label" else
           "pseudo.teacher: ensemble" if p.teacher != "ensemble" else
           "pseudo.targets: image" if p.targets != "image" else None)
    if why:
        raise UserError(f"pseudo.propagate={p.propagate} needs {why}")
    # per-fold targets replace the soft targets only: which images are selected (a threshold rule,
    # a cap) and the alignment to the prior are stage 2's, made with every label - so fold mode
    # takes every image as it is
    why = ("pseudo.threshold_mode: all" if p.threshold_mode != "all" else
           "no pseudo.max_per_class" if p.max_per_class is not None else
           "pseudo.align: none" if p.align != "none" else None)
    if p.propagate_labels == "fold" and why:
        raise UserError(f"pseudo.propagate_labels=fold needs {why}")


def check_extra_teachers(cfg, classes: list[str], run_dir) -> list:
    """``pseudo.extra_teachers``: each a finished run (stage-1 models, ensemble.json) on the same
    ``classes``, not this run, used by the pseudo-label strategy's ensemble teacher; checked when
    a run starts, before anything trains.  Returns the runs' resolved paths."""
    import json
    from pathlib import Path

    teachers = cfg.pseudo.extra_teachers
    if not teachers:
        return []
    why = ("ssl.method: pseudo-label" if cfg.ssl.method != "pseudo-label" else
           "pseudo.teacher: ensemble" if cfg.pseudo.teacher != "ensemble" else
           "pseudo.targets: image" if cfg.pseudo.targets != "image" else None)
    if why:
        raise UserError(f"pseudo.extra_teachers needs {why}")
    out = []
    for t in teachers:
        path = Path(t).expanduser().resolve()
        if run_dir is not None and path == Path(run_dir).resolve():
            raise UserError(f"pseudo.extra_teachers: {t} is this run itself")
        if not any(path.glob("stage1/fold*/done.json")) or not (path / "ensemble.json").is_file():
            raise UserError(f"pseudo.extra_teachers: {t} has no finished stage-1 models "
                            f"(train it first: ssl train ... --out {t} --stages supervised)")
        theirs = json.loads((path / "ensemble.json").read_text()).get("classes")
        if theirs != list(classes):
            raise UserError(f"pseudo.extra_teachers: {t} has classes {theirs}, this run {list(classes)}")
        out.append(path)
    return out


def retrain_names() -> list[str]:
    return list(_RETRAIN)


def pretrain_names() -> list[str]:
    return ["none", *_PRETRAIN]


def get_retrain(name: str) -> RetrainMethod:
    if name not in _RETRAIN:
        raise UserError(f"unknown ssl.method '{name}' (choose from {', '.join(_RETRAIN)})")
    return _RETRAIN[name]


def get_pretrain(name: str) -> Callable:
    if name not in _PRETRAIN:
        raise UserError(f"unknown pretrain.method '{name}' (choose from {', '.join(pretrain_names())})")
    return _PRETRAIN[name]


# ----------------------------------------------------------------------------- the strategies
@retrain_method("pseudo-label", needs=("supervised", "pseudo"))
def pseudo_label_retrain(run):
    """Every fold again - from the (pre-trained) backbone, or with ``pseudo.init: stage1`` from
    stage-1 fold k's model - on its labeled training folds + all of stage 2's pseudo-labels (and
    a refresh's accepted inbox pseudo-labels), weighted by confidence."""
    from semivit.pseudo.samples import concat
    from semivit.trainer.folds import FoldPlan, FoldSetup
    from semivit.trainer.pipeline import pseudo_extra
    from semivit.utils import info

    r, rounds = run.distil_round, distil_rounds(run.cfg)
    check_view_targets(run.cfg, lambda: run.stem is not None)
    pseudo_dir, _, fold_teacher = round_dirs(r, rounds)
    extra = pseudo_extra(run, pseudo_dir)
    teach = None
    if run.cfg.pseudo.teacher == "fold" and len(extra.labels):
        from semivit.trainer.pipeline import FoldTeacher

        # fold k's own labels, built when fold k trains
        teach = FoldTeacher(run, extra, run.extra_pseudo, stage=fold_teacher)
    elif run.cfg.pseudo.propagate != "none" and run.cfg.pseudo.propagate_labels == "fold" and len(extra.labels):
        from semivit.trainer.pipeline import FoldPropagated

        teach = FoldPropagated(run, extra, run.extra_pseudo, pseudo_dir)
    if run.extra_pseudo is not None:
        extra = concat(extra, run.extra_pseudo)
    kind = "soft-target (distillation)" if extra.labels.ndim == 2 else "pseudo-labeled"
    ensemble = "the stage-1 ensemble" if r == 1 else f"stage 1 + round {r - 1}'s students"
    if teach is not None and run.cfg.pseudo.teacher == "fold":
        who = f"{fold_teacher} fold k's model alone teaches fold k"
    elif teach is not None:
        who = f"{ensemble} + labels spread from fold k's training folds teach fold k"
    else:
        who = f"{ensemble} {'teaches' if r == 1 else 'teach'}"
    rnd = f" (distillation round {r} of {rounds})" if rounds > 1 else ""
    info(f"stage 3{rnd}: {len(run.labeled)} labeled + {len(extra.labels)} {kind} images per fold pool ({who})")
    cfg = None
    if run.cfg.pseudo.train:
        from semivit.config import retrain_train_config

        cfg = run.cfg.model_copy(update={"train": retrain_train_config(run.cfg)})  # pseudo.train on top
    if run.cfg.pseudo.drop_path is not None:  # the students' own stochastic depth
        base = cfg if cfg is not None else run.cfg
        cfg = base.model_copy(update={"model": base.model.model_copy(update={"drop_path": run.cfg.pseudo.drop_path})})
        info(f"stage 3: students with stochastic depth {run.cfg.pseudo.drop_path:g} "
             f"(stage 1: {run.cfg.model.drop_path:g}; pseudo.drop_path)")
    warm = run.cfg.pseudo.init == "stage1"
    if warm:
        info("stage 3: each fold's student starts from stage-1 fold k's best model (pseudo.init: stage1)")
    if teach is None and cfg is None and not warm:
        return FoldPlan(extra=extra)
    from semivit.trainer.folds import stage1_state

    return FoldPlan(extra=extra, per_fold=lambda k: FoldSetup(
        extra=teach(k) if teach is not None else None, init_state=stage1_state(run, k) if warm else None,
        epochs=cfg.train.epochs if cfg is not None else None, cfg=cfg))


@retrain_method("ema-teacher", needs=("supervised",))
def ema_teacher_retrain(run):
    """Semi-ViT's EMA-Teacher, fold k starting from stage-1 fold k (semivit.trainer.ema_teacher)."""
    from semivit.trainer.ema_teacher import fold_plan

    return fold_plan(run)


@pretrain_method("mae")
def mae_pretrain(run):
    """Masked-autoencoder pre-training of the ViT backbone (semivit.trainer.mae)."""
    from semivit.trainer.mae import run_mae

    return run_mae(run)
