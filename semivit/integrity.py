"""The sha256 check of an export: what ``meta.json`` recorded is what is served.

``ssl export`` records in EXPORT/meta.json the sha256 of every file of the export (``files``) and
the sha256 of meta.json's own content (``meta_sha256``: of the document without that key, as
canonical JSON - sorted keys, no spaces, ASCII).  Before anything is served or called up to date:

- meta.json must match its ``meta_sha256``: a renamed or removed class, a changed ``img_size``,
  any edit is refused (a silently renamed label, or probabilities under the wrong columns, would
  be far worse than an error);
- a graph (or engine) must match its entry in ``files`` when it is loaded - each file is hashed
  once, right before its first use, so a level that is never used costs nothing.

A mismatch is one line naming the file, exit 2; ``ssl export RUN --force`` rebuilds the export.
Exports made before ``meta_sha256`` existed are served with a warning (their graphs are still
checked against ``files``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from semivit.errors import UserError

META_SHA = "meta_sha256"


class ExportTampered(UserError):
    """A file of an export does not match the sha256 that meta.json recorded."""


def meta_digest(doc: dict) -> str:
    """sha256 of the canonical JSON of ``doc`` without its ``meta_sha256``."""
    body = {k: v for k, v in doc.items() if k != META_SHA}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def seal(doc: dict) -> dict:
    """``doc`` with its ``meta_sha256`` set (computed on the document as JSON will read it back)."""
    body = json.loads(json.dumps({k: v for k, v in doc.items() if k != META_SHA}, default=str))
    return {**body, META_SHA: meta_digest(body)}


def _fix(export_dir: Path) -> str:
    return "it was changed or damaged after the export; rebuild it with `ssl export RUN --force`"


def check_meta(export_dir: Path, doc: dict) -> bool:
    """Raise :class:`ExportTampered` if meta.json's content does not match its recorded sha256.
    Returns False (nothing to check against) for an export written before the field existed."""
    want = doc.get(META_SHA)
    if want is None:
        return False
    if meta_digest(doc) != want:
        raise ExportTampered(f"{Path(export_dir) / 'meta.json'}: its content does not match the sha256 it "
                             f"recorded ({META_SHA}); refusing it - {_fix(export_dir)}")
    return True


def _sha256(path: Path) -> str:
    from semivit.utils import sha256_file

    return sha256_file(path)


def check_files(export_dir: Path, doc: dict, names: Optional[Iterable[str]] = None) -> None:
    """Raise :class:`ExportTampered` naming the first file (of ``names``, default all of
    ``files``; a graph's external-data files go with it) whose sha256 differs from meta.json."""
    export_dir = Path(export_dir)
    recorded = doc.get("files") or {}
    if names is None:
        wanted = list(recorded)
    else:
        names = list(names)
        wanted = [rel for rel in recorded if any(rel == n or rel.startswith(n + ".") for n in names)]
    for rel in wanted:
        p = export_dir / rel
        if not p.is_file():
            raise ExportTampered(f"{p} is listed in meta.json but missing; {_fix(export_dir)}")
        if _sha256(p) != recorded[rel]:
            raise ExportTampered(f"{p}: sha256 does not match the one meta.json recorded; refusing to "
                                 f"use it - {_fix(export_dir)}")
