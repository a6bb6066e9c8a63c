"""``--model PATH`` -> what to serve: an export directory, a run directory or a registry.

- EXPORT/ (meta.json + model.onnx): served by ONNX Runtime or TensorRT; if EXPORT's parent is the
  run it came from (RUN/export), that run is remembered for the PyTorch backend.
- RUN/ (ensemble.json + checkpoints): RUN/export is served when it exists, else the run itself
  with the PyTorch backend.
- REGISTRY/ with a ``current`` entry: a symlink to a version directory, or a small file holding
  the version name (plain text, or JSON with a "version" key).  The version directory holds
  export/ and/or run/ (a version directory given directly works too).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from semivit.errors import UserError


@dataclass
class ModelRef:
    path: Path  # what the user gave
    export_dir: Optional[Path]  # EXPORT/ with meta.json, if any
    run_dir: Optional[Path]  # RUN/ with ensemble.json, if any
    classes: list[str]
    img_size: int
    meta: dict  # meta.json (export) or ensemble.json (run only)
    registry: Optional[Path] = None
    version: Optional[str] = None

    @property
    def kind(self) -> str:
        return "export" if self.export_dir is not None else "run"

    def describe(self) -> str:
        where = str(self.export_dir if self.export_dir is not None else self.run_dir)
        if self.registry is not None:
            return f"{self.kind} {where} (registry {self.registry}, current = {self.version})"
        return f"{self.kind} {where}"


def _read_doc(path: Path, what: str) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the model: {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise UserError(f"cannot read the model: {path} is not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(doc, dict):
        raise UserError(f"cannot read the model: {path} is not a {what} document")
    try:
        classes = [str(c) for c in doc["classes"]]
        size = int(doc["img_size"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"cannot read the model: {path} lacks classes/img_size") from None
    if not classes or size <= 0:
        raise UserError(f"cannot read the model: {path} has no classes or a bad img_size")
    if path.name == "meta.json":  # an edited meta.json (a renamed class, a size) is refused, not served
        from semivit.integrity import check_meta

        check_meta(path.parent, doc)
    return doc


def _read_current(registry: Path) -> tuple[Path, str]:
    cur = registry / "current"
    if cur.is_symlink():
        target = Path(os.readlink(cur))
        vdir = target if target.is_absolute() else registry / target
        name = target.name
    elif cur.is_file():
        text = cur.read_text().strip()
        name = text
        if text.startswith("{"):
            try:
                doc = json.loads(text)
                name = str(doc.get("version") or doc.get("path") or "")
            except json.JSONDecodeError:
                raise UserError(f"registry {registry}: 'current' is not valid JSON") from None
        if not name:
            raise UserError(f"registry {registry}: 'current' is empty (no version promoted yet?)")
        vdir = Path(name) if Path(name).is_absolute() else registry / name
        name = Path(name).name
    elif cur.is_dir():
        return cur, "current"
    else:
        raise UserError(f"registry {registry}: 'current' is neither a link nor a pointer file")
    if not vdir.is_dir():
        raise UserError(f"registry {registry}: current points at {name}, which does not exist (a dangling "
                        f"link; promote an existing version with `ssl models promote VERSION --registry {registry}`)")
    return vdir, name


def _warn_if_stale(export: Path, run: Path, meta: dict) -> None:
    """RUN/export made from an earlier ensemble.json (the run was retrained since): say so."""
    want = meta.get("source_ensemble_sha256")
    if not want:
        return
    from semivit.utils import sha256_file, warn

    if sha256_file(run / "ensemble.json") != want:
        warn(f"{export} was exported from an earlier {run / 'ensemble.json'}; serving the export anyway "
             f"(re-export with `ssl export {run} --force`, or use --backend torch for the run itself)")


def _plain(d: Path) -> ModelRef:
    if (d / "meta.json").is_file():
        meta = _read_doc(d / "meta.json", "model export")
        run = d.parent if (d.parent / "ensemble.json").is_file() else None
        return ModelRef(d, d, run, meta["classes"], int(meta["img_size"]), meta)
    export = run = None
    if (d / "ensemble.json").is_file():
        run = d
        export = d / "export" if (d / "export" / "meta.json").is_file() else None
    else:  # a registry version directory: run/ and export/
        run = d / "run" if (d / "run" / "ensemble.json").is_file() else None
        export = d / "export" if (d / "export" / "meta.json").is_file() else None
    if export is not None:
        meta = _read_doc(export / "meta.json", "model export")
        if run is not None:
            _warn_if_stale(export, run, meta)
        return ModelRef(d, export, run, meta["classes"], int(meta["img_size"]), meta)
    if run is not None:
        doc = _read_doc(run / "ensemble.json", "ensemble")
        return ModelRef(d, None, run, doc["classes"], int(doc["img_size"]), doc)
    if (d / "config.yaml").is_file():
        raise UserError(f"{d} is a run without a trained ensemble yet (no ensemble.json)")
    raise UserError(f"{d} is not a model: expected an export (meta.json), a run (ensemble.json) "
                    f"or a registry (current -> vNNNN/)")


def resolve_model_dir(path: Optional[Path]) -> ModelRef:
    """Resolve ``--model`` to a :class:`ModelRef`; a one-line :class:`UserError` if it is not one."""
    if path is None:
        raise UserError("no model given: pass --model EXPORT_DIR, RUN_DIR or REGISTRY")
    path = Path(path)
    if not path.exists():
        raise UserError(f"model not found: {path}")
    if not path.is_dir():
        raise UserError(f"--model must be a directory (an export, a run or a registry): {path}")
    if (path / "current").exists() or (path / "current").is_symlink():
        vdir, version = _read_current(path)
        ref = _plain(vdir)
        ref.path, ref.registry, ref.version = path, path, version
        return ref
    from semivit.kinds import is_registry

    if is_registry(path):
        raise UserError(f"registry {path} has no current version yet: promote one with "
                        f"`ssl models promote VERSION --registry {path}`")
    return _plain(path)
