"""Robust image decoding to RGB uint8.

EXIF orientation is applied; greyscale, RGBA/LA (alpha dropped), palette, CMYK, 16-bit and float
images become 8-bit RGB.  Anything that is not a readable image raises :class:`DecodeError` with a
short reason, which callers record instead of crashing.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# Pillow refuses truncated files by default (LOAD_TRUNCATED_IMAGES is False): that is what we want.
Image.MAX_IMAGE_PIXELS = 30_000 * 30_000  # allow large field photos, still guard bombs

# Pillow's harmless notes (e.g. "Corrupt EXIF data": we still decode the pixels) are silenced by
# message here, once.  Not with ``warnings.catch_warnings()`` per call: that swaps the process-wide
# filter list and is not thread-safe, and decode_many() decodes in threads -- interleaved
# save/restore could leave every warning of the process ignored.
for _msg in (r"(Possibly )?[Cc]orrupt EXIF data", r"Palette images with Transparency", r"Truncated File Read",
             r"Metadata Warning", r"Image appears to be a malformed MPO"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)


class DecodeError(Exception):
    """The file is not a decodable image; ``str(err)`` is the one-line reason."""


def _to_8bit(img: Image.Image) -> Image.Image:
    """8-bit "L" (any single-channel image) or "RGB"."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L")
    if mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr = np.clip((arr - lo) * scale + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, "L")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        return img.convert("RGB")
    return img.convert("RGB")  # LA, RGBA, CMYK, YCbCr, 1, ...


def resize_square(img: Image.Image, size: int) -> Image.Image:
    """The one resize used by training, export verification and serving (bilinear, full frame)."""
    if img.size == (size, size):
        return img
    return img.resize((size, size), Image.BILINEAR, reducing_gap=None)


def load_rgb(path: Path, size: Optional[int] = None) -> np.ndarray:
    """Decode ``path`` to an HxWx3 uint8 array, resized to ``size`` x ``size`` when given."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        with Image.open(path) as img:
            if size is not None and img.format == "JPEG":
                # DCT-domain downscale: decodes a large JPEG several times faster.
                img.draft("RGB", (size, size))
            img.load()
            img = ImageOps.exif_transpose(img) or img
            img = _to_8bit(img)
            if size is not None:  # a greyscale image is resized before it becomes 3 channels:
                img = resize_square(img, size)  # the same pixels, a third of the work
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError("not an image (unrecognised format)") from None
    except Image.DecompressionBombError as e:
        raise DecodeError(f"image too large: {e}") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise DecodeError(f"corrupt image: {reason}") from None
