"""pseudo.extra_teachers: other runs' stage-1 models join the teacher ensemble of stage 2 (each
on the pool at its own resolution, every member weighted among all of them); wrong settings fail
with one line before anything trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import invoke, one_line_error, soft_targets_after_retrain
from semivit import config


@pytest.fixture(scope="module")
def other_teacher(tiny_data_shared, tmp_path_factory) -> Path:
    """A second finished stage 1 on the same data at another resolution (40 px, not 32) and
    another seed: a co-teacher whose inputs must be decoded again."""
    out = tmp_path_factory.mktemp("teacher") / "T40"
    res = invoke("train", tiny_data_shared, "--preset", "tiny", "--seed", "7", "--set", "model.img_size=40",
                 "--stages", "supervised", "--out", out)
    assert res.exit_code == 0, res.output
    return out


def _member_probs(run_dir: Path, stage: str, paths: list[Path], tta: bool):
    """Each finished fold of ``stage``: (validation macro F1, probabilities on ``paths`` decoded at
    the member's own size) - computed here member by member, not through stage 2's code."""
    from semivit.data.dataset import decode_many
    from semivit.models.checkpoint import load_checkpoint
    from semivit.models.ensemble import members_from_stages
    from semivit.trainer.infer import predict_arrays

    out = []
    for m in members_from_stages(run_dir, [stage]):
        model, doc = load_checkpoint(run_dir / m["path"])
        images = decode_many(paths, int(doc["model"]["img_size"])).images
        out.append((m["val_macro_f1"], predict_arrays(model, images, tta=tta)))
    return out


def test_co_teacher_members_join_the_ensemble_with_their_pooled_weights(tiny_run, tiny_data_shared, other_teacher,
                                                                         tmp_path):
    """Stage 2's soft targets are the validation-F1-weighted mean over ALL teacher members: this
    run's stage 1 (32 px) and the co-teacher's stage 1 (40 px), recomputed member by member."""
    from semivit.models.checkpoint import load_checkpoint

    cfg = config.resolve(preset="tiny", overrides=["pseudo.threshold_mode=all", "pseudo.soft=true",
                                                   "pseudo.train={epochs: 1, early_stopping: false}",
                                                   f"pseudo.extra_teachers=[{other_teacher}]"])
    out = tmp_path / "RUN"
    rows, classes, got = soft_targets_after_retrain(tiny_run, tiny_data_shared, out, cfg)
    paths = [tiny_data_shared / r["image"] for r in rows]
    assert all(p.is_file() for p in paths)
    assert int(load_checkpoint(other_teacher / "stage1" / "fold0" / "best.pt")[1]["model"]["img_size"]) == 40
    members = _member_probs(out, "stage1", paths, cfg.pseudo.tta) + _member_probs(other_teacher, "stage1", paths, cfg.pseudo.tta)
    f1 = np.asarray([f for f, _ in members])
    want = sum(w * p for w, (_, p) in zip(f1 / f1.sum(), members))
    np.testing.assert_allclose(got, want, atol=2e-6)
    # not just this run's own ensemble: the co-teacher moved the targets
    own = _member_probs(out, "stage1", paths, cfg.pseudo.tta)
    f1_own = np.asarray([f for f, _ in own])
    assert np.abs(got - sum(w * p for w, (_, p) in zip(f1_own / f1_own.sum(), own))).max() > 1e-3
    teachers = json.loads((out / "pseudo" / "stats.json").read_text())["teachers"]
    assert [t["img_size"] for t in teachers] == [32, 40]
    assert [t["members"] for t in teachers] == [cfg.cv.folds, cfg.cv.folds]
    assert sum(t["share"] for t in teachers) == pytest.approx(1.0, abs=1e-3)


@pytest.mark.parametrize("case", ["missing", "classes", "ema", "view"])
def test_wrong_co_teachers_fail_in_one_line_before_anything_trains(case, tiny_data, tiny_run, tmp_path):
    teacher = tmp_path / "missing"
    sets = ["pseudo.threshold_mode=all", "pseudo.soft=true"]
    want = "has no finished stage-1 models"
    if case == "classes":  # a finished run on other classes
        teacher = tmp_path / "other"
        shutil.copytree(tiny_run, teacher)
        doc = json.loads((teacher / "ensemble.json").read_text())
        doc["classes"] = ["extra"] + doc["classes"]
        (teacher / "ensemble.json").write_text(json.dumps(doc))
        want = "has classes ['extra'"
    elif case == "ema":
        teacher, sets, want = tiny_run, ["ssl.method=ema-teacher"], "pseudo.extra_teachers needs ssl.method: pseudo-label"
    elif case == "view":
        teacher, want = tiny_run, "pseudo.extra_teachers needs pseudo.targets: image"
        sets += ["pseudo.targets=view"]
    args = [a for s in sets + [f"pseudo.extra_teachers=[{teacher}]"] for a in ("--set", s)]
    res = invoke("train", tiny_data, "--preset", "tiny", *args, "--out", tmp_path / "RUN")
    line = one_line_error(res)
    assert want in line, line
    assert not list((tmp_path / "RUN").glob("stage1/fold*/done.json"))
