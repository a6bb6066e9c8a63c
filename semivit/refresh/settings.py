"""REGISTRY/registry.yaml: the registry's settings (holdout, disk reserve, export options)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from semivit.errors import UserError
from semivit.utils import atomic_write_text


@dataclass
class Settings:
    holdout: Optional[str] = None  # labeled holdout dir; default REGISTRY/holdout when it exists
    min_free_mb: float = 512.0  # kept free beyond the estimated size of a new version
    export_tta: bool = True
    export_trt: bool = False
    export_int8: bool = False
    extra: dict = field(default_factory=dict)

    def holdout_dir(self, registry: Path) -> Optional[Path]:
        if self.holdout:
            p = Path(self.holdout).expanduser()
            p = p if p.is_absolute() else registry / p
            if not p.is_dir():
                raise UserError(f"holdout directory in {registry / 'registry.yaml'} not found: {p}")
            return p
        return registry / "holdout" if (registry / "holdout").is_dir() else None


SETTINGS_HEADER = """# semivit model registry settings (edit freely; read at the start of every refresh)
# holdout: a fixed labeled holdout (DIR/<class>/*, DIR/test/<class>/* or DIR/labels.csv), relative
#          to the registry or absolute; default: REGISTRY/holdout/ when it exists.  Never trained on.
# min_free_mb: free disk space to keep beyond the estimated size of a new version.
# export: options for the export of every new version (ssl export --no-tta/--trt/--int8).
"""


def load_settings(registry: Path) -> Settings:
    path = Path(registry) / "registry.yaml"
    if not path.is_file():
        return Settings()
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None
    exp = doc.get("export") or {}
    known = {"holdout", "min_free_mb", "export", "format"}
    try:
        return Settings(holdout=doc.get("holdout"), min_free_mb=float(doc.get("min_free_mb", 512.0)),
                        export_tta=bool(exp.get("tta", True)), export_trt=bool(exp.get("trt", False)),
                        export_int8=bool(exp.get("int8", False)),
                        extra={k: v for k, v in doc.items() if k not in known})
    except (TypeError, ValueError) as e:
        raise UserError(f"{path}: bad value ({e})") from None


def init_registry(registry: Path) -> Path:
    """Create a registry, or reuse an existing one; a folder that is not a registry is refused
    (semivit.kinds) before anything is written into it."""
    from semivit.kinds import REGISTRY_FORMAT, require_registry_or_new

    registry = Path(registry)
    require_registry_or_new(registry)
    registry.mkdir(parents=True, exist_ok=True)
    if not (registry / "registry.yaml").exists():
        s = Settings()
        doc = {"format": REGISTRY_FORMAT, "holdout": s.holdout, "min_free_mb": s.min_free_mb,
               "export": {"tta": s.export_tta, "trt": s.export_trt, "int8": s.export_int8}}
        atomic_write_text(registry / "registry.yaml", SETTINGS_HEADER + yaml.safe_dump(doc, sort_keys=False))
    return registry
