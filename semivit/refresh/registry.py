"""The model registry: numbered versions, an atomically switched ``current``, promotion history.

Layout (a contract shared with ``ssl predict --model REGISTRY``, see semivit/serve/resolve.py)::

    REGISTRY/
      current -> v0002          a RELATIVE symlink to the serving version.  Switched atomically:
                                a temporary symlink is created beside it and os.replace()d over
                                ``current`` (rename(2) is atomic), so a reader always sees the
                                old or the new version, never nothing and never a half state.
      v0001/                    a complete version; it never changes after it appears, except
        manifest.json           its manifest's status (atomic rewrite).  What it holds:
        run/                      a run directory (config.yaml, folds.json, stage1/, stage3/,
                                  ensemble.json, checkpoints) - the PyTorch ensemble;
        export/                   its export (model.onnx + meta.json) - what `ssl predict` serves.
      .staging/v0003-<pid>/     a version being built (invisible: hidden, not named vNNNN).  It is
                                renamed to REGISTRY/v0003 only when complete (run + export +
                                manifest written and fsynced), so a SIGKILL at any point leaves no
                                half-written version visible.  Stale staging dirs (a killed build)
                                are deleted by the next refresh or registration, under the lock -
                                except that a refresh resumes a killed build made from the very
                                same inputs (inputs.json), keeping its finished folds.
      promotions.json           the stack of promoted versions (rollback pops it), journaled
      registry.yaml             settings: holdout path, disk reserve, export options (settings.py)
      holdout/<class>/*         optional fixed labeled holdout (or `holdout:` in registry.yaml)
      inbox.sqlite              the inbox state (semivit/refresh/inbox.py), WAL mode
      history.jsonl, history.md what every refresh (and promote/rollback) did
      refresh.lock              flock held by the running refresh (pid + start time inside)
      switch.lock               flock held for the few milliseconds of a switch of ``current``

manifest.json: ``version``, ``status`` (candidate | promoted | rejected), ``parent``, ``created``,
``origin`` (register | refresh), ``data`` (labeled data, pseudo-labels used), ``metrics``
(validation macro F1 of the retrained members on the original folds, holdout macro F1),
``comparison`` + ``decision`` (refresh candidates), ``status_history``.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Optional

from semivit.errors import UserError
from semivit.refresh.lock import FileLock
from semivit.utils import atomic_write_json, fsync_dir, read_json

MANIFEST_FORMAT = "semivit-version/1"
STATUSES = ("candidate", "promoted", "rejected")
VERSION_RE = re.compile(r"^v(\d{4,})$")
STAGING = ".staging"


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def version_name(n: int) -> str:
    return f"v{n:04d}"


def parse_version(text: str) -> str:
    """'3', 'v3', 'v0003' -> 'v0003'."""
    m = re.fullmatch(r"v?0*(\d+)", str(text).strip())
    if not m:
        raise UserError(f"not a version name: '{text}' (expected e.g. v0003 or 3)")
    return version_name(int(m.group(1)))


def require_registry(registry: Path) -> Path:
    from semivit.kinds import require_registry as recognise

    registry = recognise(Path(registry))
    if not versions(registry) and current_version(registry) is None:
        raise UserError(f"{registry} holds no model versions (create the first one with "
                        f"`ssl train DATA --registry {registry}`)")
    return registry


# ---------------------------------------------------------------- versions and manifests

def versions(registry: Path) -> list[str]:
    """Visible versions (complete by construction), oldest first."""
    registry = Path(registry)
    if not registry.is_dir():
        return []
    names = [p.name for p in registry.iterdir() if VERSION_RE.match(p.name) and p.is_dir() and not p.is_symlink()]
    return sorted(names, key=lambda n: int(n[1:]))


def read_manifest(vdir: Path) -> dict:
    path = Path(vdir) / "manifest.json"
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT:
        raise UserError(f"{path} is not a semivit version manifest")
    return doc


def write_manifest(vdir: Path, doc: dict) -> None:
    atomic_write_json(Path(vdir) / "manifest.json", doc)


def set_status(registry: Path, version: str, status: str, why: str, **fields) -> dict:
    assert status in STATUSES, status
    vdir = Path(registry) / version
    doc = read_manifest(vdir)
    doc["status"] = status
    doc.update(fields)
    doc.setdefault("status_history", []).append({"time": now_iso(), "status": status, "why": why})
    write_manifest(vdir, doc)
    return doc


def next_version(registry: Path) -> str:
    """The next free number (also past any staging dir); call under the refresh lock."""
    nums = [int(v[1:]) for v in versions(registry)]
    staging = Path(registry) / STAGING
    if staging.is_dir():
        nums += [int(m.group(1)) for p in staging.iterdir() if (m := re.match(r"v(\d+)-", p.name))]
    return version_name(max(nums, default=0) + 1)


def clean_staging(registry: Path, keep_prepared: bool = False) -> list[str]:
    """Delete staging dirs (call under the refresh lock: only its holder builds versions, so any
    staging dir is a leftover of a killed build).  With ``keep_prepared``, a build that got as far
    as writing its inputs.json is kept for :func:`adopt_staging` to resume."""
    staging = Path(registry) / STAGING
    removed = []
    if staging.is_dir():
        for p in sorted(staging.iterdir()):
            if keep_prepared and (p / "inputs.json").is_file():
                continue
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


def new_staging(registry: Path) -> tuple[str, Path]:
    name = next_version(registry)
    d = Path(registry) / STAGING / f"{name}-{os.getpid()}"
    d.mkdir(parents=True)
    return name, d


def adopt_staging(registry: Path, inputs: dict) -> Optional[tuple[str, Path]]:
    """Resume a killed build made from exactly the same ``inputs`` (its inputs.json, written once
    its run directory was prepared): rename it to this process and return (name, dir).  Every
    other staging dir is deleted.  Finished folds (done.json) are then not trained again."""
    staging = Path(registry) / STAGING
    found = None
    if staging.is_dir():
        for p in sorted(staging.iterdir()):
            m = re.match(r"(v\d+)-\d+$", p.name)
            try:
                same = m is not None and read_json(p / "inputs.json") == inputs
            except (OSError, ValueError):
                same = False
            if same and found is None and m.group(1) not in versions(registry):
                dst = staging / f"{m.group(1)}-{os.getpid()}"
                if p != dst:
                    os.rename(p, dst)
                for tmp in dst.glob(".export.tmp-*"):  # a killed export's leftovers
                    shutil.rmtree(tmp, ignore_errors=True)
                found = (m.group(1), dst)
            else:
                shutil.rmtree(p, ignore_errors=True)
    return found


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(dirpath))


def publish(registry: Path, staging_dir: Path, name: str) -> Path:
    """Make a complete staging dir visible as REGISTRY/<name> with one rename."""
    registry = Path(registry)
    target = registry / name
    if target.exists():
        raise UserError(f"{target} already exists: refusing to overwrite a version")
    if not (staging_dir / "manifest.json").is_file():
        raise RuntimeError(f"{staging_dir} has no manifest: not complete")
    _fsync_tree(staging_dir)  # everything on disk before the rename makes it visible
    os.rename(staging_dir, target)
    fsync_dir(registry)
    fsync_dir(staging_dir.parent)
    return target


def link_or_copy_tree(src: Path, dst: Path, ignore=None, link: bool = True) -> None:
    """Copy a tree; with ``link`` hard-link the files (registry files are never modified in
    place, so versions can share them), falling back to a copy across file systems."""
    def copy(s, d):
        if link:
            try:
                os.link(s, d)
                return d
            except OSError:
                pass
        return shutil.copy2(s, d)

    shutil.copytree(src, dst, ignore=ignore, copy_function=copy, symlinks=False)


# ---------------------------------------------------------------- current and promotions

def current_version(registry: Path) -> Optional[str]:
    cur = Path(registry) / "current"
    if not cur.is_symlink():
        return None
    return Path(os.readlink(cur)).name


def require_current(registry: Path) -> str:
    """The current version, which must exist: one line for a missing or dangling ``current``."""
    registry = Path(registry)
    cur = current_version(registry)
    if cur is None:
        raise UserError(f"{registry} has no current version: promote one with "
                        f"`ssl models promote VERSION --registry {registry}`")
    if not (registry / cur).is_dir():
        raise UserError(f"{registry}: current points at {cur}, which does not exist (a dangling link); "
                        f"promote an existing version with `ssl models promote VERSION --registry {registry}`")
    return cur


def _switch_link(registry: Path, version: str) -> None:
    tmp = registry / f".current.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(version, tmp)  # relative: the registry can be moved or mounted elsewhere
    os.replace(tmp, registry / "current")
    fsync_dir(registry)


def _read_stack(registry: Path) -> dict:
    path = registry / "promotions.json"
    if not path.is_file():
        return {"stack": [], "pending": None}
    try:
        doc = read_json(path)
    except (OSError, ValueError) as e:
        doc = e
    if not isinstance(doc, dict) or not isinstance(doc.get("stack", []), list):
        raise UserError(f"{path} is damaged ({'not valid JSON' if isinstance(doc, Exception) else 'not a promotion journal'}); "
                        "current is unaffected - move the file aside and `ssl models promote` the serving version again")
    return doc


def promotion_stack(registry: Path) -> list[str]:
    """Promoted versions, oldest first; the last is current.  Repairs an interrupted switch:
    a ``pending`` entry is applied if ``current`` already shows its target, dropped otherwise."""
    registry = Path(registry)
    doc = _read_stack(registry)
    stack = list(doc.get("stack", []))
    cur = current_version(registry)
    pending = doc.get("pending")
    if pending:
        stack = list(pending["stack_after"]) if cur == pending["target"] else stack
    if cur is not None and (not stack or stack[-1] != cur):
        stack.append(cur)  # current was switched by hand: keep it as the top
    return stack


class CurrentChanged(Exception):
    """``current`` is not what the caller expected (someone switched it meanwhile)."""


def switch_current(registry: Path, version: str, *, rollback: bool = False,
                   expect: Optional[set] = None) -> tuple[Optional[str], str]:
    """Point ``current`` at ``version`` atomically; returns (previous, new).

    Journaled: promotions.json first records the intended stack as ``pending``, then the link
    is switched, then the stack is committed.  A kill between any two steps is repaired by
    :func:`promotion_stack`, which trusts ``current``.  With ``expect``, raise
    :class:`CurrentChanged` (and switch nothing) unless current is one of those versions.
    """
    registry = Path(registry)
    with FileLock(registry / "switch.lock", "switch of current", blocking=True):
        if not (registry / version / "manifest.json").is_file():
            raise UserError(f"{version} is not a complete version in {registry}")
        stack = promotion_stack(registry)
        prev = current_version(registry)
        if expect is not None and prev not in expect:
            raise CurrentChanged(f"current changed to {prev} while {version} was being built")
        if rollback:
            if len(stack) < 2 or stack[-2] != version:
                raise RuntimeError("rollback target is not the previous promotion")
            after = stack[:-1]
        else:
            after = stack + [version] if (not stack or stack[-1] != version) else stack
        atomic_write_json(registry / "promotions.json",
                          {"stack": stack, "pending": {"target": version, "stack_after": after, "time": now_iso()}})
        from semivit.refresh.lock import kill_point

        kill_point("switch")
        _switch_link(registry, version)
        kill_point("switched")
        atomic_write_json(registry / "promotions.json", {"stack": after, "pending": None})
    return prev, version


# ---------------------------------------------------------------- integrity

def check_version(vdir: Path, load_export: bool = True) -> list[str]:
    """Problems of one version dir (empty list: complete and loadable)."""
    vdir = Path(vdir)
    problems = []
    try:
        man = read_manifest(vdir)
        if man.get("version") != vdir.name:
            problems.append(f"{vdir.name}: manifest names {man.get('version')}")
        if man.get("status") not in STATUSES:
            problems.append(f"{vdir.name}: bad status {man.get('status')!r}")
    except UserError as e:
        problems.append(str(e))
    run = vdir / "run"
    ens = run / "ensemble.json"
    if not ens.is_file():
        problems.append(f"{vdir.name}: run/ensemble.json missing")
    else:
        try:
            for m in read_json(ens)["members"]:
                if not (run / m["path"]).is_file():
                    problems.append(f"{vdir.name}: member checkpoint {m['path']} missing")
        except (ValueError, KeyError) as e:
            problems.append(f"{vdir.name}: run/ensemble.json unreadable ({e})")
    exp = vdir / "export"
    for f in ("model.onnx", "meta.json"):
        if not (exp / f).is_file():
            problems.append(f"{vdir.name}: export/{f} missing")
    if load_export and not problems:
        try:
            from semivit.refresh.metrics import smoke_predict

            smoke_predict(vdir)
        except Exception as e:  # noqa: BLE001 - any failure to load is the finding
            problems.append(f"{vdir.name}: export does not load/predict ({type(e).__name__}: {e})")
    return problems


def check_registry(registry: Path, load_export: bool = True, all_versions: bool = False) -> list[str]:
    """Integrity check: ``current`` points at a complete version whose files exist and whose
    export loads and predicts; every visible version is complete; no stray temporary link."""
    registry = Path(registry)
    problems = []
    cur_link = registry / "current"
    if not cur_link.is_symlink():
        problems.append("current is missing or not a symlink")
    else:
        target = os.readlink(cur_link)
        if "/" in target or not VERSION_RE.match(target):
            problems.append(f"current points outside the registry's versions: {target}")
        elif not (registry / target).is_dir():
            problems.append(f"current points at {target}, which does not exist")
        else:
            problems += check_version(registry / target, load_export=load_export)
    for v in versions(registry):
        if v != current_version(registry):
            problems += check_version(registry / v, load_export=load_export and all_versions)
    stack = promotion_stack(registry)
    if stack and stack[-1] != current_version(registry):
        problems.append(f"promotion history ends at {stack[-1]}, current is {current_version(registry)}")
    return problems
