"""The inbox state: REGISTRY/inbox.sqlite records every inbox image by content (sha256) and path.

- ``images`` - one row per distinct CONTENT (sha256).  A file copied to a second path, or seen
  again on the next refresh, is the same row: counted once.  ``state``:
    new             ingested, not yet looked at by a model
    pseudo_labeled  accepted pseudo-label (label, confidence, source, probs, labeled_by version),
                    not yet trained on
    used            trained on; ``used_in`` = the last version whose training included it (every
                    later retrain includes all accepted pseudo-labels again), table ``trained``
                    lists them all
    rejected        not accepted: ``reason`` says why - "unconfident" (below the threshold and not
                    in a pure cluster core; looked at again once another version is current) or
                    "undecodable: ..." (final for that content)
- ``paths`` - path (as text by semivit.safe_io.path_text, so names that are not UTF-8 are kept
  too) -> sha256 with the size and mtime seen; a file that changes under the same
  name gets a new hash, i.e. it is NEW content (the old content's row stays as it was).

Inbox files are only ever opened for reading, and without blocking (safe_io.open_regular: a FIFO
named x.png is skipped, never waited on): never moved, renamed, modified or deleted.
Every change is one SQLite transaction (WAL mode, synchronous=FULL), so a process killed at any
point leaves the last committed state, and the next refresh carries on from it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

from semivit.data.discover import discover_images
from semivit.errors import UserError
from semivit.refresh.lock import kill_point
from semivit.safe_io import path_text, text_path
from semivit.utils import sha256_file

STATES = ("new", "pseudo_labeled", "used", "rejected")
SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    sha256 TEXT PRIMARY KEY,
    state TEXT NOT NULL CHECK (state IN ('new', 'pseudo_labeled', 'used', 'rejected')),
    label TEXT, confidence REAL, source TEXT, probs TEXT,
    labeled_by TEXT, used_in TEXT, reason TEXT,
    size INTEGER, first_seen REAL NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS paths (
    path TEXT PRIMARY KEY,
    sha256 TEXT NOT NULL REFERENCES images(sha256),
    size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, last_seen REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS paths_sha ON paths(sha256);
CREATE INDEX IF NOT EXISTS images_state ON images(state);
CREATE TABLE IF NOT EXISTS trained (
    sha256 TEXT NOT NULL REFERENCES images(sha256), version TEXT NOT NULL,
    PRIMARY KEY (sha256, version)
);
"""


@dataclass
class IngestStats:
    files: int = 0  # image files found in the inbox
    unchanged: int = 0  # path already known with the same size and mtime
    new_content: int = 0  # content never seen before (new rows in images)
    duplicates: int = 0  # new or changed path whose content was already known
    changed: int = 0  # known path whose content changed (counted in new_content or duplicates)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Accepted:
    sha256: str
    label: str
    confidence: float
    source: str
    probs: Optional[list]
    labeled_by: str
    state: str
    path: Optional[Path]  # a path whose current content is this sha256 (None: gone)


class Inbox:
    def __init__(self, registry: Path):
        self.path = Path(registry) / "inbox.sqlite"
        self.conn = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as e:  # e.g. "file is not a database": say which file, one line
            self.conn.close()
            raise UserError(f"{self.path} is not a usable SQLite database ({e}); it is the inbox state: restore "
                            "it from a backup or move it aside (the next refresh re-ingests the inbox)") from None
        self.conn.execute("PRAGMA synchronous=FULL")
        self.conn.execute("PRAGMA foreign_keys=ON")
        with self.tx() as c:  # (executescript would COMMIT first: one statement at a time instead)
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Inbox":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def tx(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        self.conn.execute("COMMIT")

    # ------------------------------------------------------------ ingest

    def ingest(self, inbox: Path, batch: int = 256) -> IngestStats:
        """Record every image file under ``inbox`` (recursively; hidden files skipped)."""
        inbox = Path(inbox)
        if not inbox.is_dir():
            raise UserError(f"inbox directory not found: {inbox}")
        files = discover_images(inbox).files
        st = IngestStats(files=len(files))
        for start in range(0, len(files), batch):
            with self.tx() as c:
                for p in files[start:start + batch]:
                    self._ingest_one(c, p.resolve(), st)
            kill_point("ingest")
        return st

    def _ingest_one(self, c: sqlite3.Connection, p: Path, st: IngestStats) -> None:
        try:
            s = os.stat(p)
        except OSError:  # vanished between the listing and now
            return
        if not stat.S_ISREG(s.st_mode):  # a FIFO/socket/device named like an image: never opened
            return
        now = time.time()
        key = path_text(str(p))  # paths are stored as text by the one reversible rule (safe_io)
        row = c.execute("SELECT sha256, size, mtime_ns FROM paths WHERE path = ?", (key,)).fetchone()
        if row and row["size"] == s.st_size and row["mtime_ns"] == s.st_mtime_ns:
            st.unchanged += 1
            return
        try:
            sha = sha256_file(p)
        except OSError:
            return
        if row and row["sha256"] == sha:  # touched, same bytes
            c.execute("UPDATE paths SET size = ?, mtime_ns = ?, last_seen = ? WHERE path = ?",
                      (s.st_size, s.st_mtime_ns, now, key))
            st.unchanged += 1
            return
        st.changed += bool(row)
        if c.execute("SELECT 1 FROM images WHERE sha256 = ?", (sha,)).fetchone():
            st.duplicates += 1
        else:
            c.execute("INSERT INTO images (sha256, state, size, first_seen, updated) VALUES (?, 'new', ?, ?, ?)",
                      (sha, s.st_size, now, now))
            st.new_content += 1
        c.execute("INSERT INTO paths (path, sha256, size, mtime_ns, last_seen) VALUES (?, ?, ?, ?, ?) "
                  "ON CONFLICT(path) DO UPDATE SET sha256 = excluded.sha256, size = excluded.size, "
                  "mtime_ns = excluded.mtime_ns, last_seen = excluded.last_seen",
                  (key, sha, s.st_size, s.st_mtime_ns, now))

    # ------------------------------------------------------------ lookups

    def locate(self, sha: str) -> Optional[Path]:
        """A path whose CURRENT content is ``sha`` (size and mtime as recorded, else re-hashed)."""
        for r in self.conn.execute("SELECT path, size, mtime_ns FROM paths WHERE sha256 = ? ORDER BY path", (sha,)):
            p = Path(text_path(r["path"]))
            try:
                s = os.stat(p)
            except OSError:
                continue
            if (s.st_size, s.st_mtime_ns) == (r["size"], r["mtime_ns"]):
                return p
            try:
                if sha256_file(p) == sha:
                    return p
            except OSError:
                continue
        return None

    def to_label(self, current: str) -> list[tuple[str, Optional[Path]]]:
        """Content to pseudo-label now: new rows, and unconfident rejections made by another version."""
        rows = self.conn.execute(
            "SELECT sha256 FROM images WHERE state = 'new' OR (state = 'rejected' AND reason = 'unconfident' "
            "AND (labeled_by IS NULL OR labeled_by != ?)) ORDER BY first_seen, sha256", (current,)).fetchall()
        return [(r["sha256"], self.locate(r["sha256"])) for r in rows]

    def accepted(self) -> list[Accepted]:
        rows = self.conn.execute("SELECT * FROM images WHERE state IN ('pseudo_labeled', 'used') "
                                 "ORDER BY first_seen, sha256").fetchall()
        return [Accepted(r["sha256"], r["label"], float(r["confidence"]), r["source"],
                         json.loads(r["probs"]) if r["probs"] else None, r["labeled_by"], r["state"],
                         self.locate(r["sha256"])) for r in rows]

    def counts(self) -> dict[str, int]:
        out = {s: 0 for s in STATES}
        for r in self.conn.execute("SELECT state, COUNT(*) AS n FROM images GROUP BY state"):
            out[r["state"]] = r["n"]
        out["paths"] = self.conn.execute("SELECT COUNT(*) FROM paths").fetchone()[0]
        return out

    def pending(self) -> int:
        """Accepted pseudo-labels not trained on yet (what --min-new counts)."""
        return self.conn.execute("SELECT COUNT(*) FROM images WHERE state = 'pseudo_labeled'").fetchone()[0]

    def row(self, sha: str) -> Optional[dict]:
        r = self.conn.execute("SELECT * FROM images WHERE sha256 = ?", (sha,)).fetchone()
        return dict(r) if r else None

    # ------------------------------------------------------------ updates

    def record_labels(self, version: str, accepted: list[dict], rejected: list[tuple[str, str]]) -> None:
        """One transaction: accepted [{sha256, label, confidence, source, probs}], rejected [(sha, reason)]."""
        now = time.time()
        with self.tx() as c:
            for a in accepted:
                c.execute("UPDATE images SET state = 'pseudo_labeled', label = ?, confidence = ?, source = ?, "
                          "probs = ?, labeled_by = ?, reason = NULL, updated = ? WHERE sha256 = ? "
                          "AND state IN ('new', 'rejected')",
                          (a["label"], float(a["confidence"]), a["source"], json.dumps(a.get("probs")),
                           version, now, a["sha256"]))
            for sha, reason in rejected:
                c.execute("UPDATE images SET state = 'rejected', reason = ?, labeled_by = ?, label = NULL, "
                          "confidence = NULL, source = NULL, probs = NULL, updated = ? WHERE sha256 = ? "
                          "AND state IN ('new', 'rejected')", (reason, version, now, sha))

    def mark_used(self, version: str, shas: list[str]) -> int:
        """After ``version`` was built from these pseudo-labels (idempotent)."""
        now = time.time()
        with self.tx() as c:
            n = 0
            for sha in shas:
                c.execute("INSERT OR IGNORE INTO trained (sha256, version) VALUES (?, ?)", (sha, version))
                n += c.execute("UPDATE images SET state = 'used', used_in = ?, updated = ? WHERE sha256 = ? "
                               "AND state IN ('pseudo_labeled', 'used')", (version, now, sha)).rowcount
        return n

    def check(self) -> list[str]:
        """Consistency problems (empty: consistent)."""
        c = self.conn
        problems = []
        if c.execute("PRAGMA integrity_check").fetchone()[0] != "ok":
            problems.append("inbox.sqlite fails PRAGMA integrity_check")
        if c.execute("PRAGMA foreign_key_check").fetchall():
            problems.append("inbox.sqlite has dangling path or trained rows")
        n = c.execute("SELECT COUNT(*) FROM images WHERE state IN ('pseudo_labeled', 'used') AND "
                      "(label IS NULL OR confidence IS NULL OR labeled_by IS NULL)").fetchone()[0]
        if n:
            problems.append(f"{n} accepted pseudo-labels without label/confidence/version")
        n = c.execute("SELECT COUNT(*) FROM images WHERE state = 'used' AND used_in IS NULL").fetchone()[0]
        if n:
            problems.append(f"{n} used images without a version")
        return problems
