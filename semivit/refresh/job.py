"""``ssl refresh``: ingest the inbox, pseudo-label it with the current ensemble, retrain once enough
new pseudo-labels have accumulated, export, compare with the current version, promote or reject.

One refresh, step by step (each step is safe to kill; see docs/refresh.md):

1. refuse at once (exit 4, nothing changed) if less than ``min_free_mb`` is free;
2. take REGISTRY/refresh.lock (exit 3 with a message if another refresh holds it);
3. delete stale staging dirs (a killed build with the same inputs is resumed in step 7 instead);
   finish the decision of a candidate a killed refresh had published;
4. ingest: hash every inbox file into inbox.sqlite (new content, duplicates, changed files);
5. pseudo-label the new content with the current ensemble (labeling.py);
6. fewer than ``--min-new`` accepted pseudo-labels not yet trained on: stop here ("waiting");
7. otherwise build a candidate (build.py: retrain stage 3, export, evaluate) and publish it;
8. promote it if its macro F1 is within ``--tolerance`` of the current version's, else keep it
   as rejected with its numbers; record what was done in history.jsonl / history.md.

Exit codes: 0 done (whatever the decision), 1 unexpected error, 2 bad input (one-line message),
3 another refresh holds the lock, 4 not enough free disk space, 130 stopped by SIGINT/SIGTERM
before finishing (the next refresh redoes the unfinished part).  ``--every`` loops: a stop signal
ends the loop cleanly between steps (exit 0); a failed iteration is logged and retried next time.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Optional

from semivit.errors import UserError
from semivit.refresh import history
from semivit.refresh import registry as reg
from semivit.refresh.settings import load_settings
from semivit.refresh.build import apply_decision, build_candidate, candidate_config
from semivit.refresh.inbox import Inbox
from semivit.refresh.labeling import label_inbox
from semivit.refresh.lock import NO_STOP, FileLock, LowDiskSpace, RegistryBusy, StopFlag, StopRequested, check_disk
from semivit.utils import info, warn

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """'90s', '30m', '6h', '1d', '1h30m', '1.5h' -> seconds."""
    t = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd])", t)
    if not parts or re.sub(r"(\d+(?:\.\d+)?)\s*([smhd])", "", t).strip():
        raise UserError(f"--every: not a duration: '{text}' (use e.g. 90s, 30m, 6h, 1d)")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise UserError(f"--every must be positive, got '{text}'")
    return seconds


def recover(registry: Path, db: Inbox) -> list[dict]:
    """Finish the decision of candidates published by a refresh that was killed before deciding."""
    done = []
    for v in reg.versions(registry):
        man = reg.read_manifest(registry / v)
        dec = man.get("decision") or {}
        if man["status"] == "candidate" and dec and not dec.get("hold"):
            status = apply_decision(registry, v, db, {"action": "recover",
                                                      "note": "finished a refresh that was interrupted"})
            info(f"refresh: finished the interrupted decision on {v}: {status}")
            done.append({"version": v, "status": status})
    return done


def _check_inputs(registry: Path, inbox: Path, overrides: list[str]) -> tuple[Path, Path]:
    registry = reg.require_registry(registry)
    inbox = Path(inbox)
    if not inbox.is_dir():
        raise UserError(f"inbox directory not found: {inbox}")
    r, i = registry.resolve(), inbox.resolve()
    if r == i or i in r.parents:  # the versions' report/UMAP PNGs would be ingested as field images
        raise UserError(f"the registry {registry} is inside the inbox {inbox}: its own files would be read as "
                        "new images; keep them apart")
    cur = reg.require_current(registry)
    if not (registry / cur / "run" / "config.yaml").is_file():
        raise UserError(f"{registry}: the current version {cur} is not complete (no run/config.yaml); "
                        "promote a complete version with `ssl models promote VERSION`")
    candidate_config(registry / cur / "run", overrides)  # bad --set: fail before anything changes
    return registry, inbox


def refresh_once(registry: Path, inbox: Path, *, min_new: int = 50, tolerance: float = 0.0,
                 overrides: Optional[list[str]] = None, stop: StopFlag = NO_STOP) -> dict:
    """One refresh (the steps in the module doc).  Returns its history record."""
    overrides = list(overrides or [])
    registry, inbox = _check_inputs(registry, inbox, overrides)
    settings = load_settings(registry)
    check_disk(registry, 0, settings.min_free_mb, "a refresh")
    t0 = time.time()
    rec: dict = {"action": "refresh", "inbox": str(inbox.resolve()), "min_new": min_new, "tolerance": tolerance}
    with FileLock(registry / "refresh.lock", "refresh"), Inbox(registry) as db:
        try:
            cleaned = reg.clean_staging(registry, keep_prepared=True)
            if cleaned:
                info(f"refresh: removed {len(cleaned)} unfinished build(s) of a killed refresh: {', '.join(cleaned)}")
                rec["cleaned_staging"] = cleaned
            recovered = recover(registry, db)
            if recovered:
                rec["recovered"] = recovered
            cur = reg.current_version(registry)
            rec["current"] = cur
            cfg = candidate_config(registry / cur / "run", overrides)
            stop.check()
            steps = rec["step_seconds"] = {}
            t = time.time()
            ing = db.ingest(inbox)
            steps["ingest"] = round(time.time() - t, 2)
            rec["ingested"] = ing.as_dict()
            info(f"refresh: inbox {inbox}: {ing.files} image files, {ing.new_content} new, "
                 f"{ing.duplicates} duplicate content, {ing.changed} changed")
            stop.check()
            t = time.time()
            lab = label_inbox(db, registry / cur / "run", cur, cfg)
            steps["pseudo_label"] = round(time.time() - t, 2)
            rec["labeled"] = lab.as_dict()
            rec["pending"] = pending = db.pending()
            info(f"refresh: {cur} pseudo-labeled {lab.accepted} of {lab.looked_at} "
                 f"({', '.join(f'{k} {v}' for k, v in lab.by_source.items()) or 'none'}); "
                 f"{pending} new pseudo-labels waiting for training (--min-new {min_new})")
            if pending < min_new:
                reg.clean_staging(registry)  # nothing to resume a build for
                rec.update(decision="waiting", reason=f"{pending} new pseudo-labels < --min-new {min_new}",
                           seconds=round(time.time() - t0, 1))
                history.append(registry, rec)
                return rec
            stop.check()
            t = time.time()
            name = build_candidate(registry, cur, db, overrides, tolerance, settings, stop)
            steps.update(build=round(time.time() - t, 2),
                         **reg.read_manifest(registry / name).get("build", {}).get("step_seconds", {}))
            rec["seconds"] = round(time.time() - t0, 1)
            status = apply_decision(registry, name, db, rec)
            man = reg.read_manifest(registry / name)
            rec.update(version=name, decision=status, reason=man["status_history"][-1]["why"])
            info(f"refresh: {name} {status}: {rec['reason']}")
            return rec
        except BaseException as e:
            stopped = stop.as_stop(e)  # the stop signal, or a library's own error raised in its place
            if stopped is not None:
                rec.update(decision="stopped", reason=f"{stopped} before the refresh finished",
                           seconds=round(time.time() - t0, 1))
                history.append(registry, rec)
                if stopped is e:
                    raise
                raise stopped from e
            if not isinstance(e, Exception):  # KeyboardInterrupt outside a StopFlag, SystemExit
                raise
            rec.update(action="failed", error=f"{type(e).__name__}: {e}"[:500], seconds=round(time.time() - t0, 1))
            try:
                history.append(registry, rec)
            except OSError:
                pass
            raise


def refresh_cli(registry: Path, inbox: Path, every: Optional[str] = None, min_new: int = 50,
                tolerance: float = 0.0, overrides: Optional[list[str]] = None) -> int:
    overrides = list(overrides or [])
    period = parse_duration(every) if every else None
    _check_inputs(registry, inbox, overrides)
    with StopFlag() as stop:
        try:
            if period is None:
                refresh_once(registry, inbox, min_new=min_new, tolerance=tolerance, overrides=overrides, stop=stop)
                return 0
            info(f"refresh every {every} ({period:.0f}s, start to start) on {registry}; SIGINT/SIGTERM stops it")
            while True:
                start = time.monotonic()
                try:
                    refresh_once(registry, inbox, min_new=min_new, tolerance=tolerance, overrides=overrides,
                                 stop=stop)
                except (RegistryBusy, LowDiskSpace, UserError) as e:
                    warn(f"refresh skipped: {e}")
                except Exception as e:  # noqa: BLE001 - a scheduler keeps going; the next run retries
                    if os.environ.get("SEMIVIT_DEBUG"):
                        raise
                    warn(f"refresh failed: {type(e).__name__}: {e} (recorded in history.jsonl; retrying next time)")
                stop.sleep(max(0.0, period - (time.monotonic() - start)))
        except StopRequested as e:
            if period is None:
                warn(f"refresh stopped by {e}: the registry is consistent; the next refresh redoes the rest")
                return 130
            info(f"refresh loop stopped by {e}")
            return 0
