"""Augmentation lists (albumentations).  They work on uint8 HxWx3 arrays at the model size;
normalisation is not here: it happens on the batch in :class:`semivit.data.dataset.Preprocess`,
the same module the ONNX export fuses into the graph, so training and serving cannot drift.
"""

from __future__ import annotations

from typing import Callable

import albumentations as A

# Registry: name -> builder(img_size) -> albumentations.Compose
AUGMENTATIONS: dict[str, Callable[[int], A.Compose]] = {}


def register(name: str):
    def deco(fn):
        AUGMENTATIONS[name] = fn
        return fn

    return deco


def _frac(px: int) -> float:
    """The seed's pixel sizes are for 224 px inputs; express them as a fraction of the side."""
    return px / 224.0


@register("seed")
def seed_augment(size: int) -> A.Compose:
    """The list of ../shared/seeds/01 (geometric, colour, blur/distortion, occlusion/weather)."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(0.0, 0.1), rotate=(-15, 15), shear=(-5, 5), p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.CLAHE(clip_limit=2.0, p=0.2),
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=15, val_shift_limit=10, p=0.3),
        A.OneOf([A.MotionBlur(blur_limit=3), A.MedianBlur(blur_limit=3)], p=0.2),
        A.GridDistortion(distort_limit=0.03, p=0.1),
        A.ElasticTransform(alpha=1, sigma=50, p=0.1),
        A.CoarseDropout(num_holes_range=(3, 6), hole_height_range=(_frac(10), _frac(32)),
                        hole_width_range=(_frac(10), _frac(32)), p=0.3),
        A.RandomFog(fog_coef_range=(0.1, 0.3), p=0.2),
        A.RandomRain(blur_value=3, p=0.1),
    ])


@register("light")
def light_augment(size: int) -> A.Compose:
    """A cheaper list for CPU training (the quick preset): geometry, contrast, occlusion."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(scale=(0.9, 1.1), translate_percent=(0.0, 0.1), rotate=(-15, 15), shear=(-5, 5), p=0.7),
        A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5),
        A.CoarseDropout(num_holes_range=(1, 3), hole_height_range=(_frac(10), _frac(32)),
                        hole_width_range=(_frac(10), _frac(32)), p=0.3),
    ])


@register("weak")
def weak_augment(size: int) -> A.Compose:
    """Weak view for a teacher (flip and a small shift), as in FixMatch / EMA-Teacher."""
    return A.Compose([
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(0.0, 0.0625), p=0.5),
    ])


@register("semi-vit-weak")
def semi_vit_weak_augment(size: int) -> A.Compose:
    """Semi-ViT's weak view for the EMA teacher (seed 05, appendix "Data Augmentation"):
    RandomResizedCrop, RandomHorizontalFlip and ColorJitter(0.4) - with the reference code's
    parameters (timm's ``create_transform``: crop scale 0.08-1, aspect 3/4-4/3, bicubic; colour
    jitter 0.4 on brightness, contrast and saturation)."""
    import cv2

    return A.Compose([
        A.RandomResizedCrop(size=(size, size), scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                            interpolation=cv2.INTER_CUBIC, p=1.0),
        A.HorizontalFlip(p=0.5),
        A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0, p=1.0),
    ])


@register("none")
def no_augment(size: int) -> A.Compose:
    return A.Compose([])


def build(name: str, size: int, seed: int | None = None) -> A.Compose:
    """The named list for ``size``; with ``seed`` its random draws are reproducible
    (albumentations 2 otherwise seeds itself from the OS)."""
    try:
        compose = AUGMENTATIONS[name](size)
    except KeyError:
        from semivit.errors import UserError

        raise UserError(f"unknown augmentation list '{name}' (choose from {', '.join(AUGMENTATIONS)})") from None
    if seed is not None:
        compose.set_random_seed(seed)
    return compose
