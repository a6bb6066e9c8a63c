"""A run directory: resolved config, data, folds, decoded images, and where each stage writes.

```
RUN/config.yaml   RUN/folds.json   RUN/skipped.csv   RUN/stage1/fold{k}/   RUN/pseudo/
RUN/stage3/fold{k}/   RUN/pretrain/   RUN/ensemble.json   RUN/report.md
```
"""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import yaml

from semivit import config as cfgmod
from semivit.data import folds as foldmod
from semivit.data.dataset import Decoded, decode_many
from semivit.data.layout import LabeledSet, load_train, unlabeled_pool
from semivit.errors import UserError
from semivit.kinds import require_run_or_new
from semivit.safe_io import path_text
from semivit.progress import progress_bar
from semivit.utils import atomic_write_text, info, resolve_device, warn

def decode_with_progress(paths, size: int, what: str, workers: int = 0) -> Decoded:
    with progress_bar(transient=True) as bar:
        task = bar.add_task(f"decode {what}", total=len(paths), status="")
        dec = decode_many(paths, size, workers=workers, progress=lambda n: bar.update(task, advance=n))
    for path, reason in dec.failures[:5]:
        warn(f"skipped {path}: {reason}")
    if len(dec.failures) > 5:
        warn(f"... and {len(dec.failures) - 5} more undecodable files (see skipped.csv)")
    return dec


@dataclass
class Run:
    """Everything a stage needs; created by :func:`open_run`."""

    dir: Path
    cfg: cfgmod.Config
    data: Path
    # what ``ssl refresh`` adds to the retrain stage: its accepted inbox pseudo-labels (trained on
    # beside stage 2's) and a hook before each fold (stop requests, crash-test kill points)
    extra_pseudo: Optional[object] = field(default=None, repr=False)
    before_fold: Optional[Callable[[int], None]] = field(default=None, repr=False)
    # the distillation round the retrain stage is training (pseudo.rounds; 1 = stage 2's labels)
    distil_round: int = field(default=1, repr=False)

    @cached_property
    def device(self):
        from semivit.trainer import distributed

        return distributed.device(resolve_device(self.cfg.device))  # cuda:LOCAL_RANK under NCCL

    @cached_property
    def _labeled(self) -> tuple[LabeledSet, np.ndarray]:
        ls = load_train(self.data, self.cfg.data.labels_csv)
        dec = decode_with_progress(ls.paths, self.cfg.model.img_size, "labeled images", self.cfg.data.decode_workers)
        self._record_skipped(dec, ls.root)
        if len(dec.ok) < len(ls):
            ls = ls.subset(dec.ok)
        if len(ls) < 2 * self.cfg.cv.folds:
            raise UserError(f"only {len(ls)} decodable labeled images: too few for {self.cfg.cv.folds} folds")
        return ls, dec.images

    @property
    def labeled(self) -> LabeledSet:
        return self._labeled[0]

    @property
    def images(self) -> np.ndarray:
        return self._labeled[1]

    @property
    def classes(self) -> list[str]:
        return self.labeled.classes

    @cached_property
    def folds(self) -> np.ndarray:
        return foldmod.load_or_make(self.dir / "folds.json", self.labeled, self.cfg.cv.folds, self.cfg.seed)

    @cached_property
    def unlabeled(self) -> tuple[list[Path], np.ndarray]:
        paths = unlabeled_pool(self.data, self.cfg.data.max_unlabeled, self.cfg.seed)
        if not paths:
            return [], np.zeros((0, self.cfg.model.img_size, self.cfg.model.img_size, 3), np.uint8)
        dec = decode_with_progress(paths, self.cfg.model.img_size, "unlabeled images", self.cfg.data.decode_workers)
        self._record_skipped(dec, self.data)
        return [paths[i] for i in dec.ok], dec.images

    @cached_property
    def stem(self):
        """The frozen CNN stem every model of this run shares, when ``train.cache_views`` asks
        for the feature cache (:mod:`semivit.trainer.stem_cache`); else None."""
        if not self.cfg.train.cache_views:
            return None
        import torch

        from semivit.models.networks import build_model, frozen_stem

        # Built without touching torch's global random generator: a fold's initial weights then
        # depend on its seed alone, not on whether this process had built the stem before it
        # (the first fold of a fresh or resumed process used to draw them after the stem's
        # construction; since fold workers, the stem is always built before any fold starts).
        with torch.random.fork_rng(devices=[]):
            stem = frozen_stem(build_model(self.model_cfg, len(self.classes)))
        return stem.to(self.device).eval() if stem is not None else None

    def augmented_views(self, images: np.ndarray, seed: int, what: str) -> np.ndarray:
        """Cached stem features of ``train.cache_views`` augmented views (+ the plain image);
        ``what`` names them in the progress line (``stem features (WHAT): 3200/15744 views``)."""
        from semivit.data import transforms
        from semivit.trainer.stem_cache import augmented_views

        t = transforms.build(self.cfg.train.augment, self.cfg.model.img_size, seed=seed)
        return augmented_views(self.stem, images, t, self.cfg.train.cache_views, self.device, self.cfg.train.precision,
                               desc=f"stem features ({what})")

    @cached_property
    def labeled_views(self) -> np.ndarray:
        from semivit.trainer import distributed

        # under torchrun: computed once by rank 0, read by the others (see distributed.compute_once)
        return distributed.compute_once(self.dir / ".dist" / "labeled_views.npy",
                                        lambda: self.augmented_views(self.images, seed=self.cfg.seed * 1000 + 700,
                                                                    what="labeled images"))

    def stem_features(self, images: np.ndarray, tta: bool = True, what: str = "images"):
        """Images -> StemFeatures when the run caches stem features, else the images as they are."""
        if self.stem is None:
            return images
        from semivit.trainer.stem_cache import features

        return features(self.stem, images, self.device, self.cfg.train.precision, tta=tta,
                        desc=f"stem features ({what})")

    @property
    def model_cfg(self):
        """The model config, with stage 0's encoder as initial weights once it exists."""
        return self.model_cfg_for(self.cfg)

    def model_cfg_for(self, cfg):
        """``cfg.model`` (a stage's own config: e.g. the students' ``pseudo.drop_path``) with stage
        0's encoder as initial weights once it exists."""
        enc = self.dir / "pretrain" / "encoder.pt"
        if self.cfg.pretrain.method != "none" and enc.is_file():
            return cfg.model.model_copy(update={"weights": enc})
        return cfg.model

    def rel(self, path: Path) -> str:
        try:
            return path_text(Path(path).relative_to(self.data).as_posix())
        except ValueError:
            return path_text(str(path))

    def _record_skipped(self, dec: Decoded, root: Path) -> None:
        from semivit.trainer.distributed import is_main

        if not dec.failures or not is_main():  # every rank decodes; rank 0 alone writes
            return
        path = self.dir / "skipped.csv"
        new = not path.exists()
        seen = set() if new else {r["image"] for r in csv.DictReader(open(path, newline=""))}
        with open(path, "a", newline="") as f:  # a resumed run decodes again: list each file once
            w = csv.writer(f)
            if new:
                w.writerow(["image", "reason"])
            for p, reason in dec.failures:
                if self.rel(p) not in seen:
                    w.writerow([self.rel(p), reason])

    def stage_dir(self, stage: str, fold: Optional[int] = None) -> Path:
        d = self.dir / stage / (f"fold{fold}" if fold is not None else "")
        d.mkdir(parents=True, exist_ok=True)
        return d

    def log_time(self, stage: str, seconds: float) -> None:
        from semivit.trainer.distributed import is_main

        if not is_main():
            return
        path = self.dir / "timings.yaml"
        doc = yaml.safe_load(path.read_text()) if path.exists() else {}
        doc = doc or {}
        doc[stage] = round(float(doc.get(stage, 0.0)) + seconds, 1)
        atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))


def _comparable(cfg: cfgmod.Config) -> dict:
    d = cfg.model_dump(mode="json")
    d.pop("device", None)  # a run may resume on another device
    d["data"].pop("decode_workers", None)
    d["train"].pop("fold_workers", None)  # how many folds train at once: not what they learn
    for k in GRAPH_KEYS:  # the pool graph is built after training, from it: it may change on resume
        d["ensemble"].pop(k, None)
    return d


GRAPH_KEYS = ("graph", "graph_neighbors", "graph_alpha", "graph_share")


def _graph_settings_changed(out: Path, old_cfg: cfgmod.Config, cfg: cfgmod.Config, saved: dict) -> None:
    """A resume that changes ``ensemble.graph*``: config.yaml takes the new keys; with
    ``ensemble.graph: none`` the run's graph.npz (derived, rebuilt by ``--stages graph``) goes."""
    old, new = ({k: getattr(c.ensemble, k) for k in GRAPH_KEYS} for c in (old_cfg, cfg))
    if old == new:
        return
    # the same file with the new config (the versions and machine it was trained with are kept)
    atomic_write_text(out / "config.yaml", yaml.safe_dump({**saved, "config": cfg.model_dump(mode="json")},
                                                          sort_keys=False))
    info(f"{out}: the pool graph's settings change ({', '.join(f'{k} {old[k]} -> {new[k]}' for k in GRAPH_KEYS if old[k] != new[k])})")
    if new["graph"] == "none" and (out / "graph.npz").is_file():
        (out / "graph.npz").unlink()
        info(f"{out}: ensemble.graph none - RUN/graph.npz removed (predictions are the ensemble's alone)")


def open_run(out: Optional[Path], cfg: cfgmod.Config, data: Optional[Path], create: bool = True,
             distributed: Optional[dict] = None) -> Run:
    """Create RUN (saving config.yaml) or reopen it to resume, refusing a different config.

    ``create=False`` (torchrun ranks other than 0, after rank 0 created it): only reopen.
    ``distributed`` ({world_size, backend}) is recorded in config.yaml."""
    if data is None:
        from semivit.data.demo import ensure_default_data

        data = ensure_default_data(seed=0)
        info(f"no DATA given: using the embedded ELPV demo data in {data}")
    data = Path(data).expanduser().resolve()
    if not data.is_dir():
        raise UserError(f"data directory not found: {data}")
    if out is None:
        out = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    out = Path(out)
    _refuse_inside_images(out, data)
    cfg_path = out / "config.yaml"
    saved = require_run_or_new(out)  # a foreign config.yaml or a non-empty folder: one line, nothing written
    if saved is not None:
        old_cfg = cfgmod.saved_run_config(saved, cfg_path)
        if _comparable(old_cfg) != _comparable(cfg):
            diff = _first_difference(_comparable(old_cfg), _comparable(cfg))
            raise UserError(f"{out} holds a run with a different config ({diff}); use a new --out to start another run")
        if Path(saved.get("data", data)) != data:
            raise UserError(f"{out} was trained on {saved.get('data')}, not {data}; use a new --out")
        _graph_settings_changed(out, old_cfg, cfg, saved)
        info(f"resuming the run in {out}")
    elif not create:
        raise UserError(f"{out} has no config.yaml: rank 0 did not create the run (is RUN on a file system "
                        f"every rank sees?)")
    else:
        out.mkdir(parents=True, exist_ok=True)
        extra = {"data": str(data)}
        if distributed:
            extra["distributed"] = distributed
        cfgmod.save(cfg, cfg_path, extra=extra)
    return Run(out, cfg, data)


def _first_difference(a, b, prefix="") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if a.get(k) != b.get(k):
                return _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
    return f"{prefix.rstrip('.')}: {a!r} -> {b!r}"


def _refuse_inside_images(out: Path, data: Path) -> None:
    """RUN inside DATA's image folders would feed the run's own PNGs (report, UMAP, confusion
    matrices) back in as training or unlabeled images on the next run."""
    where = Path(os.path.abspath(out))
    for sub in ("train", "unlabeled", "test"):
        d = data / sub
        if d.is_dir() and (where == d or d in where.parents or d.resolve() in where.resolve().parents):
            raise UserError(f"--out {out} is inside {d}: the run's PNGs would be read as images by the next run; "
                            "put the run elsewhere")
