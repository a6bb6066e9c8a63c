"""Robust decoding: every case with a real file written by the test."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
from PIL import Image

from conftest import write_image
from semivit.data.dataset import decode_many
from semivit.data.decode import DecodeError, load_rgb


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_plain_rgb_png_is_exact(tmp_path):
    arr = _noise(9, 13)
    p = write_image(tmp_path / "a.png", arr)
    out = load_rgb(p)
    assert out.dtype == np.uint8 and out.shape == (9, 13, 3)
    np.testing.assert_array_equal(out, arr)


def test_truncated_jpeg_is_a_decode_error(tmp_path):
    p = write_image(tmp_path / "cut.jpg", _noise(64, 64), quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DecodeError) as e:
        load_rgb(p)
    msg = str(e.value).lower()
    assert "truncated" in msg or "corrupt" in msg
    assert "\n" not in str(e.value)


def test_truncated_png_is_a_decode_error(tmp_path):
    p = write_image(tmp_path / "cut.png", _noise(40, 40))
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DecodeError, match="(?i)truncated|corrupt"):
        load_rgb(p, 16)


def test_jpeg_header_only_is_a_decode_error(tmp_path):
    p = write_image(tmp_path / "head.jpg", _noise(32, 32))
    p.write_bytes(p.read_bytes()[:20])
    with pytest.raises(DecodeError):
        load_rgb(p)


def test_text_file_named_png_is_not_an_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("this is not a picture\n" * 5)
    with pytest.raises(DecodeError, match="not an image"):
        load_rgb(p)


def test_zero_byte_file_is_empty(tmp_path):
    p = tmp_path / "zero.jpg"
    p.write_bytes(b"")
    with pytest.raises(DecodeError, match="empty"):
        load_rgb(p)


def test_missing_file_is_a_decode_error(tmp_path):
    with pytest.raises(DecodeError):
        load_rgb(tmp_path / "gone.png")


def test_16bit_png_is_scaled_to_8bit(tmp_path):
    values = np.array([[0, 257, 32768, 65535], [1000, 4096, 60000, 65280]], dtype=np.uint16)
    p = tmp_path / "deep.png"
    Image.fromarray(values).save(p)  # mode I;16
    with Image.open(p) as check:
        assert check.mode.startswith("I")  # really a 16-bit file, not silently 8-bit
    out = load_rgb(p)
    assert out.shape == (2, 4, 3) and out.dtype == np.uint8
    expected = np.floor(values / 65535.0 * 255.0 + 0.5).astype(np.uint8)
    # 0 -> 0, 257 -> 1, 32768 -> 128, 65535 -> 255, 1000 -> 4, 4096 -> 16, 60000 -> 233, 65280 -> 254
    np.testing.assert_array_equal(expected, [[0, 1, 128, 255], [4, 16, 233, 254]])
    for ch in range(3):  # grey: all three channels equal
        np.testing.assert_array_equal(out[..., ch], expected)


def test_dark_16bit_png_is_not_mistaken_for_8bit(tmp_path):
    # Values all <= 255 in a 16-bit file are *dark*, not full-range 8-bit.
    p = tmp_path / "dark.png"
    Image.fromarray(np.array([[0, 255], [128, 200]], dtype=np.uint16)).save(p)
    assert load_rgb(p).max() <= 1


def test_rgba_png_drops_alpha_keeps_colour(tmp_path):
    arr = np.zeros((6, 8, 4), dtype=np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2] = 200, 100, 50
    arr[..., 3] = 255
    arr[:3, :, 3] = 0  # top half fully transparent
    p = write_image(tmp_path / "alpha.png", arr)
    with Image.open(p) as check:
        assert check.mode == "RGBA"
    out = load_rgb(p)
    assert out.shape == (6, 8, 3)
    np.testing.assert_array_equal(out[5, 7], [200, 100, 50])


def test_palette_png(tmp_path):
    arr = np.zeros((10, 10, 3), dtype=np.uint8)
    arr[:5] = (255, 0, 0)
    arr[5:] = (0, 0, 255)
    p = tmp_path / "pal.png"
    Image.fromarray(arr).quantize(colors=4).save(p)
    with Image.open(p) as check:
        assert check.mode == "P"
    out = load_rgb(p)
    assert out.shape == (10, 10, 3)
    np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
    np.testing.assert_array_equal(out[9, 9], [0, 0, 255])


def test_palette_png_with_transparency(tmp_path):
    img = Image.new("P", (4, 4), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    p = tmp_path / "paltr.png"
    img.save(p, transparency=0)
    out = load_rgb(p)
    np.testing.assert_array_equal(out[0, 0], [10, 200, 30])


def test_greyscale_png(tmp_path):
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    p = write_image(tmp_path / "grey.png", grey)
    with Image.open(p) as check:
        assert check.mode == "L"
    out = load_rgb(p)
    assert out.shape == (3, 4, 3)
    for ch in range(3):
        np.testing.assert_array_equal(out[..., ch], grey)


def test_greyscale_alpha_png(tmp_path):
    p = write_image(tmp_path / "la.png", (90, 90, 90), size=(5, 4), mode="LA")
    out = load_rgb(p)
    assert out.shape == (4, 5, 3)
    assert abs(int(out[0, 0, 0]) - 90) <= 1


def test_one_bit_png(tmp_path):
    arr = np.zeros((4, 4), dtype=np.uint8)
    arr[:, 2:] = 255
    p = tmp_path / "bw.png"
    Image.fromarray(arr).convert("1").save(p)
    out = load_rgb(p)
    assert out[0, 0].tolist() == [0, 0, 0] and out[0, 3].tolist() == [255, 255, 255]


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (12, 10), (255, 0, 0, 0)).save(p, quality=100)  # pure cyan
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = load_rgb(p)
    assert out.shape == (10, 12, 3)
    r, g, b = out[5, 6].astype(int)
    assert r < 20 and g > 235 and b > 235
    small = load_rgb(p, 8)  # with the JPEG draft path too
    assert small.shape == (8, 8, 3)
    assert small[4, 4, 0] < 20 and small[4, 4, 1] > 235


def _corner_marked(w, h):
    """A w x h image: black with a red block in the top-left and a green block top-right."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:8, :8] = (255, 0, 0)
    arr[:8, -8:] = (0, 255, 0)
    return arr


def _colour_at(out, y, x):
    return out[y, x].astype(int)


@pytest.mark.parametrize("orientation", [6, 8, 3])
def test_exif_orientation_is_applied(tmp_path, orientation):
    w, h = 40, 24
    img = Image.fromarray(_corner_marked(w, h))
    exif = Image.Exif()
    exif[274] = orientation
    p = tmp_path / f"rot{orientation}.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_rgb(p)
    red = np.array([255, 0, 0])
    green = np.array([0, 255, 0])
    if orientation == 6:  # displayed rotated 90 degrees clockwise
        assert out.shape == (w, h, 3)
        assert np.abs(_colour_at(out, 2, h - 3) - red).max() < 40  # top-left -> top-right
        assert np.abs(_colour_at(out, w - 3, h - 3) - green).max() < 40  # top-right -> bottom-right
    elif orientation == 8:  # displayed rotated 90 degrees counter-clockwise
        assert out.shape == (w, h, 3)
        assert np.abs(_colour_at(out, w - 3, 2) - red).max() < 40  # top-left -> bottom-left
        assert np.abs(_colour_at(out, 2, 2) - green).max() < 40  # top-right -> top-left
    else:  # 180 degrees
        assert out.shape == (h, w, 3)
        assert np.abs(_colour_at(out, h - 3, w - 3) - red).max() < 40
        assert np.abs(_colour_at(out, h - 3, 2) - green).max() < 40


def test_exif_orientation_with_resize(tmp_path):
    img = Image.fromarray(_corner_marked(40, 24))
    exif = Image.Exif()
    exif[274] = 6
    p = tmp_path / "rot.jpg"
    img.save(p, exif=exif, quality=95)
    out = load_rgb(p, 20)
    assert out.shape == (20, 20, 3)
    assert out[1, 18, 0] > 150 and out[1, 18, 1] < 100  # red still top-right after the resize


def test_resize_to_requested_size(tmp_path):
    p = write_image(tmp_path / "r.png", _noise(13, 29))
    out = load_rgb(p, 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8
    solid = write_image(tmp_path / "solid.png", (10, 20, 30), size=(31, 7))
    np.testing.assert_array_equal(load_rgb(solid, 12), np.full((12, 12, 3), (10, 20, 30), np.uint8))


def test_large_jpeg_draft_resize(tmp_path):
    arr = np.zeros((1200, 1600, 3), dtype=np.uint8)
    arr[:, :800] = (230, 30, 30)  # left half red
    arr[:, 800:] = (30, 30, 230)  # right half blue
    p = write_image(tmp_path / "big.jpg", arr, quality=90)
    out = load_rgb(p, 64)
    assert out.shape == (64, 64, 3)
    assert out[32, 5, 0] > 180 and out[32, 5, 2] < 80
    assert out[32, 58, 2] > 180 and out[32, 58, 0] < 80


def test_decode_many_records_failures_and_keeps_order(tmp_path):
    good = [write_image(tmp_path / f"g{i}.png", (i * 40, 0, 0), size=(9, 9)) for i in range(4)]
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    paths = [good[0], bad, good[1], good[2], good[3]]
    res = decode_many(paths, 8, workers=2)
    assert res.ok.tolist() == [0, 2, 3, 4]
    assert res.images.shape == (4, 8, 8, 3)
    assert [int(im[0, 0, 0]) for im in res.images] == [0, 40, 80, 120]
    assert len(res.failures) == 1 and res.failures[0][0] == bad and "not an image" in res.failures[0][1]


def test_decoding_in_threads_leaves_warning_filters_alone(tmp_path):
    """Decoding must not rewrite the process-wide warning filters (catch_warnings is not
    thread-safe; decode_many runs load_rgb in threads)."""
    paths = [write_image(tmp_path / f"w{i}.jpg", _noise(16, 16, i)) for i in range(8)]
    before = list(warnings.filters)
    errors = []

    def work():
        try:
            for _ in range(5):
                for p in paths:
                    load_rgb(p, 8)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert list(warnings.filters) == before
