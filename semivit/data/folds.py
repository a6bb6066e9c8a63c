"""Stratified K-fold splits, saved to RUN/folds.json and reused on resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from sklearn.model_selection import StratifiedKFold

from semivit.data.layout import LabeledSet
from semivit.errors import UserError
from semivit.utils import atomic_write_json, read_json


def make_folds(labels: np.ndarray, n_folds: int, seed: int) -> np.ndarray:
    """Fold index per sample (stratified, shuffled with ``seed``)."""
    counts = np.bincount(labels)
    if len(labels) < n_folds:
        raise UserError(f"{len(labels)} labeled images cannot make {n_folds} folds")
    fold = np.empty(len(labels), dtype=np.int64)
    # StratifiedKFold needs every class to have >= n_splits members to stratify perfectly; it
    # still works (with a warning) otherwise.  We silence that warning and say it once ourselves.
    import warnings

    if counts.max() < n_folds:  # StratifiedKFold raises a bare ValueError for this
        raise UserError(f"every class has fewer than {n_folds} labeled images: "
                        f"cannot make {n_folds} stratified folds (lower cv.folds)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        skf = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        for k, (_, val) in enumerate(skf.split(np.zeros(len(labels)), labels)):
            fold[val] = k
    if counts[counts > 0].min() < n_folds:
        from semivit.utils import warn

        warn(f"a class has fewer than {n_folds} labeled images: some folds validate without it")
    return fold


def load_or_make(path: Path, ls: LabeledSet, n_folds: int, seed: int) -> np.ndarray:
    """Reuse RUN/folds.json when it describes exactly these images; otherwise create it."""
    path = Path(path)
    rel = [ls.rel(i) for i in range(len(ls))]
    if path.is_file():
        try:
            doc = read_json(path)
            saved = {item["image"]: item for item in doc["items"]}
            same = (doc.get("folds") == n_folds and set(saved) == set(rel)
                    and all(saved[r]["label"] == ls.classes[int(y)] for r, y in zip(rel, ls.labels)))
            fold = np.asarray([saved[r]["fold"] for r in rel], dtype=np.int64) if same else None
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError is a ValueError
            raise UserError(f"{path} is not a valid folds file ({type(e).__name__}: {e})") from None
        if fold is None:
            raise UserError(
                f"{path} was made for other data, other labels or another cv.folds; "
                "use a new --out directory"
            )
        return fold
    fold = make_folds(ls.labels, n_folds, seed)
    doc = {
        "folds": n_folds,
        "seed": seed,
        "classes": ls.classes,
        "items": [
            {"image": r, "label": ls.classes[int(y)], "fold": int(f)}
            for r, y, f in zip(rel, ls.labels, fold)
        ],
    }
    atomic_write_json(path, doc)
    return fold
