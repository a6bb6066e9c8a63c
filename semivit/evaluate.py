"""``ssl eval``: macro F1, accuracy, per-class precision/recall/F1 and the confusion matrix.

It scores a run (its PyTorch ensemble) or an export (through the serving backends), so it sits
above both the trainer and semivit.serve.
"""

from __future__ import annotations

import os
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


def eval_outputs(model: Path, data: Path, out: Optional[Path], force: bool = False) -> tuple[Path, Path]:
    """(report JSON, confusion-matrix PNG), both checked by the one output rule before the model
    loads.  The default MODEL/eval/<DATA>.json is semivit's own and is replaced by a new eval; an
    explicit ``--out`` (and the PNG beside it) is never overwritten without ``--force``, and may
    not lie inside DATA, where the next run would read the PNG as an image."""
    from semivit.safe_io import check_output_file, check_writable_dir

    if out is None:
        out = Path(model) / "eval" / f"{Path(data).resolve().name}.json"
        check_writable_dir(out.parent, f"the report {out}")
        return out, out.with_suffix(".png")
    out = Path(out)
    png = out.with_suffix(".png")
    if png == out:
        raise UserError(f"--out {out}: the report is JSON and a PNG is written beside it; give e.g. "
                        f"{out.with_suffix('.json')}")
    data_dir = Path(data).resolve()
    here = Path(os.path.abspath(out)).parent
    if Path(data).is_dir() and (here == data_dir or data_dir in here.parents
                                or here.resolve() == data_dir or data_dir in here.resolve().parents):
        raise UserError(f"--out {out} is inside the data directory {data}: its confusion-matrix PNG would be "
                        "read as an image by the next run; write the report elsewhere")
    check_output_file(out, force)
    check_output_file(png, force, what="--out's PNG")
    return out, png


def evaluate_cli(model: Path, data: Path, out: Optional[Path], force: bool = False) -> dict:
    out, png = eval_outputs(model, data, out, force)
    report = evaluate(model, data)
    atomic_write_json(out, report)
    plot_confusion(report["confusion_matrix"], report["classes"], png,
                   f"{Path(model).name} on {Path(data).name}: macro F1 {report['macro_f1']:.3f}")
    info(f"macro F1 {report['macro_f1']:.4f}  accuracy {report['accuracy']:.4f}  on {report['n_images']} images"
         + (f" ({len(report['skipped'])} undecodable skipped)" if report["skipped"] else ""))
    for c, m in report["per_class"].items():
        info(f"  {c:24s} P {m['precision']:.3f}  R {m['recall']:.3f}  F1 {m['f1']:.3f}  n={m['support']}")
    info(f"report: {out} (+ {out.with_suffix('.png').name})")
    return report
