"""Model factory: any timm backbone + the seeds' custom head (weights: models/weights.py,
checkpoints: models/checkpoint.py).

Models are built by name through timm's registry.  semivit registers its own hybrid ViT
(``vit_hybrid_lite0``) there too, so it is built exactly like any timm model.
"""

from __future__ import annotations

import contextlib
from functools import partial
from pathlib import Path
from typing import Optional

import timm
import torch
from timm.layers import HybridEmbed
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from semivit.errors import UserError
from semivit.models.weights import (OFFLINE_PRETRAINED, first_line, load_backbone_weights, strict_load,
                                      stem_state_from_lite0)


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


class TunedStem(nn.Sequential):
    """A pretrained stem whose last stages train: ``[frozen Lite0Stem, trainable stages]``.

    The frozen part stays a fixed feature extractor (computed once, cached, shared by an
    ensemble's members: :func:`frozen_stem` returns it); the last ``tune_stem_stages`` stages
    start from ImageNet's weights and fine-tune with the transformer (BatchNorm in train mode)."""

    def __init__(self, frozen: Lite0Stem, tail: nn.Sequential):
        super().__init__(frozen, tail)


def _fixed_part(stem):
    """A :class:`TunedStem`'s frozen part; any other stem as it is."""
    return stem[0] if isinstance(stem, TunedStem) else stem


def frozen_stem(model: nn.Module) -> Optional[Lite0Stem]:
    """The frozen CNN stem of a (Classifier over a) hybrid ViT, or None; with a
    :class:`TunedStem` its frozen part (the stages before the ones that train)."""
    backbone = getattr(model, "backbone", model)
    stem = _fixed_part(getattr(getattr(backbone, "patch_embed", None), "backbone", None))
    return stem if isinstance(stem, Lite0Stem) and stem.frozen else None


def drop_frozen_stem(model: nn.Module) -> None:
    """Replace the frozen stem of a hybrid (Classifier over a) ViT by identity in place: the
    model then takes the frozen stem's features; a :class:`TunedStem`'s stages that train stay."""
    embed = getattr(model, "backbone", model).patch_embed
    if isinstance(embed.backbone, TunedStem):
        embed.backbone[0] = nn.Identity()
    else:
        embed.backbone = nn.Identity()


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


def lite0_stem(depth: int = 5, frozen: bool = False, tune: int = 0):
    """EfficientNet-Lite0's conv_stem, bn1 and first ``depth`` stages; ``tune`` > 0 (with
    ``frozen``): a :class:`TunedStem` whose last ``tune`` of those stages train."""
    cnn = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    if not tune:
        return Lite0Stem(cnn.conv_stem, cnn.bn1, *cnn.blocks[:depth], frozen=frozen)
    if not frozen or not 0 < tune < depth:
        raise ValueError(f"tune_stem_stages={tune} needs a frozen stem and 0 < tune_stem_stages < stem_depth={depth}")
    return TunedStem(Lite0Stem(cnn.conv_stem, cnn.bn1, *cnn.blocks[:depth - tune], frozen=True),
                     nn.Sequential(*cnn.blocks[depth - tune:depth]))


class HybridViT(VisionTransformer):
    """The ViT paper's hybrid: a pretrained CNN stem makes the patch tokens, a ViT reads them.

    ``tune_stem_stages`` (with ``freeze_stem``): the stem's last stages fine-tune, the rest stays
    frozen (and cached)."""

    def __init__(self, stem_depth: int = 5, freeze_stem: bool = False, tune_stem_stages: int = 0, **kwargs):
        stem = lite0_stem(stem_depth, frozen=freeze_stem, tune=tune_stem_stages)
        kwargs.setdefault("patch_size", 1)
        super().__init__(embed_layer=partial(HybridEmbed, backbone=stem), **kwargs)
        self.stem_depth, self.tune_stem_stages = stem_depth, tune_stem_stages
        if freeze_stem:
            fixed = _fixed_part(stem)
            fixed.eval()
            for p in fixed.parameters():
                p.requires_grad_(False)

    def load_pretrained_stem(self) -> None:
        sd = stem_state_from_lite0(self.stem_depth)
        if self.tune_stem_stages:  # Sequential index 2 + i is stage i: the last stages are the tail's
            cut = 2 + self.stem_depth - self.tune_stem_stages

            def split(key: str) -> str:
                index, rest = key.split(".", 1)
                return f"0.{key}" if int(index) < cut else f"1.{int(index) - cut}.{rest}"

            sd = {split(k): v for k, v in sd.items()}
        strict_load(self.patch_embed.backbone, sd, "EfficientNet-Lite0 stem")

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
            raise UserError(f"could not load pretrained weights for '{name}' from the hub ({first_line(e)}); "
                            "offline, give a local file with --set model.weights=PATH or --set model.pretrained=false") from None
        raise
    except (OSError, ValueError) as e:
        if use_hub:
            raise UserError(f"could not load pretrained weights for '{name}' from the hub ({first_line(e)}); "
                            "offline, give a local file with --set model.weights=PATH or --set model.pretrained=false") from None
        raise UserError(f"cannot build model '{name}': {first_line(e)}") from None
    if model_cfg.weights is not None:
        load_backbone_weights(backbone, Path(model_cfg.weights))
    elif pretrained and offline is not None:
        offline(backbone)
    return backbone


def _accepts_img_size(base: str) -> bool:
    # Transformers (and our hybrid) are built for a given input size; CNNs take any size.
    return any(t in base for t in ("vit", "deit", "beit", "eva", "swin", "cait", "xcit", "hybrid"))


IMAGENET_NORM = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Models of ours whose input normalisation timm cannot look up: the hybrid's stem is Lite0.
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {"vit_hybrid_lite0": ((0.5,) * 3, (0.5,) * 3)}


def normalization(model_cfg) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model is fed: the config's, else what its pretrained weights expect."""
    if model_cfg.mean is not None and model_cfg.std is not None:
        return tuple(model_cfg.mean), tuple(model_cfg.std)
    base = model_cfg.name.split(".")[0]
    if base in NORMALIZATION:
        found = NORMALIZATION[base]
    else:
        from timm.models import get_pretrained_cfg

        pc = get_pretrained_cfg(model_cfg.name) or get_pretrained_cfg(base)
        found = (tuple(pc.mean), tuple(pc.std)) if pc is not None and pc.mean and pc.std else IMAGENET_NORM
    return (tuple(model_cfg.mean or found[0]), tuple(model_cfg.std or found[1]))


def build_model(model_cfg, num_classes: int, pretrained: Optional[bool] = None) -> Classifier:
    """Backbone by name (+ pretrained / local weights) and a fresh head for ``num_classes``."""
    use_pretrained = model_cfg.pretrained if pretrained is None else pretrained
    backbone = create_backbone(model_cfg, use_pretrained)
    model = Classifier(backbone, num_classes, model_cfg.head_hidden, model_cfg.head_dropout)
    model.norm = normalization(model_cfg)  # read by Preprocess.for_model
    stem = _fixed_part(getattr(getattr(backbone, "patch_embed", None), "backbone", None))
    if isinstance(stem, Lite0Stem):  # the stem-feature cache preprocesses for the stem alone
        stem.norm = model.norm
    return model
