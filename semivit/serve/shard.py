"""``--shard I/N``: a deterministic part of the file list for one of N machines.

A file belongs to shard ``blake2b(relative path, 8 bytes) mod N``: it depends only on the file's
own path relative to DIR (POSIX separators), not on which other files exist, so N machines that
list the directory at slightly different times still never take the same file twice, and the
union of the N parts is the whole directory, each file exactly once.  I counts from 0.
"""

from __future__ import annotations

import hashlib
import re
from typing import Optional, Sequence

from semivit.errors import UserError


def parse_shard(spec: Optional[str]) -> Optional[tuple[int, int]]:
    if spec is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(spec))
    if not m:
        raise UserError(f"--shard must look like I/N (e.g. 0/4), not {spec!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1:
        raise UserError(f"--shard {spec}: N must be at least 1")
    if not 0 <= i < n:
        raise UserError(f"--shard {spec}: I counts from 0 and must be below N (0..{n - 1})")
    return i, n


def shard_of(rel_path: str, n: int) -> int:
    digest = hashlib.blake2b(rel_path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def select_shard(rel_paths: Sequence[str], shard: Optional[tuple[int, int]]) -> list[int]:
    """Indices (into ``rel_paths``, order kept) of the files in ``shard`` (all when None)."""
    if shard is None:
        return list(range(len(rel_paths)))
    i, n = shard
    return [k for k, p in enumerate(rel_paths) if shard_of(p, n) == i]
