"""The data directory layout (see DESIGN.md): labeled images, the unlabeled pool, the test split.

```
DATA/train/<class>/*      labeled images (class = folder)
DATA/labels.csv           alternative: columns image,label (paths relative to DATA)
DATA/unlabeled/**         unlabeled images, any depth (optional)
DATA/test/<class>/*       optional held-out labeled images (only `ssl eval` reads them)
```
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from semivit.data.discover import discover_images, is_image_name
from semivit.errors import UserError
from semivit.safe_io import path_text
from semivit.utils import warn


@dataclass
class LabeledSet:
    root: Path  # paths are reported relative to this
    paths: list[Path]  # absolute
    labels: np.ndarray  # int64 class indices
    classes: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def rel(self, i: int) -> str:
        return _rel(self.paths[i], self.root)

    def counts(self) -> list[int]:
        return np.bincount(self.labels, minlength=len(self.classes)).tolist()

    def subset(self, idx: Sequence[int]) -> "LabeledSet":
        idx = list(idx)
        return LabeledSet(self.root, [self.paths[i] for i in idx], self.labels[idx], self.classes)


def _rel(path: Path, root: Path) -> str:
    """The path relative to ``root`` as text (semivit.safe_io.path_text: the one rule for paths in files)."""
    try:
        return path_text(Path(path).relative_to(root).as_posix())
    except ValueError:
        return path_text(str(path))


def _from_class_folders(folder: Path, root: Path, classes: Optional[list[str]],
                        require_all: bool = False) -> LabeledSet:
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"no class folders in {folder} (expected {folder}/<class_name>/<images>)")
    names = list(classes) if classes is not None else found
    unknown = [c for c in found if c not in names]
    if unknown:
        raise UserError(f"{folder} has class folders the model does not know: {', '.join(unknown)}")
    paths: list[Path] = []
    labels: list[int] = []
    empty: list[str] = []
    ignored = 0
    for name in found:
        disc = discover_images(folder / name)
        ignored += disc.ignored_other
        if not disc.files:
            empty.append(name)
        paths += disc.files
        labels += [names.index(name)] * len(disc.files)
    if not paths:
        raise UserError(f"no images found under {folder}")
    if empty and require_all:
        # A class with no images would get an infinite class-balanced weight and no stratum.
        raise UserError(f"class folder(s) without images in {folder}: {', '.join(empty)}")
    if ignored:
        warn(f"{folder}: {ignored} non-image files ignored")
    return LabeledSet(root, paths, np.asarray(labels, dtype=np.int64), names)


def _from_csv(csv_path: Path, root: Path, classes: Optional[list[str]]) -> LabeledSet:
    try:
        # utf-8-sig: spreadsheet exports start with a byte-order mark that would hide 'image'.
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames:
                reader.fieldnames = [(h or "").strip().lower() for h in reader.fieldnames]
            rows = list(reader)
            fields = set(reader.fieldnames or [])
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"cannot read {csv_path}: {e}") from None
    if not {"image", "label"} <= fields:
        raise UserError(f"{csv_path} must have columns 'image' and 'label' (has {', '.join(sorted(fields))})")
    if not rows:
        raise UserError(f"{csv_path} has no rows")
    paths, names = [], []
    seen: dict[Path, int] = {}
    for line, row in enumerate(rows, start=2):
        img, label = (row["image"] or "").strip(), (row["label"] or "").strip()
        if not img or not label:
            raise UserError(f"{csv_path} line {line}: empty image or label")
        p = (root / img) if not Path(img).is_absolute() else Path(img)
        if not p.is_file():
            raise UserError(f"{csv_path} line {line}: file not found: {img}")
        if not is_image_name(p.name):
            raise UserError(f"{csv_path} line {line}: not an image file name: {img}")
        key = p.resolve()
        if key in seen:  # the same image twice would sit in a training and a validation fold
            raise UserError(f"{csv_path} line {line}: {img} is already listed on line {seen[key]}")
        seen[key] = line
        paths.append(p)
        names.append(label)
    uniq = sorted(set(names))
    class_names = list(classes) if classes is not None else uniq
    unknown = [c for c in uniq if c not in class_names]
    if unknown:
        raise UserError(f"{csv_path} has labels the model does not know: {', '.join(unknown)}")
    labels = np.asarray([class_names.index(n) for n in names], dtype=np.int64)
    return LabeledSet(root, paths, labels, class_names)


def load_train(data: Path, labels_csv: str = "labels.csv") -> LabeledSet:
    """The labeled training images of DATA (labels.csv if present, else train/<class>/)."""
    data = Path(data)
    if not data.is_dir():
        raise UserError(f"data directory not found: {data}")
    csv_path = data / labels_csv
    if csv_path.is_file():
        if (data / "train").is_dir():
            warn(f"both {csv_path.name} and train/ exist in {data}: using {csv_path.name}")
        ls = _from_csv(csv_path, data, None)
    elif (data / "train").is_dir():
        ls = _from_class_folders(data / "train", data, None, require_all=True)
    else:
        raise UserError(f"{data} has neither train/<class>/ folders nor {labels_csv}")
    if len(ls.classes) < 2:
        raise UserError(f"need at least 2 classes, found {len(ls.classes)} in {data}")
    return ls


def load_eval(path: Path, classes: Optional[list[str]] = None, labels_csv: str = "labels.csv") -> LabeledSet:
    """Labeled images for evaluation: DIR/test/<class>/, else DIR/labels.csv, else DIR/<class>/.

    test/ comes first: in a DATA directory labels.csv holds the *training* labels, and scoring a
    model on its own training images is the mistake DESIGN.md warns about.
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"data directory not found: {path}")
    if (path / "test").is_dir():
        return _from_class_folders(path / "test", path, classes)
    if (path / labels_csv).is_file():
        return _from_csv(path / labels_csv, path, classes)
    return _from_class_folders(path, path, classes)


def unlabeled_pool(data: Path, max_items: Optional[int] = None, seed: int = 0) -> list[Path]:
    """Images under DATA/unlabeled/ (any depth); empty when the folder does not exist."""
    folder = Path(data) / "unlabeled"
    if not folder.is_dir():
        return []
    disc = discover_images(folder)
    if disc.ignored_other:
        warn(f"{folder}: {disc.summary()}")
    files = disc.files
    if max_items is not None and len(files) > max_items:
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.choice(len(files), size=max_items, replace=False))
        files = [files[i] for i in keep]
    return files


def read_truth(data: Path, truth_file: str) -> dict[str, str]:
    """Demo data only: {path relative to DATA: true class} for the unlabeled images, for scoring."""
    p = Path(data) / truth_file
    if not p.is_file():
        return {}
    with open(p, newline="") as f:
        return {row["image"]: row["label"] for row in csv.DictReader(f)}
