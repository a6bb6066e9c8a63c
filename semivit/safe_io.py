"""Touching a shared file system safely: the rules every command follows.

- **Outputs** (:func:`check_output_file`, :func:`check_writable_dir`): an existing file, symlink
  (a dangling one included) or anything else at an output path is never replaced without
  ``--force``; a directory, a device or a FIFO never is, not even with ``--force``; and whether the
  output's directory accepts a new file is tried for real (a hidden probe file, created and
  removed) BEFORE any model is loaded or any work is done, so ``--out /proc/x.csv`` or a
  read-only mount fails at once with one line.
- **Path names as text** (:func:`path_text`, :func:`text_path`): file names are bytes on POSIX and
  need not be valid UTF-8, nor free of control characters.  Every CSV/JSON writer and the inbox
  database write a path as text by one reversible rule (documented in README.md, "Path names in
  outputs"): the name decoded as UTF-8 (``os.fsdecode``, surrogateescape), then ``\\`` becomes
  ``\\\\``, tab/newline/carriage return become ``\\t``/``\\n``/``\\r``, any other control character
  and every byte that is not UTF-8 become ``\\xNN``.  So every row is one physical line, the file
  is valid UTF-8, and ``text_path`` gives back the exact bytes.
- **Inputs** (:func:`open_regular`): opened with ``O_NONBLOCK`` and checked with ``fstat`` to be a
  regular file before a byte is read, so a FIFO, socket or device in an input directory is an
  error row, never a hang.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Union

from semivit.errors import UserError

PathLike = Union[str, bytes, os.PathLike]

# --------------------------------------------------------------------------- path names as text

_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_NEEDS = re.compile(r"[\\\x00-\x1f\x7f\udc80-\udcff]")
_UNESCAPE = re.compile(r"\\(\\|t|n|r|x[0-9a-fA-F]{2})")


def _escape(m: re.Match) -> str:
    c = m.group(0)
    if c in _ESCAPES:
        return _ESCAPES[c]
    code = ord(c)
    return f"\\x{code - 0xDC00 if code >= 0xDC80 else code:02x}"  # a surrogate-escaped byte, or a control


def path_text(path: PathLike) -> str:
    """The text written for ``path`` in CSV/JSON outputs (see the module docstring): valid UTF-8,
    one line, and reversible with :func:`text_path`.  Ordinary names come out unchanged."""
    return _NEEDS.sub(_escape, os.fsdecode(path))


def _unescape(m: re.Match) -> str:
    e = m.group(1)
    if e[0] == "x":
        code = int(e[1:], 16)
        return chr(0xDC00 + code) if code >= 0x80 else chr(code)
    return {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[e]


def text_path(text: str) -> str:
    """Inverse of :func:`path_text`: the name as Python holds it (surrogateescape), ready for
    ``Path()``/``open()``; ``os.fsencode`` of it gives the original bytes."""
    return _UNESCAPE.sub(_unescape, text)


# --------------------------------------------------------------------------- inputs

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def file_kind(mode: int) -> str:
    for test, name in _KINDS:
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


class NotRegularFile(OSError):
    """An input path that is a FIFO, socket, device or directory: refused without reading it."""


def open_regular(path: PathLike) -> BinaryIO:
    """Open ``path`` for reading without ever blocking in ``open()``: O_NONBLOCK, then ``fstat``
    on the open descriptor (no race with a rename in between) must say a regular file; only
    then is the descriptor switched back to blocking reads and returned as a binary file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(errno.EINVAL, f"not a regular file: it is {file_kind(st.st_mode)}", os.fsdecode(path))
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


# --------------------------------------------------------------------------- outputs

def _nearest_existing(path: Path) -> Path:
    for p in (path, *path.parents):
        if os.path.lexists(p):
            return p
    return Path(".")


def check_writable_dir(directory: Path, what: str) -> None:
    """Raise a one-line UserError unless a new file can be created in ``directory`` (or, when it
    does not exist yet, in its nearest existing ancestor, where it would be created).  Tried for
    real with a hidden probe file: ``os.access`` is wrong for root, read-only mounts, /proc, NFS."""
    directory = Path(directory)
    base = _nearest_existing(directory)
    if not base.is_dir():
        raise UserError(f"cannot write {what}: {base} is {file_kind(os.stat(base).st_mode) if base.exists() else 'a dangling symlink'}, not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".semivit-write-probe.", dir=base)
    except OSError as e:
        raise UserError(f"cannot write {what}: {base} does not accept new files ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(out: PathLike, force: bool, what: str = "--out") -> Path:
    """The one rule for every output FILE (predictions, eval report and its PNG, ...); call it
    before any work is done.  Returns ``out`` as a Path."""
    out = Path(out)
    if os.path.lexists(out):
        st = os.lstat(out)
        if stat.S_ISLNK(st.st_mode):
            target = os.readlink(out)
            if not out.exists():
                if not force:
                    raise UserError(f"{what} {out} is a dangling symlink (to {target}); use --force to replace "
                                    "the link with a new file")
            elif not force:
                raise UserError(f"{what} {out} already exists (a symlink to {target}); use --force to overwrite it")
            else:
                st = os.stat(out)
        if stat.S_ISDIR(st.st_mode):
            raise UserError(f"{what} {out} is a directory; give a file name")
        if out.exists() and not stat.S_ISREG(st.st_mode):
            raise UserError(f"{what} {out} is {file_kind(st.st_mode)}; not writing there, not even with --force")
        if not force:
            raise UserError(f"{what} {out} already exists (use --force to overwrite it)")
    check_writable_dir(out.parent, f"{what} {out}")
    return out
