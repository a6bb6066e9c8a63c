"""Building versions: registering a trained run, and a refresh's retrained candidate.

Every version is built in REGISTRY/.staging/vNNNN-<pid>/ (run/, export/, manifest.json) and
renamed into place only when complete (registry.publish).

What a refresh candidate is (the choice, and why):

- ``run/`` is a new run directory on the SAME labeled data, folds and config as the current
  version's run (``--set`` may change training keys such as train.epochs or pseudo.threshold,
  never model.*, cv.* or data.*, which would make the comparison meaningless);
- its stage-1 members are the current version's stage-1 members, unchanged (hard links): they are
  trained on the labeled images only, which a refresh does not change, so retraining them would
  only add seed noise and cost;
- its stage-3 members are retrained from scratch, fold by fold, by the trainer's own retrain
  stage (semivit.trainer.stages, run by semivit.trainer.pipeline.run_stages) on the labeled training folds + ALL accepted pseudo-labels: the original
  run's stage-2 pseudo-labels (RUN/pseudo/pseudo_labels.csv, carried forward) and every accepted
  inbox pseudo-label (weighted by confidence, as stage 3 does; never used for validation), in one
  round (``pseudo.rounds`` is 1 for a refresh: a run trained with more rounds carries forward its
  stage-2 labels, not a later round's relabeling);
- the ensemble is stage 1 + the new stage 3, weighted by validation macro F1 as in the trainer:
  the same size as the original (2 x folds: the seeds' "all 10 models").  Carrying the previous
  stage-3 members along as well would grow the ensemble (and inference time) with every refresh.

It is compared with the current version by registry-independent numbers (semivit.refresh.metrics).
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.safe_io import path_text
from semivit.refresh import registry as reg
from semivit.refresh.settings import Settings, init_registry, load_settings
from semivit.refresh.lock import FileLock, StopFlag, StopRequested, check_disk, dir_size, kill_point
from semivit.refresh.metrics import compare, version_metrics
from semivit.utils import atomic_write_json, info, read_json, warn

# keys a refresh cannot change, and why
FORBIDDEN_OVERRIDES = {("model.", "cv.", "data."): "a refresh keeps the current version's model, folds and data",
                       # stage 2's, and a refresh does not run stage 2 again
                       ("pseudo.propagate",): "label spreading is part of stage 2, which a refresh does not run again"}
RUN_IGNORE = shutil.ignore_patterns("export", "eval", "stage3", "stage3_round*", "pseudo_round*", "ensemble.json",
                                    "report.md", "*.png",
                                    "heldout.json", "timings.yaml", "skipped.csv", "inbox_pseudo_labels.csv")


def export_into(vdir: Path, settings: Settings) -> None:
    try:
        from semivit.export.exporter import export_run
    except ImportError as e:
        raise UserError(f"cannot export the new version: semivit.export is not available ({e})") from None
    export_run(vdir / "run", out=vdir / "export", trt=settings.export_trt, int8=settings.export_int8,
               tta=settings.export_tta, force=True, on_level=lambda _name: kill_point("exporting"))


def _labeled_info(run_dir: Path) -> dict:
    folds = read_json(run_dir / "folds.json")
    from semivit.config import load_run_config

    _, data = load_run_config(run_dir)
    pl = run_dir / "pseudo" / "pseudo_labels.csv"
    n_pl = len(pl.read_text().splitlines()) - 1 if pl.is_file() else 0
    return {"labeled_dir": str(data), "labeled_images": len(folds["items"]), "classes": folds["classes"],
            "folds": folds["folds"], "unlabeled_pseudo_labels": max(n_pl, 0)}


def register_run(registry: Path, run_dir: Path) -> str:
    """Copy a trained run into the registry as a new version (with its export).  The first version
    becomes current; later ones stay candidates until ``ssl models promote``."""
    run_dir = Path(run_dir)
    if not (run_dir / "ensemble.json").is_file() or not (run_dir / "folds.json").is_file():
        raise UserError(f"{run_dir} is not a trained run (ensemble.json and folds.json needed)")
    registry = init_registry(registry)
    settings = load_settings(registry)
    with FileLock(registry / "refresh.lock", "refresh or registration"):
        reg.clean_staging(registry)
        check_disk(registry, int(1.2 * dir_size(run_dir)), settings.min_free_mb, "registering the run")
        name, st = reg.new_staging(registry)
        try:
            reg.link_or_copy_tree(run_dir, st / "run", ignore=shutil.ignore_patterns("export", "eval"), link=False)
            export_into(st, settings)
            metrics = version_metrics(st / "run", settings.holdout_dir(registry))
            cur = reg.current_version(registry)
            decision = ({"promote": True, "reason": "first version of the registry"} if cur is None else
                        {"promote": False, "hold": True,
                         "reason": f"registered beside current {cur}: promote it with `ssl models promote {name}`"})
            man = {"format": reg.MANIFEST_FORMAT, "version": name, "status": "candidate", "origin": "register",
                   "parent": None, "created": reg.now_iso(), "created_unix": time.time(),
                   "source_run": str(run_dir.resolve()), "data": {**_labeled_info(st / "run"), "inbox_pseudo_labels": 0},
                   "metrics": metrics, "decision": decision,
                   "status_history": [{"time": reg.now_iso(), "status": "candidate", "why": "registered from a run"}]}
            reg.write_manifest(st, man)
            reg.publish(registry, st, name)
        except BaseException:
            shutil.rmtree(st, ignore_errors=True)
            raise
        outcome = apply_decision(registry, name, None, {"action": "register", "source_run": str(run_dir)})
    info(f"registry {registry}: {name} registered ({outcome}; val macro F1 {metrics['val']['macro_f1']:.4f})")
    return name


# ---------------------------------------------------------------- refresh candidates

def candidate_config(parent_run: Path, overrides: list[str]):
    from semivit import config as cfgmod

    for item in overrides:
        key = item.split("=", 1)[0].strip()
        for prefixes, why in FORBIDDEN_OVERRIDES.items():
            if key.startswith(prefixes):
                raise UserError(f"--set {key}: {why} (train a new run with `ssl train ... --registry` to change it)")
    cfg = cfgmod.resolve(config_file=Path(parent_run) / "config.yaml", overrides=list(overrides))
    if cfg.ssl.method != "pseudo-label":  # the refresh retrains with the accepted pseudo-labels as extra data
        cfg = cfg.model_copy(update={"ssl": cfg.ssl.model_copy(update={"method": "pseudo-label"})})
    if cfg.pseudo.rounds != 1:  # one retraining on the labels it has (stage 2's + the inbox's), not a
        # new distillation chain per refresh: each round would cost one more stage 3 per version
        cfg = cfg.model_copy(update={"pseudo": cfg.pseudo.model_copy(update={"rounds": 1})})
    return cfg


def inbox_extra(accepted, classes: list[str], cfg):
    """Accepted inbox pseudo-labels -> (Extra, rows used).  Content whose file is gone is skipped."""
    from semivit.data.dataset import decode_many
    from semivit.pseudo.samples import pseudo_samples

    have = [a for a in accepted if a.path is not None]
    if len(have) < len(accepted):
        warn(f"{len(accepted) - len(have)} accepted inbox images are no longer in the inbox: left out")
    size = cfg.model.img_size
    dec = decode_many([a.path for a in have], size, workers=cfg.data.decode_workers)
    used = [have[i] for i in dec.ok]
    images = dec.images if used else np.zeros((0, size, size, 3), np.uint8)
    probs = [a.probs for a in used] if all(a.probs for a in used) else None
    return pseudo_samples(images, [classes.index(a.label) for a in used], [a.confidence for a in used],
                          probs, cfg.pseudo), used


def write_used_csv(path: Path, used) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["sha256", "path", "label", "confidence", "source", "labeled_by"])
        for a in used:
            w.writerow([a.sha256, path_text(str(a.path)) if a.path is not None else "", a.label, f"{a.confidence:.6f}", a.source, a.labeled_by])


def read_used_shas(vdir: Path) -> list[str]:
    path = Path(vdir) / "run" / "inbox_pseudo_labels.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [r["sha256"] for r in csv.DictReader(f)]


def build_inputs(parent: str, overrides: list[str], accepted) -> dict:
    """What a candidate is built from (a resumed build must match it exactly)."""
    import hashlib
    import json

    rows = sorted((a.sha256, a.label, round(a.confidence, 6), a.path is not None) for a in accepted)
    return {"parent": parent, "overrides": list(overrides),
            "pseudo_labels": hashlib.sha256(json.dumps(rows).encode()).hexdigest(), "count": len(rows)}


def build_candidate(registry: Path, parent: str, db, overrides: list[str], tolerance: float,
                    settings: Settings, stop: StopFlag) -> str:
    """Retrain, export, evaluate and publish a candidate (status candidate + its decision)."""
    from semivit.config import load_run_config
    from semivit.models.ensemble import read_ensemble
    from semivit.trainer.pipeline import run_stages, write_run_report
    from semivit.trainer.run import Run

    registry = Path(registry)
    parent_run = registry / parent / "run"
    cfg = candidate_config(parent_run, overrides)
    _, data = load_run_config(parent_run)
    estimate = int(1.2 * (dir_size(parent_run / "stage3") + dir_size(registry / parent / "export")))
    check_disk(registry, estimate, settings.min_free_mb, "retraining")
    accepted = db.accepted()
    inputs = build_inputs(parent, overrides, accepted)
    adopted = reg.adopt_staging(registry, inputs)
    name, st = adopted or reg.new_staging(registry)
    t0 = time.time()
    try:
        run_dir = st / "run"
        if adopted:
            info(f"refresh: resuming the interrupted build of {name} (same inputs; finished folds are kept)")
        else:
            reg.link_or_copy_tree(parent_run, run_dir, ignore=RUN_IGNORE)
            from semivit import config as cfgmod

            cfgmod.save(cfg, run_dir / "config.yaml", extra={"data": str(data), "refresh": {
                "parent": parent, "overrides": list(overrides), "stage1": f"the members of {parent} (unchanged)"}})
            atomic_write_json(st / "inputs.json", inputs)  # prepared: a killed build can be resumed
        run = Run(run_dir, cfg, data)
        _ = run.folds  # the parent's split; UserError if the labeled data changed since
        new_extra, used = inbox_extra(accepted, run.classes, cfg)
        write_used_csv(run_dir / "inbox_pseudo_labels.csv", used)
        info(f"refresh: retraining stage 3 of {name}: the run's stage-2 pseudo-labels + {len(used)} inbox "
             "pseudo-labels")
        stop.check()

        def before_fold(k: int) -> None:
            if k > 0:
                kill_point("train")  # fold 1 starts (fold 0 done when folds train one at a time)
                stop.check()

        run.extra_pseudo, run.before_fold = new_extra, before_fold
        # the trainer's retrain stage: stage 3 by ssl.method (pseudo-label: stage 2's + the inbox's
        # pseudo-labels) and the ensemble stage 1 + stage 3; stage 1 is the parent's, unchanged
        t_train = run_stages(run, ["retrain"], check_needs=False)["retrain"]
        members = read_ensemble(run_dir)["members"]
        write_run_report(run, best_effort=True)
        stop.check()
        check_disk(registry, int(1.2 * dir_size(registry / parent / "export")), settings.min_free_mb, "exporting")
        kill_point("export")
        t_exp = time.time()
        export_into(st, settings)
        t_exp = time.time() - t_exp
        holdout = settings.holdout_dir(registry)
        t_eval = time.time()
        cand_m = version_metrics(run_dir, holdout)
        par_m = version_metrics(parent_run, holdout)
        t_eval = time.time() - t_eval
        comp = compare(cand_m, par_m, tolerance, parent)
        pending = sum(1 for a in used if a.state == "pseudo_labeled")
        man = {"format": reg.MANIFEST_FORMAT, "version": name, "status": "candidate", "origin": "refresh",
               "parent": parent, "created": reg.now_iso(), "created_unix": time.time(),
               "data": {**_labeled_info(run_dir), "inbox_pseudo_labels": len(used), "inbox_new_pseudo_labels": pending,
                        "inbox_list": "run/inbox_pseudo_labels.csv"},
               "metrics": cand_m, "parent_metrics": par_m, "comparison": comp,
               "decision": {"promote": comp["passed"], "reason": comp["reason"]},
               "build": {"seconds": round(time.time() - t0, 1), "overrides": list(overrides),
                         "step_seconds": {"retrain": round(t_train, 2), "export": round(t_exp, 2),
                                          "evaluate": round(t_eval, 2)},
                         "members": [m["name"] for m in members]},
               "status_history": [{"time": reg.now_iso(), "status": "candidate", "why": "built by refresh"}]}
        reg.write_manifest(st, man)
        stop.check()
        kill_point("publish")
        reg.publish(registry, st, name)
    except KeyboardInterrupt:
        raise  # a requested stop keeps the prepared build: the next refresh resumes it
    except BaseException as e:
        stopped = stop.as_stop(e)
        if stopped is not None:
            if stopped is e:
                raise
            raise stopped from e  # a stop that a library re-raised as its own error is still a stop
        shutil.rmtree(st, ignore_errors=True)  # a failure leaves nothing (a SIGKILL leaves staging)
        raise
    kill_point("published")
    return name


# ---------------------------------------------------------------- decisions

def apply_decision(registry: Path, name: str, db, record: Optional[dict] = None) -> str:
    """Carry out a published candidate's recorded decision (idempotent; used again to recover a
    refresh killed after publishing).  Returns the final status."""
    from semivit.refresh import history

    registry = Path(registry)
    vdir = registry / name
    man = reg.read_manifest(vdir)
    dec = man.get("decision") or {}
    if man["status"] != "candidate" or not dec or dec.get("hold"):
        return man["status"]
    status, why = "rejected", dec.get("reason", "")
    if dec.get("promote"):
        expect = {None, man.get("parent"), name}
        try:
            reg.switch_current(registry, name, expect=expect)
            status = "promoted"
        except reg.CurrentChanged as e:
            why = f"not promoted: {e}; promote it by hand with `ssl models promote {name}` if wanted"
    if db is not None:
        db.mark_used(name, read_used_shas(vdir))
    rec = {**(record or {}), "version": name, "parent": man.get("parent"), "decision": status, "reason": why}
    for c in (man.get("comparison") or {}).get("checks", []):
        rec[{"val_macro_f1": "val", "holdout_macro_f1": "holdout"}[c["metric"]]] = {
            "candidate": c["candidate"], "current": c["current"]}
    if not history.has_decision(registry, name):
        history.append(registry, rec)
    kill_point("decided")
    reg.set_status(registry, name, status, why)
    return status
