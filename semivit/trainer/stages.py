"""The stages of ``ssl train``, in order, as objects in a registry.

A :class:`Stage` has a name (what ``--stages`` takes), what it needs (stages that must have
finished, which may depend on the config: the retrain needs the pseudo-label stage only for the
pseudo-label method), how it knows it is done, and how it runs.  :mod:`semivit.trainer.pipeline`
runs the chosen ones in registry order; every stage is resumable (a finished fold or output is
kept).  Adding a stage is one :func:`stage` registration here; keep this module light (the CLI
and the config read the names without importing torch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from semivit.trainer.methods import distil_rounds, get_pretrain, get_retrain, round_dirs, teacher_stages
from semivit.utils import info


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable  # (run) -> None
    is_done: Callable  # (run) -> bool
    needs: Callable = lambda cfg: ()  # (cfg) -> names of the stages that must be done first
    output: str = ""  # what it leaves, for the error of a stage that needs it
    applies: Callable = lambda cfg: True  # (cfg) -> whether this config has the stage at all
    not_applicable: Optional[str] = None  # the error when asked for explicitly but not applicable
    reuse: Optional[str] = None  # when done: skip it with this message (else it resumes inside)
    rank0: bool = False  # under torchrun rank 0 alone runs it, the other ranks wait (inference, MAE)


_STAGES: dict[str, Stage] = {}


def stage(name: str, **fields):
    """Register the decorated ``run(run)`` as the stage ``name`` (after the ones before it)."""
    def register(fn):
        _STAGES[name] = Stage(name, fn, **fields)
        return fn

    return register


def stage_names() -> list[str]:
    return list(_STAGES)


def get_stage(name: str) -> Stage:
    return _STAGES[name]


def _folds_done(run, stage_dir: str) -> bool:
    return all((run.dir / stage_dir / f"fold{k}" / "done.json").is_file() for k in range(run.cfg.cv.folds))


def _write_ensemble_on_rank0(run) -> None:
    from semivit.trainer import distributed

    distributed.main_first(lambda: _write_current_ensemble(run))


def _write_current_ensemble(run) -> dict:
    from semivit.models.ensemble import members_from_stages, write_ensemble
    from semivit.models.networks import normalization
    from semivit.utils import warn

    members = members_from_stages(run.dir, ["stage1", "stage3"])
    if not members:
        warn("no trained members yet: ensemble.json not written")
        return {}
    doc = write_ensemble(run.dir, members, run.classes, run.cfg.model.img_size, run.cfg.ensemble.weighting,
                         norm=normalization(run.cfg.model))
    info(f"ensemble: {len(members)} members, weights "
         + ", ".join(f"{m['name']}={m['weight']:.3f}" for m in doc["members"]))
    return doc


# ----------------------------------------------------------------------------- the stages
@stage("pretrain", is_done=lambda run: (run.dir / "pretrain" / "encoder.pt").is_file(),
       output="a pre-trained encoder", applies=lambda cfg: cfg.pretrain.method != "none",
       not_applicable="--stages pretrain needs a pre-training method: --set pretrain.method=mae",
       reuse="pretrain: encoder.pt exists, reusing it", rank0=True)
def pretrain(run) -> None:
    """Stage 0: ``pretrain.method`` (MAE) on the labeled + unlabeled images -> RUN/pretrain/encoder.pt."""
    from semivit.trainer import distributed

    if distributed.current().enabled:
        info("pretrain: MAE runs on rank 0 (the other ranks wait)")
    get_pretrain(run.cfg.pretrain.method)(run)


@stage("supervised", is_done=lambda run: _folds_done(run, "stage1"), output="a finished stage 1")
def supervised(run) -> None:
    """Stage 1: every fold on its labeled training folds; then the ensemble of stage 1."""
    from semivit.trainer.folds import run_stage

    run_stage(run, "stage1")
    _write_ensemble_on_rank0(run)


@stage("pseudo", is_done=lambda run: (run.dir / "pseudo" / "stats.json").is_file(),
       needs=lambda cfg: ("supervised",), output="pseudo-labels",
       applies=lambda cfg: "pseudo" in get_retrain(cfg.ssl.method).needs,
       reuse="pseudo: pseudo_labels.csv exists, reusing it", rank0=True)
def pseudo(run) -> None:
    """Stage 2: the stage-1 ensemble pseudo-labels the unlabeled pool (semivit.pseudo)."""
    from semivit.trainer.pseudo import run_pseudo

    run_pseudo(run)


@stage("retrain", is_done=lambda run: _folds_done(run, "stage3"), output="a finished stage 3",
       needs=lambda cfg: get_retrain(cfg.ssl.method).needs)
def retrain(run) -> None:
    """Stage 3 by the strategy ``ssl.method`` (semivit.trainer.methods), ``pseudo.rounds`` times
    (iterated distillation: round r > 1 first relabels the pool with stage 1 + round r-1's
    students); then the ensemble of stage 1 + the last round.  ``ssl refresh`` builds its
    candidate through this stage too.  A finished round (its folds' done.json) is kept on resume."""
    from semivit.trainer import distributed
    from semivit.trainer.folds import run_stage
    from semivit.trainer.pseudo import run_pseudo

    method, rounds = get_retrain(run.cfg.ssl.method), distil_rounds(run.cfg)
    try:
        for r in range(1, rounds + 1):
            pseudo_dir, students, previous = round_dirs(r, rounds)  # previous: round r-1's students
            if r > 1 and not (run.dir / pseudo_dir / "stats.json").is_file():
                info(f"distillation round {r} of {rounds}: stage 1 + {previous} relabel the unlabeled pool")
                distributed.main_first(lambda: run_pseudo(run, teacher=teacher_stages(r, rounds), out=pseudo_dir))
            run.distil_round = r  # the plan's labels and the folds' seeds follow it
            plan = method.plan(run)
            if run.before_fold is not None:
                plan.before_fold = run.before_fold
            run_stage(run, students, plan)
    finally:
        run.distil_round = 1
    _write_ensemble_on_rank0(run)


def _graph_done(run) -> bool:
    """RUN/graph.npz exists and was built with the config's settings (else it is built again)."""
    from semivit.models.pool_graph import read_graph

    doc = read_graph(run.dir) if (run.dir / "graph.npz").is_file() else None
    e = run.cfg.ensemble
    return doc is not None and (doc.get("neighbors"), doc.get("alpha"), doc.get("share")) == (
        e.graph_neighbors, e.graph_alpha, e.graph_share)


@stage("graph", is_done=_graph_done, needs=lambda cfg: ("supervised",),
       output="RUN/graph.npz", applies=lambda cfg: cfg.ensemble.graph != "none",
       not_applicable="--stages graph needs the pool graph: --set ensemble.graph=pool",
       reuse="graph: graph.npz exists, reusing it", rank0=True)
def graph(run) -> None:
    """After the ensemble: the labeled images + the unlabeled pool as a label-spreading graph in
    the stage-1 members' embedding (semivit.trainer.graph), which predictions mix in
    (``ensemble.graph: pool``; semivit.models.pool_graph)."""
    from semivit.trainer.graph import build_graph

    build_graph(run)
