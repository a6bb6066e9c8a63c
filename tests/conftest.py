"""Shared fixtures: real image files written with Pillow into a temporary directory.

Everything here is tiny (8-40 px images, a few dozen files) so a test that uses it costs
milliseconds.  Reuse from any test file:

- ``tiny_data``          a full DATA directory (train/, unlabeled/, test/, truth file) in tmp_path
- ``tiny_data_shared``   the same, written once per session (treat it as read-only)
- ``make_data``          factory: ``make_data(root, **options)`` for other sizes or a labels.csv layout
- ``write_image``        factory: ``write_image(path, array_or_rgb, size=..., mode=...)``
- ``TINY_CLASSES``       the class names of the tiny dataset, in sorted order
- ``invoke``             ``ssl ARGS`` in-process (typer's CliRunner): the result has exit_code, output
- ``SSL_MODULE``, ``ssl_script``  argv prefixes that run ``ssl`` as a real process
- ``one_line_error``     the project's rule for bad input: exit code 2, no traceback, one ``error:`` line

The classes are separable by colour (each has its own dominant channel), with per-image noise,
random size and a class-dependent stripe pattern, so a tiny model can learn them in a few epochs.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import pytest
from PIL import Image

# One thread per process: tiny models gain nothing from a second thread, and tests that start
# `ssl` subprocesses (or run beside other work) would otherwise oversubscribe the 2 cores, which
# makes OpenMP spin and slows everything down by 10x.  Progress bars off to keep logs short.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("SEMIVIT_QUIET", "1")
# `ssl export` builds, gates and times every serving candidate by default (ORT INT8 x2, OpenVINO
# x3: ~10 s more per export of the tiny run); the tests that exercise that choice ask for it
# with --candidates (tests/test_cpu_serving.py), every other export here is FP32 only.
os.environ.setdefault("SEMIVIT_EXPORT_CANDIDATES", "none")
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# ---------------------------------------------------------------------------- running `ssl`
SSL_MODULE = [sys.executable, "-c", "from semivit.cli import main; main()"]  # `ssl` as a process


def ssl_script() -> list[str]:
    """The installed ``ssl`` console script when this venv has it, else :data:`SSL_MODULE`."""
    script = Path(sys.executable).parent / "ssl"
    return [str(script)] if script.exists() else list(SSL_MODULE)


def invoke(*args, env: Optional[dict] = None):
    """``ssl ARGS`` in this process (typer's CliRunner); arguments may be paths."""
    from typer.testing import CliRunner

    from semivit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def one_line_error(result, output: Optional[str] = None, *, expected: int = 2, after_progress: bool = False) -> str:
    """Bad input: exit code ``expected`` (2), no traceback, and the error as ONE line starting
    ``error:`` - the only line, or with ``after_progress`` the last one after progress lines.

    ``result``: a CliRunner result, a finished process (its stderr is the error stream; stdout
    must hold no traceback either) or an exit code with its ``output``.  Returns the error line.
    """
    if output is not None:
        code = result
    elif hasattr(result, "returncode"):
        code, output = result.returncode, result.stderr
        assert "Traceback" not in result.stdout, result.stdout
    else:
        code, output = result.exit_code, result.output
    assert code == expected, (code, output)
    assert "Traceback" not in output, output
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], output
    assert after_progress or len(lines) == 1, output
    return errors[0]


TINY_CLASSES = ["blue", "green", "red"]  # sorted: the order every layout loader yields
_CHANNEL = {"red": 0, "green": 1, "blue": 2}


def class_image(label: str, rng: np.random.Generator, size: Optional[tuple[int, int]] = None) -> np.ndarray:
    """An HxWx3 uint8 image of class ``label``: its colour channel high, the others low, plus noise.

    Each class also has its own stripe orientation (red: none, green: horizontal, blue: vertical)
    so the classes stay apart in greyscale too.
    """
    w, h = size if size is not None else (int(rng.integers(20, 41)), int(rng.integers(20, 41)))
    img = rng.normal(60, 20, size=(h, w, 3))
    img[..., _CHANNEL[label]] += 140
    if label == "green":
        img[::4] += 40
    elif label == "blue":
        img[:, ::4] += 40
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Union[str, Path], data: Union[np.ndarray, Sequence[int]] = (128, 64, 32),
                size: tuple[int, int] = (16, 12), mode: Optional[str] = None, **save_kwargs) -> Path:
    """Write a real image file with Pillow; the format follows the extension.

    ``data`` is an array (HxW or HxWx3/4) or a solid colour (then ``size`` = (width, height)).
    ``mode`` converts before saving (e.g. "L", "P", "RGBA", "CMYK", "I;16").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, np.ndarray):
        img = Image.fromarray(data)
    else:
        img = Image.new("RGBA" if len(data) == 4 else "RGB", size, tuple(data))
    if mode is not None and img.mode != mode:
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


def make_data(root: Union[str, Path], classes: Sequence[str] = TINY_CLASSES, n_train: int = 12,
              n_unlabeled: int = 24, n_test: int = 6, layout: str = "folders", seed: int = 0) -> Path:
    """Write a DATA directory and return its path.

    - ``train/<class>/`` with ``n_train`` images per class (``layout="folders"``), or the same
      files under ``images/`` listed in ``labels.csv`` (columns image,label; ``layout="csv"``);
    - ``unlabeled/`` with ``n_unlabeled`` images in total, spread over the top level,
      ``unlabeled/batch1/`` and ``unlabeled/batch1/deeper/``, classes in turn;
    - ``unlabeled_truth.csv`` (image,label) with their true classes, as the demo data has;
    - ``test/<class>/`` with ``n_test`` images per class (omitted when 0).

    Formats alternate between .png and .jpg; sizes are random in 20-40 px.  Deterministic for
    ``seed``.
    """
    root = Path(root)
    rng = np.random.default_rng(seed)
    ext = [".png", ".jpg"]
    rows = []
    for c in classes:
        for i in range(n_train):
            rel = f"train/{c}/{c}_{i:03d}{ext[i % 2]}" if layout == "folders" else f"images/{c}_{i:03d}{ext[i % 2]}"
            write_image(root / rel, class_image(c, rng))
            rows.append((rel, c))
    if layout == "csv":
        with open(root / "labels.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), *rows])
    elif layout != "folders":
        raise ValueError(f"layout must be 'folders' or 'csv', not {layout!r}")
    truth = []
    subdirs = ["unlabeled", "unlabeled/batch1", "unlabeled/batch1/deeper"]
    for i in range(n_unlabeled):
        c = classes[i % len(classes)]
        rel = f"{subdirs[i % 3]}/u_{i:03d}{ext[i % 2]}"
        write_image(root / rel, class_image(c, rng))
        truth.append((rel, c))
    if n_unlabeled:
        with open(root / "unlabeled_truth.csv", "w", newline="") as f:
            csv.writer(f).writerows([("image", "label"), *truth])
    for c in classes:
        for i in range(n_test):
            write_image(root / f"test/{c}/t_{c}_{i:03d}{ext[i % 2]}", class_image(c, rng))
    return root


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """``tmp_path/DATA``: 3 classes (blue, green, red) x 12 train images, 24 unlabeled images
    (8 per class; at unlabeled/, unlabeled/batch1/ and unlabeled/batch1/deeper/) with their truth
    in unlabeled_truth.csv, and test/ with 6 per class.  See :func:`make_data`."""
    return make_data(tmp_path / "DATA")


@pytest.fixture(scope="session")
def tiny_data_shared(tmp_path_factory) -> Path:
    """The same data as ``tiny_data``, written once per session.  Do not modify it."""
    return make_data(tmp_path_factory.mktemp("shared") / "DATA")


@pytest.fixture(name="make_data")
def make_data_fixture():
    """The :func:`make_data` factory."""
    return make_data


@pytest.fixture(name="write_image")
def write_image_fixture():
    """The :func:`write_image` factory."""
    return write_image


@pytest.fixture(name="TINY_CLASSES")
def tiny_classes_fixture() -> list[str]:
    return list(TINY_CLASSES)


@pytest.fixture(scope="session")
def tiny_run(tiny_data_shared: Path, tmp_path_factory) -> Path:
    """A finished run: ``ssl train tiny_data_shared --preset tiny --out RUN``, trained once per
    session (~30-60 s on a busy 2-core box): 2 folds x (stage 1 + stage 3) = 4 ensemble members,
    32 px, RUN/ensemble.json, RUN/folds.json, the checkpoints.  Treat it as read-only: copy it
    (``shutil.copytree``, it is under 1 MB) before writing into it, e.g. before an ``ssl export``
    with the default RUN/export or a registry promotion."""
    run = tmp_path_factory.mktemp("tiny_run") / "RUN"
    res = invoke("train", tiny_data_shared, "--preset", "tiny", "--out", run)
    assert res.exit_code == 0, f"tiny training failed ({res.exit_code}):\n{res.output}\n{res.exception!r}"
    assert (run / "ensemble.json").is_file()
    return run


def retrain_on(tiny_run: Path, data: Path, out: Path, cfg):
    """Stage 2 and stage 3 of ``cfg`` in a new run ``out`` on a copy of ``tiny_run``'s folds and
    stage 1 (stage 1 is not trained again); returns the Run."""
    import shutil

    from semivit.trainer.pipeline import run_training
    from semivit.trainer.run import open_run

    open_run(out, cfg, data)
    shutil.copy2(tiny_run / "folds.json", out / "folds.json")
    shutil.copytree(tiny_run / "stage1", out / "stage1")
    return run_training(data, out, cfg, stages="pseudo,retrain")


def soft_targets_after_retrain(tiny_run: Path, data: Path, out: Path, cfg):
    """:func:`retrain_on`, then stage 2's pseudo_labels.csv: (its rows, the class names, the soft
    targets as an array, one row per image)."""
    retrain_on(tiny_run, data, out, cfg)
    with open(out / "pseudo" / "pseudo_labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = [k[2:] for k in rows[0] if k.startswith("p_")]
    return rows, classes, np.asarray([[float(r[f"p_{c}"]) for c in classes] for r in rows])
