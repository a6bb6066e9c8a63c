"""Decoded image arrays, torch datasets over them, and the shared preprocessing module."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from semivit.data.decode import DecodeError, load_rgb, max_pixels
from semivit.utils import cpu_count

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Decoded:
    images: np.ndarray  # N x S x S x 3 uint8, only the files that decoded
    ok: np.ndarray  # indices (into the requested list) of the decoded files
    failures: list[tuple[Path, str]] = field(default_factory=list)  # (path, reason)


def decode_many(paths: Sequence[Path], size: int, workers: int = 0,
                progress: Optional[Callable[[int], None]] = None) -> Decoded:
    """Decode and resize many files in parallel threads (Pillow releases the GIL while decoding).

    Files that fail are returned in ``failures`` with their reason, never raised.
    """
    max_pixels()  # a bad SEMIVIT_MAX_PIXELS is one line now, not an error per file
    n = len(paths)
    out = np.zeros((n, size, size, 3), dtype=np.uint8)
    good = np.zeros(n, dtype=bool)
    failures: list[tuple[Path, str]] = []

    def work(i: int):
        try:
            out[i] = load_rgb(paths[i], size)
            return i, None
        except DecodeError as e:
            return i, str(e)

    workers = workers or cpu_count()
    # (a stop signal while waiting here closes pool.map's iterator, which cancels the queued files)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, err in pool.map(work, range(n)):
            if err is None:
                good[i] = True
            else:
                failures.append((Path(paths[i]), err))
            if progress:
                progress(1)
    ok = np.flatnonzero(good)
    return Decoded(out[ok] if len(ok) < n else out, ok, failures)


class ArrayDataset(Dataset):
    """uint8 images in memory -> (augmented uint8 CHW tensor, label, weight, index).

    Labels may be hard (int) or soft (a probability row); weights are per-sample loss weights.
    """

    def __init__(self, images: np.ndarray, labels: Optional[np.ndarray] = None,
                 weights: Optional[np.ndarray] = None, transform=None, views: int = 1):
        self.images = images
        n = len(images)
        self.labels = labels if labels is not None else np.full(n, -1, dtype=np.int64)
        self.weights = weights if weights is not None else np.ones(n, dtype=np.float32)
        self.transform = transform
        self.views = views  # >1 returns several independently augmented views (list of transforms)

    def __len__(self) -> int:
        return len(self.images)

    def _view(self, img: np.ndarray, transform) -> torch.Tensor:
        if transform is not None:
            img = transform(image=img)["image"]
        return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)

    def __getitem__(self, i: int):
        img = self.images[i]
        if isinstance(self.transform, (list, tuple)):
            x = tuple(self._view(img, t) for t in self.transform)
        else:
            x = self._view(img, self.transform)
        y = self.labels[i]
        y = torch.as_tensor(y, dtype=torch.float32 if np.ndim(y) else torch.long)
        return x, y, torch.tensor(float(self.weights[i])), i


class Preprocess(nn.Module):
    """uint8 images -> normalised float NCHW.  Accepts NCHW or NHWC (``channels_last_input``).

    Used by the training loop, by every inference path and fused into the ONNX graph.
    """

    def __init__(self, mean=IMAGENET_MEAN, std=IMAGENET_STD, channels_last_input: bool = False):
        super().__init__()
        self.channels_last_input = channels_last_input
        self.register_buffer("scale", (1.0 / (255.0 * torch.tensor(std))).view(1, 3, 1, 1))
        self.register_buffer("shift", (torch.tensor(mean) / torch.tensor(std)).view(1, 3, 1, 1))

    @classmethod
    def for_model(cls, model: nn.Module, channels_last_input: bool = False) -> "Preprocess":
        """The normalisation ``model``'s weights expect (``model.norm``, set when the model is
        built from its config), ImageNet's for a module that does not say."""
        mean, std = getattr(model, "norm", None) or (IMAGENET_MEAN, IMAGENET_STD)
        return cls(mean, std, channels_last_input=channels_last_input)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last_input:
            x = x.permute(0, 3, 1, 2)
        return x.float() * self.scale - self.shift
