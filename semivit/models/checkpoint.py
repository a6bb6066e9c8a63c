"""Model checkpoints (``semivit-model/1``): the config, the classes and the state dict of a
:class:`~semivit.models.networks.Classifier`, rebuilt without network access."""

from __future__ import annotations

from pathlib import Path

import torch

from semivit.errors import UserError
from semivit.models.networks import Classifier, build_model
from semivit.models.weights import first_line

CHECKPOINT_FORMAT = "semivit-model/1"


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
        raise UserError(f"cannot read checkpoint {path}: {first_line(e)}") from None
    if not isinstance(doc, dict) or doc.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a semivit model checkpoint")
    cfg = dict(doc["model"])
    if "mean" not in cfg:  # written before the normalisation was configurable: it was ImageNet's
        from semivit.models.networks import IMAGENET_NORM

        cfg["mean"], cfg["std"] = IMAGENET_NORM
    mcfg = ModelConfig.model_construct(**{**ModelConfig().model_dump(), **cfg, "weights": None})
    model = build_model(mcfg, len(doc["classes"]), pretrained=False)
    model.load_state_dict(doc["state_dict"])
    model.eval()
    return model, doc
