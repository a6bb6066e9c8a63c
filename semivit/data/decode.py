"""Robust image decoding to RGB uint8.

EXIF orientation is applied; greyscale, RGBA/LA (alpha dropped), palette, CMYK, 16-bit and float
images become 8-bit RGB.  Anything that is not a readable image raises :class:`DecodeError` with a
short reason, which callers record instead of crashing.

Files are opened with :func:`semivit.safe_io.open_regular` (never blocks on a FIFO or device).
Decoded size is capped: an image of more than ``SEMIVIT_MAX_PIXELS`` pixels (default
64,000,000, e.g. 8000 x 8000; checked from the header, before any pixel is decoded, and for a JPEG
after the DCT-domain downscale) is a DecodeError "image too large", not 1.8 GB per decode worker
for a small PNG that inflates to 30000 x 30000.  ``SEMIVIT_MAX_PIXELS=none`` keeps only Pillow's
decompression-bomb guard, which is an error too.
"""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from semivit.errors import UserError
from semivit.safe_io import NotRegularFile, open_regular

# Pillow refuses truncated files by default (LOAD_TRUNCATED_IMAGES is False): that is what we want.
# Its bomb guard stays as the backstop above our own cap (max_pixels()); its warning between the
# two is silenced below, since our cap already decided.
Image.MAX_IMAGE_PIXELS = 30_000 * 30_000
DEFAULT_MAX_PIXELS = 64_000_000
MAX_PIXELS_ENV = "SEMIVIT_MAX_PIXELS"
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)

# Pillow's harmless notes (e.g. "Corrupt EXIF data": we still decode the pixels) are silenced by
# message here, once.  Not with ``warnings.catch_warnings()`` per call: that swaps the process-wide
# filter list and is not thread-safe, and decode_many() decodes in threads -- interleaved
# save/restore could leave every warning of the process ignored.
for _msg in (r"(Possibly )?[Cc]orrupt EXIF data", r"Palette images with Transparency", r"Truncated File Read",
             r"Metadata Warning", r"Image appears to be a malformed MPO"):
    warnings.filterwarnings("ignore", message=_msg, category=UserWarning)


class DecodeError(Exception):
    """The file is not a decodable image; ``str(err)`` is the one-line reason."""


def max_pixels() -> int | None:
    """The decoded-pixel cap: ``SEMIVIT_MAX_PIXELS`` (a whole number; ``none`` = no cap of ours),
    default :data:`DEFAULT_MAX_PIXELS`.  A bad value is a one-line UserError: callers ask for it
    before they start work."""
    return _parse_max_pixels(os.environ.get(MAX_PIXELS_ENV, "").strip())


@functools.lru_cache(maxsize=8)
def _parse_max_pixels(raw: str) -> int | None:
    if not raw:
        return DEFAULT_MAX_PIXELS
    if raw.lower() in ("none", "off"):
        return None
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise UserError(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels (or 'none'), not {raw!r}")
    return value


def _check_size(img: Image.Image, cap: int | None) -> None:
    w, h = img.size
    if cap is not None and w * h > cap:
        raise DecodeError(f"image too large: {w}x{h} = {w * h:,} pixels is over the cap of {cap:,} "
                          f"({MAX_PIXELS_ENV})")


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
    cap = max_pixels()
    try:
        f = open_regular(path)
    except FileNotFoundError:
        raise DecodeError("file not found: deleted or moved after it was listed") from None
    except NotRegularFile as e:
        raise DecodeError(e.strerror) from None
    except PermissionError:
        raise DecodeError("permission denied: the file cannot be opened for reading") from None
    except OSError as e:
        raise DecodeError(f"cannot open the file: {e.strerror or e}") from None
    try:
        if os.fstat(f.fileno()).st_size == 0:
            raise DecodeError("empty file (0 bytes)")
        with Image.open(f) as img:
            if size is not None and img.format == "JPEG":
                # DCT-domain downscale: decodes a large JPEG several times faster.
                img.draft("RGB", (size, size))
            _check_size(img, cap)  # from the header: no pixel decoded yet
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
    except MemoryError:
        raise DecodeError("image too large: out of memory while decoding it") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "truncated" in reason.lower():
            reason = f"truncated image ({reason})"
        raise DecodeError(f"corrupt image: {reason}") from None
    finally:
        f.close()
