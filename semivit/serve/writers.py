"""Prediction writers: rows streamed to a temporary file beside the output, renamed into place
only when the run ends normally (a killed run leaves a hidden ``.NAME.*.tmp``, never a
half-written NAME).

Formats (every file gets exactly one row/entry, in sorted path order; a path is written as text by
the one rule of :func:`semivit.safe_io.path_text`, so every row is one line and names that are not
UTF-8 round-trip):

csv     path,label,confidence,p_<class>...,status,level,error
        path: relative to DIR (POSIX); label/confidence/p_*: empty unless status is ok;
        status: ok | error | timeout; level: the degradation level that predicted it (ok rows);
        error: the reason (error rows) - probabilities are written with 6 decimals.
json    {"format", "classes", "predictions": [{path, status, label, confidence,
        probs: {class: p}, level, error}], "summary": {...}} (null where a csv cell is empty)
kaggle  id,label - id is the path relative to DIR, label is empty for error/timeout rows
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from semivit.errors import UserError
from semivit.safe_io import check_output_file
from semivit.utils import fsync_dir

FORMATS = ("csv", "json", "kaggle")
STATUSES = ("ok", "error", "timeout")


@dataclass
class Row:
    path: str
    status: str
    label: Optional[str] = None
    confidence: Optional[float] = None
    probs: Optional[np.ndarray] = None
    level: Optional[str] = None
    error: Optional[str] = None


def check_output(out: Path, force: bool) -> Path:
    """Refuse an existing output without ``force``, and an unwritable place (before any work is done)."""
    return check_output_file(out, force)


class _CsvRows:
    """``csv.writer`` quotes a field only for the characters of its lineterminator ("\n" here), so a
    bare "\r" (in a class name or an error text) would pass unquoted and split the row for most
    readers: a row holding one is written with every field quoted (still RFC 4180)."""

    def __init__(self, f):
        self.plain = csv.writer(f, lineterminator="\n")
        self.quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(self, row) -> None:
        (self.quoted if any("\r" in str(x) for x in row) else self.plain).writerow(row)


class Writer:
    """Base: a temporary file beside ``out``; ``commit()`` renames it into place, ``abort()`` removes it."""

    def __init__(self, out: Path, classes: Sequence[str]):
        self.out = Path(out)
        self.classes = list(classes)
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create the output directory {self.out.parent}: {e.strerror}") from None
        fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent)
        self.tmp = Path(tmp)
        # backslashreplace: a stray undecodable character in an error text cannot fail the run
        self.f = os.fdopen(fd, "w", newline="", encoding="utf-8", errors="backslashreplace")
        self.rows = 0
        self._open()
        self.f.flush()

    def write(self, row: Row) -> None:
        with self._naming():
            self._write(row)
        self.rows += 1

    def flush(self) -> None:
        with self._naming():
            self.f.flush()

    def _naming(self):
        """A full disk (ENOSPC, EDQUOT, EFBIG) is reported for the output it hit, not a temp file."""
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            try:
                yield
            except OSError as e:
                if e.filename is not None:
                    raise
                raise OSError(e.errno, e.strerror, str(self.out)) from None

        return ctx()

    def commit(self, summary: Optional[dict] = None) -> None:
        with self._naming():
            self._close(summary or {})
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(self.tmp, 0o666 & ~mask)
        os.replace(self.tmp, self.out)
        fsync_dir(self.out.parent)

    def abort(self) -> None:
        try:
            self.f.close()
        except OSError:  # the buffer cannot be flushed (the full disk that made us abort): drop it
            pass
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is not None or not self.f.closed:
            self.abort()

    # to implement
    def _open(self) -> None: ...
    def _write(self, row: Row) -> None: ...
    def _close(self, summary: dict) -> None: ...


def _num(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.6f}"


class CsvWriter(Writer):
    def _open(self):
        self.w = _CsvRows(self.f)
        self.w.writerow(["path", "label", "confidence", *[f"p_{c}" for c in self.classes], "status", "level", "error"])

    def _write(self, r: Row):
        probs = [_num(float(p)) for p in r.probs] if r.probs is not None else [""] * len(self.classes)
        self.w.writerow([r.path, r.label or "", _num(r.confidence), *probs, r.status, r.level or "", r.error or ""])


class KaggleWriter(Writer):
    def _open(self):
        self.w = _CsvRows(self.f)
        self.w.writerow(["id", "label"])

    def _write(self, r: Row):
        self.w.writerow([r.path, r.label or ""])


class JsonWriter(Writer):
    def _open(self):
        self.f.write('{"format": "semivit-predictions/1", "classes": ' + json.dumps(self.classes)
                     + ',\n"predictions": [')

    def _write(self, r: Row):
        doc = {"path": r.path, "status": r.status, "label": r.label,
               "confidence": None if r.confidence is None else round(float(r.confidence), 6),
               "probs": None if r.probs is None else {c: round(float(p), 6) for c, p in zip(self.classes, r.probs)},
               "level": r.level, "error": r.error}
        self.f.write(("\n" if self.rows == 0 else ",\n") + json.dumps(doc))

    def _close(self, summary: dict):
        self.f.write('\n],\n"summary": ' + json.dumps(summary, default=str) + "}\n")


WRITERS = {"csv": CsvWriter, "json": JsonWriter, "kaggle": KaggleWriter}


def check_format(fmt: str) -> str:
    """The one check of an output format name (``ssl predict`` asks it before anything runs)."""
    if fmt not in WRITERS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return fmt


def open_writer(fmt: str, out: Path, classes: Sequence[str]) -> Writer:
    return WRITERS[check_format(fmt)](out, classes)
