"""The embedded default data: ELPV solar cells from the ``elpv-dataset`` package.

``ssl demo-data OUT`` writes it in the DATA layout: a stratified held-out ``test/`` split, a
labeled ``train/`` fraction of the remaining pool, the rest as ``unlabeled/``; the unlabeled
images' true labels go to ``unlabeled_truth.csv`` (read only to score pseudo-labels, never to
train).  The images are CC BY-NC-SA 4.0: they are copied from the installed package, never
shipped in this repository.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import numpy as np

from semivit.errors import UserError
from semivit.utils import atomic_write_json

# Defect probability in the ELPV labels -> class folder name (sorts in severity order).
CLASS_NAMES = ["defect_000", "defect_033", "defect_067", "defect_100"]
LICENSE = "ELPV dataset (Buerhop-Lutz, Deitsch et al.), CC BY-NC-SA 4.0, via the elpv-dataset package"


def elpv_index() -> tuple[Path, list[str], np.ndarray, list[str]]:
    """(image dir, file names, class indices, cell types) straight from the package files."""
    try:
        import elpv_dataset
    except ImportError:
        raise UserError("the default data needs the 'elpv-dataset' package: pip install elpv-dataset") from None
    root = Path(elpv_dataset.__file__).parent / "data"
    names, labels, types = [], [], []
    with open(root / "labels.csv") as f:
        for line in f:
            parts = line.split()
            if len(parts) < 3:
                continue
            names.append(Path(parts[0]).name)
            labels.append(int(round(float(parts[1]) * 3)))
            types.append(parts[2])
    return root / "images", names, np.asarray(labels, dtype=np.int64), types


def demo_params(labeled_fraction: float, seed: int, test_fraction: float) -> dict:
    return {"dataset": "elpv", "labeled_fraction": labeled_fraction, "seed": seed,
            "test_fraction": test_fraction}


def write_demo(out: Path, labeled_fraction: float = 0.2, seed: int = 0,
               test_fraction: float = 0.25, limit: Optional[int] = None,
               test_seed: Optional[int] = None) -> dict:
    """Materialise the demo data in ``out``; returns the counts.  Deterministic for a seed.

    ``limit`` keeps a stratified subset of that many images (for fast tests).  ``test_seed``
    (default: ``seed``) fixes the held-out split on its own, so benchmarks can vary the labeled
    subset over seeds while scoring every variant on the same test images.
    """
    if not 0 < labeled_fraction <= 1:
        raise UserError(f"--labeled-fraction must be in (0, 1], got {labeled_fraction}")
    if not 0 < test_fraction < 1:
        raise UserError(f"test fraction must be in (0, 1), got {test_fraction}")
    out = Path(out)
    params = demo_params(labeled_fraction, seed, test_fraction) | ({"limit": limit} if limit else {})
    if test_seed is not None and test_seed != seed:
        params["test_seed"] = test_seed
    test_seed = seed if test_seed is None else test_seed
    manifest = out / "demo.json"
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        try:
            doc = json.loads(manifest.read_text()) if manifest.is_file() else {}
        except ValueError:
            doc = {}
        if isinstance(doc, dict) and doc.get("params") == params and "counts" in doc:
            return doc["counts"]
        raise UserError(f"{out} exists and is not empty; choose another directory (nothing was changed)")
    from semivit.safe_io import check_writable_dir

    check_writable_dir(out, f"the demo data {out}")  # a read-only place: one line before any image is written

    from sklearn.model_selection import train_test_split  # slow import: not on the error paths

    src, names, labels, types = elpv_index()
    idx = np.arange(len(names))
    try:
        if limit is not None and limit < len(idx):
            idx, _ = train_test_split(idx, train_size=limit, stratify=labels, random_state=seed)
        pool, test = train_test_split(idx, test_size=test_fraction, stratify=labels[idx], random_state=test_seed)
        if labeled_fraction >= 1:
            labeled, unlabeled = pool, np.array([], dtype=np.int64)
        else:
            labeled, unlabeled = train_test_split(pool, train_size=labeled_fraction,
                                                  stratify=labels[pool], random_state=seed)
    except ValueError as e:  # sklearn: a class too small to stratify
        raise UserError(f"cannot split the demo data this finely ({str(e).splitlines()[0]})") from None
    n_classes = len(CLASS_NAMES)
    for split, members in (("train", labeled), ("test", test)):
        missing = [CLASS_NAMES[k] for k in range(n_classes) if k not in set(labels[members].tolist())]
        if missing:  # a class folder absent from train/ would silently shrink the class list
            raise UserError(f"the demo split leaves {split}/ without {', '.join(missing)}: "
                            f"raise the limit or the labeled fraction")

    staging = out.parent / f".{out.name}.partial"
    if staging.exists():
        shutil.rmtree(staging)
    for split, members in (("train", labeled), ("test", test)):
        for i in sorted(members):
            dst = staging / split / CLASS_NAMES[labels[i]] / names[i]
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / names[i], dst)
    (staging / "unlabeled").mkdir(parents=True, exist_ok=True)
    with open(staging / "unlabeled_truth.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "label", "cell_type"])
        for i in sorted(unlabeled):
            shutil.copyfile(src / names[i], staging / "unlabeled" / names[i])
            w.writerow([f"unlabeled/{names[i]}", CLASS_NAMES[labels[i]], types[i]])

    def per_class(members) -> dict:
        c = np.bincount(labels[members], minlength=4) if len(members) else np.zeros(4, int)
        return {CLASS_NAMES[k]: int(c[k]) for k in range(4)}

    counts = {"train": per_class(labeled), "test": per_class(test), "unlabeled": per_class(unlabeled)}
    (staging / "LICENSE.txt").write_text(LICENSE + "\n")
    atomic_write_json(staging / "demo.json", {"params": params, "counts": counts, "license": LICENSE})
    out.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():  # out is empty: move the finished tree in
        os.replace(entry, out / entry.name)
    staging.rmdir()
    return counts


def default_data_dir(seed: int = 0, labeled_fraction: float = 0.2) -> Path:
    """Where ``ssl train`` with no DATA materialises the demo data (a per-user cache)."""
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "semivit"
    return base / f"elpv-demo-f{labeled_fraction:g}-s{seed}"


def ensure_default_data(seed: int = 0, labeled_fraction: float = 0.2) -> Path:
    out = default_data_dir(seed, labeled_fraction)
    write_demo(out, labeled_fraction=labeled_fraction, seed=seed)
    return out
