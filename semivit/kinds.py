"""What a directory is: the one recogniser for semivit runs and registries, by their format tags.

Nothing is taken for a semivit directory because of a file NAME alone (a ``config.yaml`` or a
``history.md`` is common in other teams' folders): a run is recognised by ``format:
semivit-run/1`` in RUN/config.yaml, a registry by ``format: semivit-registry/1`` in
REGISTRY/registry.yaml.  Runs and registries written before the tags existed are recognised by
their structure instead (a run: ``config:`` and ``versions:`` mappings; a registry: a ``current``
symlink to, or a ``vNNNN/manifest.json`` of, a version).

A command that would WRITE into a directory (``ssl train --out``, ``--registry``, ``ssl
refresh``) uses :func:`require_run_or_new` / :func:`require_registry_or_new`: a new or empty
directory is fine, a recognised one is reused, anything else is refused with one line that says
what was found there -- and nothing is written.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Optional

import yaml

from semivit.errors import UserError

RUN_FORMAT = "semivit-run/1"
REGISTRY_FORMAT = "semivit-registry/1"
_VERSION = re.compile(r"^v\d{4,}$")


def describe_value(doc: Any) -> str:
    """A short phrase for what a YAML document holds, for error messages."""
    if isinstance(doc, dict):
        keys = ", ".join(map(str, list(doc)[:5])) + (", ..." if len(doc) > 5 else "")
        return f"a mapping with keys {keys}" if doc else "an empty mapping"
    if isinstance(doc, list):
        return f"a list of {len(doc)} items"
    if doc is None:
        return "nothing"
    text = str(doc)
    return f"a {type(doc).__name__} ({text[:40]!r}{'...' if len(text) > 40 else ''})"


def _load_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def _found(d: Path, limit: int = 4) -> str:
    try:
        names = sorted(p.name for p in d.iterdir())
    except OSError:
        return "unreadable"
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _is_empty(d: Path) -> bool:
    try:
        return not any(d.iterdir())
    except OSError:
        return False


# --------------------------------------------------------------------------- runs

def read_run_yaml(run_dir: Path) -> dict:
    """RUN/config.yaml as a dict, after checking that it IS a semivit run's; else one line."""
    path = Path(run_dir) / "config.yaml"
    doc = _load_yaml(path)
    if isinstance(doc, dict) and doc.get("format") == RUN_FORMAT and isinstance(doc.get("config"), dict):
        return doc
    if isinstance(doc, dict) and "format" not in doc and isinstance(doc.get("config"), dict) \
            and isinstance(doc.get("versions"), dict):
        return doc  # a run written before config.yaml carried its format tag
    what = (f"format {doc.get('format')!r}" if isinstance(doc, dict) and "format" in doc
            else describe_value(doc))
    raise UserError(f"{run_dir} is not a semivit run: its config.yaml holds {what}, not a {RUN_FORMAT} "
                    "run config; choose another directory (nothing was changed)")


def is_run(d: Path) -> bool:
    try:
        read_run_yaml(d)
        return True
    except UserError:
        return False


def require_run_or_new(out: Path) -> Optional[dict]:
    """``ssl train --out``: the saved run config (resume) or None (a new/empty directory); one
    line for anything else.  Also checks that a new directory can be created there."""
    out = Path(out)
    if os.path.lexists(out) and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a directory")
    if (out / "config.yaml").is_file():
        return read_run_yaml(out)
    if out.is_dir() and not _is_empty(out):
        raise UserError(f"{out} exists and is not a semivit run (it holds {_found(out)}); choose a new --out "
                        "(nothing was changed)")
    from semivit.safe_io import check_writable_dir

    check_writable_dir(out, f"the run directory {out}")
    return None


# --------------------------------------------------------------------------- registries

def registry_tag(d: Path) -> Optional[str]:
    """The ``format`` in REGISTRY/registry.yaml, or None without one."""
    path = Path(d) / "registry.yaml"
    if not path.is_file():
        return None
    doc = _load_yaml(path)
    return str(doc.get("format")) if isinstance(doc, dict) and doc.get("format") is not None else ""


def _registry_what(d: Path) -> str:
    path = Path(d) / "registry.yaml"
    if not path.is_file():
        return _found(d)
    doc = _load_yaml(path)
    if isinstance(doc, dict):
        return f"a registry.yaml of format {doc['format']!r}" if "format" in doc else "a registry.yaml without a format tag"
    return f"a registry.yaml with {describe_value(doc)}"


def is_registry(d: Path) -> bool:
    d = Path(d)
    if not d.is_dir():
        return False
    tag = registry_tag(d)
    if tag is not None:
        return tag == REGISTRY_FORMAT
    cur = d / "current"
    if cur.is_symlink() and _VERSION.match(Path(os.readlink(cur)).name):
        return True
    return any(_VERSION.match(p.name) and (p / "manifest.json").is_file() for p in d.iterdir())


def require_registry_or_new(d: Path) -> bool:
    """``ssl train --registry`` (creates one): True for an existing registry, False for a new or
    empty directory; one line for anything else, before anything is written."""
    d = Path(d)
    if os.path.lexists(d) and not d.is_dir():
        raise UserError(f"--registry {d} exists and is not a directory")
    if is_registry(d):
        return True
    if d.is_dir() and not _is_empty(d):
        what = _registry_what(d)
        raise UserError(f"{d} is not a semivit registry (it holds {what}); give a new or empty directory "
                        "or an existing registry (nothing was changed)")
    from semivit.safe_io import check_writable_dir

    check_writable_dir(d, f"the registry {d}")
    return False


def require_registry(d: Path) -> Path:
    """A command that reads or updates an existing registry: one line unless it is one."""
    d = Path(d)
    if not d.is_dir():
        raise UserError(f"registry not found: {d}")
    if not is_registry(d):
        what = _registry_what(d) if not _is_empty(d) else "nothing"
        raise UserError(f"{d} is not a semivit registry (it holds {what})")
    return d
