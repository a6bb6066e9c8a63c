"""Frozen-stem feature cache.

The quick preset's hybrid ViT reads tokens made by a *frozen* ImageNet CNN stem.  A frozen stem
computes the same features for the same pixels in every epoch, fold and stage, so instead of
running it again for every batch of every fold, semivit runs it once per image and view:

- training: ``train.cache_views`` augmented views of every training image (plus the plain
  image as view 0), drawn once; each epoch picks one view per image at random;
- validation and inference: the plain image (and its mirror for flip TTA).

Computing them is the long silent part before stage 1 and stage 3 on a CPU (minutes for the
quick preset's 8 views of a few thousand images), so each call shows a progress display
(:mod:`semivit.progress`: a bar on a terminal, plain lines in a log file), counting stem passes
("views").

The transformer and the head then train on these features, which is where all the trainable
parameters are.  On the 2-core CPU this makes the quick preset's 10 models several times faster
than pushing pixels through the stem at every step.  Exported and served models are untouched:
they still contain the stem and take images.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from semivit.data.dataset import Preprocess
from semivit.progress import progress_bar


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
                 batch_size: int = 128, flip: bool = False, transform=None,
                 advance: Optional[Callable[[int], None]] = None) -> np.ndarray:
    """Features (N, C, h, w) float32 of uint8 NHWC ``images`` (mirrored first with ``flip``;
    through the albumentations ``transform`` first when given, image by image in order).
    ``advance(k)`` is called after each batch of k images.

    Always in fp32, whatever ``precision`` says: these features are reused for many epochs and
    must be exactly what the exported model computes from the same pixels.
    """
    pre = Preprocess.for_model(stem, channels_last_input=True).to(device)
    stem = stem.to(device).eval()
    out = []
    for s in range(0, len(images), batch_size):
        chunk = images[s:s + batch_size]
        if transform is not None:
            chunk = np.stack([transform(image=img)["image"] for img in chunk])
        x = pre(torch.from_numpy(np.ascontiguousarray(chunk)).to(device))
        if flip:
            x = x.flip(3)
        out.append(stem(x).float().cpu().numpy())
        if advance is not None:
            advance(len(chunk))
    return np.concatenate(out) if out else np.zeros((0,), np.float32)


@contextmanager
def _progress(desc: str, n_images: int, views: int, what: str):
    """``advance(k)`` for a progress display of ``n_images`` x ``views`` stem passes; the first
    line (at once, also in a log file) says what is computed."""
    if not n_images:
        yield None
        return
    with progress_bar(transient=True) as bar:
        task = bar.add_task(desc, total=n_images * views, unit="views", status="")
        bar.update(task, status=f"{n_images} images x {views} views ({what})")
        yield lambda k: bar.update(task, advance=k)


def features(stem, images: np.ndarray, device, precision: str = "auto", tta: bool = False,
             desc: str = "stem features") -> StemFeatures:
    with _progress(desc, len(images), 2 if tta else 1, "plain + mirror" if tta else "plain") as advance:
        return StemFeatures(stem_forward(stem, images, device, precision, advance=advance),
                            stem_forward(stem, images, device, precision, flip=True, advance=advance) if tta else None)


def augmented_views(stem, images: np.ndarray, transform, n_views: int, device, precision: str = "auto",
                    batch_size: int = 128, desc: str = "stem features") -> np.ndarray:
    """(N, 1 + n_views, C, h, w) float32: view 0 is the plain image, then ``n_views`` augmented
    (view by view, each image's augmentation drawn in image order)."""
    with _progress(desc, len(images), 1 + n_views, f"plain + {n_views} augmented") as advance:
        views = [stem_forward(stem, images, device, precision, batch_size, advance=advance)]
        for _ in range(n_views):
            views.append(stem_forward(stem, images, device, precision, batch_size, transform=transform,
                                      advance=advance))
    return np.stack(views, axis=1)


class CachedViewsDataset(Dataset):
    """Like :class:`~semivit.data.dataset.ArrayDataset`, over cached stem features: each access
    returns one of the image's augmented views at random (view 0, the plain image, included).
    ``labels`` of shape (N, views, C) hold one soft target per view (``pseudo.targets: view``):
    the access returns the drawn view's."""

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
        if np.ndim(y) == 2:  # a target per view
            y = y[v]
        y = torch.as_tensor(y, dtype=torch.float32 if np.ndim(y) else torch.long)
        return x, y, torch.tensor(float(self.weights[i])), i
