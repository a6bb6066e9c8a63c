"""Image discovery: recursive, case-insensitive extensions, hidden and non-image files counted."""

from __future__ import annotations

import os

import pytest

from conftest import write_image
from semivit.data.discover import IMAGE_EXTENSIONS, discover_images, is_image_name


def _rel(disc, root):
    return [p.relative_to(root).as_posix() for p in disc.files]


def test_nested_upper_case_hidden_and_other_files(tmp_path):
    root = tmp_path / "imgs"
    for rel in ["b.png", "a.JPG", "sub/c.PNG", "sub/deeper/d.JpG", "sub/deeper/e.jpeg",
                "z/f.TIFF", "z/g.webp", "z/h.bmp", "z/i.tif"]:
        write_image(root / rel)
    (root / "readme.txt").write_text("hello")
    (root / "sub" / "labels.csv").write_text("x")
    (root / "sub" / "noext").write_bytes(b"\x00")
    write_image(root / ".hidden.png")  # hidden file
    write_image(root / ".cache" / "x.png")  # hidden dir: both files skipped
    write_image(root / ".cache" / "deep" / "y.jpg")
    write_image(root / "sub" / ".thumbs" / "t.png")

    disc = discover_images(root)
    assert _rel(disc, root) == ["a.JPG", "b.png", "sub/c.PNG", "sub/deeper/d.JpG", "sub/deeper/e.jpeg",
                                "z/f.TIFF", "z/g.webp", "z/h.bmp", "z/i.tif"]
    assert all(p.is_absolute() and p.is_file() for p in disc.files)
    assert disc.ignored_hidden == 4
    assert disc.ignored_other == 3
    assert disc.ignored == 7
    assert len(disc.ignored_examples) == 3 and "readme.txt" in disc.ignored_examples
    s = disc.summary()
    assert "9 images" in s and "3 non-image" in s and "4 hidden" in s


def test_order_is_sorted_by_relative_path_and_deterministic(tmp_path):
    names = ["b/2.png", "a/10.png", "a/9.png", "c.png", "a.png", "B.png"]
    for n in reversed(names):
        write_image(tmp_path / n)
    first = discover_images(tmp_path)
    rel = _rel(first, tmp_path)
    assert rel == sorted(rel)
    assert rel == ["B.png", "a.png", "a/10.png", "a/9.png", "b/2.png", "c.png"]
    # Touch files in a different order: the listing does not follow creation/mtime order.
    os.utime(tmp_path / "c.png", (1, 1))
    assert _rel(discover_images(tmp_path), tmp_path) == rel


def test_empty_and_missing_directories(tmp_path):
    disc = discover_images(tmp_path)
    assert disc.files == [] and disc.ignored == 0
    assert discover_images(tmp_path / "missing").files == []


def test_exclude_skips_a_subtree(tmp_path):
    write_image(tmp_path / "keep" / "a.png")
    write_image(tmp_path / "drop" / "b.png")
    disc = discover_images(tmp_path, exclude=(tmp_path / "drop",))
    assert _rel(disc, tmp_path) == ["keep/a.png"]


def test_symlinked_directory_cycle_does_not_hang(tmp_path):
    write_image(tmp_path / "d" / "a.png")
    try:
        os.symlink(tmp_path, tmp_path / "d" / "loop")
    except OSError:  # pragma: no cover - no symlinks on this filesystem
        pytest.skip("symlinks not supported")
    assert _rel(discover_images(tmp_path), tmp_path) == ["d/a.png"]


@pytest.mark.parametrize("name,ok", [("x.PNG", True), ("x.Jpeg", True), ("x.tif", True), ("x.webp", True),
                                     ("x.gif", False), ("x.png.txt", False), ("png", False), ("x.", False)])
def test_is_image_name(name, ok):
    assert is_image_name(name) is ok


def test_extensions_match_design():
    assert IMAGE_EXTENSIONS == {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
