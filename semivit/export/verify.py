"""Verification of an exported graph: ONNX Runtime (CPU) against the PyTorch ensemble on real
images from the run's data, at several batch shapes.

The images are the run's labeled images (RUN/folds.json, relative to the run's DATA directory),
decoded and resized exactly as training and serving do (``decode_many`` at the model's size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from semivit.data.dataset import decode_many
from semivit.errors import UserError
from semivit.utils import read_json, warn

BATCH_SIZES = (1, 3, 17)  # 1, an odd size and one past 16 (catches fixed-shape folding)
FP32_ATOL = 1e-4
MAX_VERIFY_IMAGES = 64


@dataclass
class RunImages:
    """The run's decodable labeled images with their labels and validation folds."""

    images: np.ndarray  # N x S x S x 3 uint8
    labels: np.ndarray  # N int64 class indices
    folds: np.ndarray  # N int64: the CV fold each image validates in
    names: list[str]  # paths relative to DATA
    source: str  # where they came from, for meta.json


def load_run_images(run_dir: Path, classes: Sequence[str], img_size: int,
                    limit: Optional[int] = None) -> RunImages:
    """The labeled images of RUN/folds.json (the first ``limit`` of a fixed class-interleaved
    order when limited, so every class is represented)."""
    from semivit.config import load_run_config

    run_dir = Path(run_dir)
    _, data = load_run_config(run_dir)
    folds_path = run_dir / "folds.json"
    if not folds_path.is_file():
        raise UserError(f"{run_dir} has no folds.json: cannot find the run's labeled images")
    items = read_json(folds_path)["items"]
    if not Path(data).is_dir():
        raise UserError(f"the run's data directory {data} is gone: export verifies on the run's real "
                        "images, so it needs them (restore the directory or re-point config.yaml)")
    known = {c: i for i, c in enumerate(classes)}
    items = [it for it in items if it["label"] in known]
    if limit is not None and len(items) > limit:
        items = _interleave(items, limit)
    paths = [Path(data) / it["image"] for it in items]
    dec = decode_many(paths, img_size)
    if dec.failures:
        warn(f"{len(dec.failures)} of the run's labeled images no longer decode; verifying without them")
    kept = [items[i] for i in dec.ok]
    if not kept:
        raise UserError(f"none of the run's labeled images under {data} could be decoded")
    return RunImages(dec.images, np.asarray([known[it["label"]] for it in kept], np.int64),
                     np.asarray([int(it["fold"]) for it in kept], np.int64),
                     [it["image"] for it in kept], f"{data} (RUN/folds.json)")


def interleaved_subset(data: RunImages, n: int) -> np.ndarray:
    """Up to ``n`` of the images, classes interleaved (the first of each class, then the
    second...), in their original order: export verification and INT8 calibration use it."""
    order: list[int] = []
    queues = [list(np.flatnonzero(data.labels == c)) for c in np.unique(data.labels)]
    while len(order) < n and any(queues):
        for q in queues:
            if q and len(order) < n:
                order.append(q.pop(0))
    return data.images[np.sort(order)]


def _interleave(items: list[dict], limit: int) -> list[dict]:
    by_class: dict[str, list[dict]] = {}
    for it in items:
        by_class.setdefault(it["label"], []).append(it)
    out: list[dict] = []
    queues = list(by_class.values())
    while len(out) < limit and any(queues):
        for q in queues:
            if q and len(out) < limit:
                out.append(q.pop(0))
    return out


def ort_session(path: Path, threads: int = 0):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_ort(sess, images: np.ndarray, batch: int) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    for s in range(0, len(images), batch):
        p, y = sess.run(["probs", "label"], {"images": np.ascontiguousarray(images[s:s + batch])})
        probs.append(p)
        labels.append(y)
    return np.concatenate(probs), np.concatenate(labels)


@torch.no_grad()
def run_torch(model: torch.nn.Module, images: np.ndarray, batch: int = 32) -> tuple[np.ndarray, np.ndarray]:
    probs, labels = [], []
    for s in range(0, len(images), batch):
        p, y = model(torch.from_numpy(np.ascontiguousarray(images[s:s + batch])))
        probs.append(p.numpy())
        labels.append(y.numpy())
    return np.concatenate(probs), np.concatenate(labels)


def compare(path: Path, model: torch.nn.Module, images: np.ndarray,
            batch_sizes: Sequence[int] = BATCH_SIZES, atol: float = FP32_ATOL) -> dict:
    """ONNX Runtime vs PyTorch on ``images`` at every batch size; ``passed`` when the max absolute
    probability difference is <= ``atol`` and the arg-max agrees on every image.

    The largest batch size runs every image; a smaller size b runs the first 3b + 1 (three full
    batches and a partial one): the shapes are what it tests, and a 10-member ViT-B ensemble on a
    CPU makes every image count."""
    ref_p, ref_y = run_torch(model.eval(), images)
    sess = ort_session(path)
    per_batch = {}
    worst, agree_min = 0.0, 1.0
    for b in batch_sizes:
        n = len(images) if b == max(batch_sizes) else min(len(images), 3 * b + 1)
        p, y = run_ort(sess, images[:n], b)
        diff = float(np.abs(p - ref_p[:n]).max())
        agree = float((y == ref_y[:n]).mean())
        consistent = bool((y == p.argmax(1)).all())  # the graph's label output is its own arg-max
        per_batch[str(b)] = {"images": n, "max_abs_diff": diff, "argmax_agreement": agree,
                             "label_is_argmax": consistent}
        worst, agree_min = max(worst, diff), min(agree_min, agree if consistent else 0.0)
    return {"backend": "onnxruntime-cpu", "reference": "pytorch-fp32", "images": int(len(images)),
            "batch_sizes": list(batch_sizes), "max_abs_diff": worst, "argmax_agreement": agree_min,
            "tolerance": atol, "passed": bool(worst <= atol and agree_min == 1.0), "per_batch": per_batch}


def summary_line(name: str, result: dict) -> str:
    status = "ok" if result["passed"] else "FAILED"
    return (f"verify {name}: {status} - max |p_onnx - p_torch| = {result['max_abs_diff']:.2e} "
            f"(<= {result['tolerance']:.0e}), arg-max agreement {100 * result['argmax_agreement']:.1f}% "
            f"on {result['images']} real images at batch {'/'.join(map(str, result['batch_sizes']))}")
