"""``ssl eval``: macro F1, accuracy, per-class precision/recall/F1 and the confusion matrix.

It scores a run (its PyTorch ensemble) or an export (through the serving backends), so it sits
above both the trainer and semivit.serve.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from semivit.errors import UserError
from semivit.metrics import classification_metrics, plot_confusion
from semivit.utils import atomic_write_json, info


def _predict_run(run_dir: Path, images: np.ndarray, stages: Optional[Sequence[str]], tta: bool) -> np.ndarray:
    from semivit.trainer.infer import ensemble_predict

    return ensemble_predict(run_dir, images, stages=stages, tta=tta)


def _predict_export(export_dir: Path, images: np.ndarray) -> np.ndarray:
    from semivit.serve.backends import open_backend

    backend = open_backend(export_dir, "auto")
    return np.concatenate([backend.predict(images[s:s + 32])[0] for s in range(0, len(images), 32)])


def model_info(model: Path) -> tuple[str, list[str], int]:
    """('run'|'export', classes, img_size) of a run or export directory."""
    from semivit.utils import read_json

    model = Path(model)
    if (model / "meta.json").is_file():
        meta = read_json(model / "meta.json")
        return "export", meta["classes"], int(meta["img_size"])
    if (model / "ensemble.json").is_file():
        doc = read_json(model / "ensemble.json")
        return "run", doc["classes"], int(doc["img_size"])
    if (model / "config.yaml").is_file():
        raise UserError(f"{model} has no trained ensemble yet (no ensemble.json)")
    raise UserError(f"{model} is neither a run directory (ensemble.json) nor an export directory (meta.json)")


def evaluate(model: Path, data: Path, stages: Optional[Sequence[str]] = None, tta: bool = True) -> dict:
    from semivit.data.dataset import decode_many
    from semivit.data.layout import load_eval

    kind, classes, size = model_info(model)
    ls = load_eval(data, classes)
    dec = decode_many(ls.paths, size)
    if not len(dec.ok):
        raise UserError(f"no decodable images in {data}")
    y = ls.labels[dec.ok]
    probs = _predict_export(model, dec.images) if kind == "export" else _predict_run(model, dec.images, stages, tta)
    report = classification_metrics(y, probs, classes)
    report.update({"model": str(model), "data": str(data), "kind": kind,
                   "skipped": [{"image": str(p), "reason": r} for p, r in dec.failures]})
    if stages:
        report["stages"] = list(stages)
    return report


def evaluate_cli(model: Path, data: Path, out: Optional[Path]) -> dict:
    report = evaluate(model, data)
    out = Path(out) if out else Path(model) / "eval" / f"{Path(data).resolve().name}.json"
    atomic_write_json(out, report)
    plot_confusion(report["confusion_matrix"], report["classes"], out.with_suffix(".png"),
                   f"{Path(model).name} on {Path(data).name}: macro F1 {report['macro_f1']:.3f}")
    info(f"macro F1 {report['macro_f1']:.4f}  accuracy {report['accuracy']:.4f}  on {report['n_images']} images"
         + (f" ({len(report['skipped'])} undecodable skipped)" if report["skipped"] else ""))
    for c, m in report["per_class"].items():
        info(f"  {c:24s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n={m['support']}")
    info(f"report: {out} (+ {out.with_suffix('.png').name})")
    return report
