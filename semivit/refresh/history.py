"""What every refresh did: REGISTRY/history.jsonl (one JSON object per line, appended and fsynced)
and REGISTRY/history.md (the same as a markdown table, rewritten atomically after each append).

Record fields (all optional but ``time`` and ``action``): action (refresh | register | promote |
rollback | recover | failed), ingested {files, new_content, duplicates, changed, unchanged},
labeled {looked_at, accepted, unconfident, undecodable, by_source}, pending (accepted pseudo-labels
not yet trained on), min_new, version, parent, val / holdout macro F1 (candidate, current),
decision (waiting | promoted | rejected | ...), reason, seconds, error.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from semivit.utils import atomic_write_text, fsync_dir


def append(registry: Path, record: dict) -> None:
    from semivit.refresh.registry import now_iso

    path = Path(registry) / "history.jsonl"
    record = {"time": now_iso(), **record}
    with open(path, "ab") as f:
        if f.tell() > 0:  # a line cut short by a kill: end it so the new record stays parseable
            with open(path, "rb") as r:
                r.seek(-1, os.SEEK_END)
                if r.read(1) != b"\n":
                    f.write(b"\n")
        f.write((json.dumps(record, default=str) + "\n").encode())
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(path.parent)
    write_markdown(registry)


def read(registry: Path) -> list[dict]:
    path = Path(registry) / "history.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut short by a kill
    return out


def has_decision(registry: Path, version: str) -> bool:
    return any(r.get("version") == version and r.get("decision") in ("promoted", "rejected")
               for r in read(registry))


def _f1(rec: dict, key: str) -> str:
    c = rec.get(key)
    if not c:
        return ""
    return f"{c['candidate']:.4f} vs {c['current']:.4f}"


def write_markdown(registry: Path) -> None:
    rows = read(registry)
    lines = ["# Refresh history", "",
             "Written by `ssl refresh` / `ssl models` (source of truth: history.jsonl).  Macro F1 columns: "
             "candidate vs the current version it was compared with.", "",
             "| time | action | inbox files (new) | pseudo-labeled now | pending | version | val macro F1 | "
             "holdout macro F1 | decision | seconds | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ing, lab = r.get("ingested") or {}, r.get("labeled") or {}
        note = r.get("error") or r.get("reason") or ""
        lines.append("| " + " | ".join(str(x).replace("|", "/").replace("\n", " ") for x in [
            r.get("time", ""), r.get("action", ""),
            f"{ing.get('files', '')} ({ing.get('new_content', '')})" if ing else "",
            lab.get("accepted", "") if lab else "", r.get("pending", ""),
            r.get("version", ""), _f1(r, "val"), _f1(r, "holdout"), r.get("decision", ""),
            r.get("seconds", ""), note[:160]]) + " |")
    atomic_write_text(Path(registry) / "history.md", "\n".join(lines) + "\n")
