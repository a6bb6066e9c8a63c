"""Frozen-stem feature cache.

The quick preset's hybrid ViT reads tokens made by a *frozen* ImageNet CNN stem.  A frozen stem
computes the same features for the same pixels in every epoch, fold and stage, so instead of
running it again for every batch of every fold, semivit runs it once per image and view:

- training: ``train.cache_views`` augmented views of every training image (plus the plain
  image as view 0), drawn once; each epoch picks one view per image at random;
- validation and inference: the plain image (and its mirror for flip TTA).

The transformer and the head then train on these features, which is where all the trainable
parameters are.  On the 2-core CPU this makes the quick preset's 10 models several times faster
than pushing pixels through the stem at every step.  Exported and served models are untouched:
they still contain the stem and take images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from semivit.data.dataset import Preprocess


@dataclass
class StemFeatures:
    """Stem outputs (float32) of N images: ``orig`` (N, C, h, w) and, for flip TTA, ``flip``."""

    orig: np.ndarray
    flip: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return len(self.orig)

    def __getitem__(self, idx) -> "StemFeatures":
        return StemFeatures(self.orig[idx], None if self.flip is None else self.flip[idx])


@torch.no_grad()
def stem_forward(stem: torch.nn.Module, images: np.ndarray, device: torch.device, precision: str = "auto",
                 batch_size: int = 128, flip: bool = False) -> np.ndarray:
    """Features (N, C, h, w) float32 of uint8 NHWC ``images`` (mirrored first with ``flip``).

    Always in fp32, whatever ``precision`` says: these features are reused for many epochs and
    must be exactly what the exported model computes from the same pixels.
    """
    pre = Preprocess.for_model(stem, channels_last_input=True).to(device)
    stem = stem.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = pre(torch.from_numpy(np.ascontiguousarray(images[s:s + batch_size])).to(device))
        if flip:
            x = x.flip(3)
        out.append(stem(x).float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


def features(stem, images: np.ndarray, device, precision: str = "auto", tta: bool = False) -> StemFeatures:
    return StemFeatures(stem_forward(stem, images, device, precision),
                        stem_forward(stem, images, device, precision, flip=True) if tta else None)


def augmented_views(stem, images: np.ndarray, transform, n_views: int, device, precision: str = "auto",
                    batch_size: int = 128) -> np.ndarray:
    """(N, 1 + n_views, C, h, w) float32: view 0 is the plain image, then ``n_views`` augmented."""
    views = [stem_forward(stem, images, device, precision, batch_size)]
    for _ in range(n_views):
        aug = np.stack([transform(image=img)["image"] for img in images]) if len(images) else images
        views.append(stem_forward(stem, aug, device, precision, batch_size))
    return np.stack(views, axis=1)


class CachedViewsDataset(Dataset):
    """Like :class:`~semivit.data.dataset.ArrayDataset`, over cached stem features: each access
    returns one of the image's augmented views at random (view 0, the plain image, included)."""

    def __init__(self, views: np.ndarray, labels: np.ndarray, weights: Optional[np.ndarray] = None,
                 generator: Optional[torch.Generator] = None):
        self.views = views
        self.labels = labels
        self.weights = weights if weights is not None else np.ones(len(views), dtype=np.float32)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int):
        v = int(torch.randint(self.views.shape[1], (1,), generator=self.generator))
        x = torch.from_numpy(self.views[i, v])
        y = self.labels[i]
        y = torch.as_tensor(y, dtype=torch.float32 if np.ndim(y) else torch.long)
        return x, y, torch.tensor(float(self.weights[i])), i
