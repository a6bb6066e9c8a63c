"""Find image files under a directory: recursive, case-insensitive extensions, hidden skipped."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from semivit.safe_io import path_text

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


@dataclass
class Discovery:
    files: list[Path]  # sorted, absolute
    ignored_hidden: int = 0  # hidden files and files under hidden directories
    ignored_other: int = 0  # files whose extension is not an image extension
    ignored_examples: list[str] = field(default_factory=list)

    @property
    def ignored(self) -> int:
        return self.ignored_hidden + self.ignored_other

    def summary(self) -> str:
        parts = [f"{len(self.files)} images"]
        if self.ignored_other:
            parts.append(f"{self.ignored_other} non-image files ignored")
        if self.ignored_hidden:
            parts.append(f"{self.ignored_hidden} hidden files ignored")
        return ", ".join(parts)


def is_image_name(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


def discover_images(root: Path, exclude: tuple[Path, ...] = ()) -> Discovery:
    """All image files under ``root`` (any depth), sorted by their path relative to ``root``.

    Hidden files and directories (a leading dot) are skipped and counted; so are files with a
    non-image extension.  Symlinked directories are not followed (no cycles).
    """
    root = Path(root)
    excluded = {Path(p).resolve() for p in exclude}
    files: list[Path] = []
    hidden = other = 0
    examples: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        keep = []
        for d in dirnames:
            if d.startswith("."):
                hidden += sum(len(f) for _, _, f in os.walk(here / d))
            elif (here / d).resolve() in excluded:
                continue
            else:
                keep.append(d)
        dirnames[:] = sorted(keep)
        for name in filenames:
            if name.startswith("."):
                hidden += 1
            elif is_image_name(name):
                files.append(here / name)
            else:
                other += 1
                if len(examples) < 3:
                    examples.append(path_text(str((here / name).relative_to(root))))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return Discovery(files, hidden, other, examples)
