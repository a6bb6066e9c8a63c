"""EXPORT/meta.json: what an export holds, where it came from, how it verified, and the sha256
of every file in it (meta.json itself excepted).

Keys a consumer can rely on (format ``semivit-export/1``): ``classes``, ``img_size``, ``mean``,
``std``, ``input``, ``outputs``, ``tta``, ``members`` (name, weight, val_macro_f1, stage, fold),
``levels`` (see :mod:`semivit.export.levels`), ``level_members``, ``verification`` (per level),
``int8`` (null or the INT8 report; ``int8.file`` is null when refused), ``tensorrt`` (null or the
engine.json fields), ``source_run``, ``opset``, ``exporter``, ``files`` ({relative path: sha256}),
``meta_sha256`` (of meta.json's own content; checked with the files by :mod:`semivit.integrity`
before an export is served or called up to date).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from semivit import integrity
from semivit.utils import atomic_write_json, read_format_json, read_json, sha256_file

EXPORT_FORMAT = "semivit-export/1"
META = "meta.json"


def _files(export_dir: Path) -> list[Path]:
    return sorted(p for p in Path(export_dir).rglob("*")
                  if p.is_file() and p.name != META and not any(part.startswith(".") for part in p.relative_to(export_dir).parts))


def file_hashes(export_dir: Path) -> dict[str, str]:
    export_dir = Path(export_dir)
    return {p.relative_to(export_dir).as_posix(): sha256_file(p) for p in _files(export_dir)}


def write_meta(export_dir: Path, doc: dict) -> dict:
    doc = integrity.seal({"format": EXPORT_FORMAT, **doc, "files": file_hashes(export_dir)})
    atomic_write_json(Path(export_dir) / META, doc)
    return doc


def read_meta(export_dir: Path) -> dict:
    path = Path(export_dir) / META
    doc = read_format_json(path, EXPORT_FORMAT, f"{export_dir} is not a semivit export (no {META}; run `ssl export RUN`)",
                           f"{path} is not a {EXPORT_FORMAT} file")
    integrity.check_meta(export_dir, doc)
    return doc


def check_files(export_dir: Path) -> list[str]:
    """Files whose sha256 differs from meta.json, or that are missing (empty list: all intact)."""
    doc = read_meta(export_dir)
    out = []
    for rel, digest in doc["files"].items():
        p = Path(export_dir) / rel
        if not p.is_file():
            out.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            out.append(f"{rel}: sha256 differs")
    return out


def refresh_hashes(export_dir: Path, names: Iterable[str]) -> None:
    """Re-hash ``names`` after a deliberate change (an engine rebuilt for this machine)."""
    path = Path(export_dir) / META
    if not path.is_file():
        return
    doc = read_json(path)
    for rel in names:
        p = Path(export_dir) / rel
        if p.is_file():
            doc["files"][rel] = sha256_file(p)
    if (Path(export_dir) / "engine.json").is_file():
        doc["tensorrt"] = read_json(Path(export_dir) / "engine.json")
    atomic_write_json(path, integrity.seal(doc))
