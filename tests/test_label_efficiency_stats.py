"""The label-efficiency benchmark's statistics: paired t intervals (sample SD), verdicts that
follow the interval, (b) chosen on dev only, the best (f) chosen on dev only."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def le():
    return _benchmark("label_efficiency")


def test_t_interval_uses_sample_sd(le):
    d = [0.01, 0.03, 0.02, 0.04, 0.00]
    m, lo, hi = le.t_interval(d)
    sd = math.sqrt(sum((x - 0.02) ** 2 for x in d) / 4)  # ddof=1
    half = 2.7764451051977987 * sd / math.sqrt(5)  # t(0.975, 4)
    assert m == pytest.approx(0.02) and lo == pytest.approx(0.02 - half) and hi == pytest.approx(0.02 + half)
    assert math.isnan(le.t_interval([0.5])[1])


def test_verdict_follows_the_interval(le):
    base = {"a": "b", "b": "g", "n": 5, "diff_mean": 0.01}
    assert "demonstrated." in le.verdict(base | {"ci_low": 0.001, "ci_high": 0.02})
    assert "not demonstrated" not in le.verdict(base | {"ci_low": 0.001, "ci_high": 0.02})
    assert "not demonstrated" in le.verdict(base | {"ci_low": -0.001, "ci_high": 0.02})
    assert "BEHIND" in le.verdict(base | {"diff_mean": -0.01, "ci_low": -0.02, "ci_high": -0.001})
    assert "not demonstrated" in le.verdict(base | {"n": 1, "ci_low": None, "ci_high": None})


def _row(seed, dev, test):
    arm = lambda f: {"macro_f1": f, "accuracy": f, "steps": 10, "per_class_f1": {"x": f}}  # noqa: E731
    return {"fraction": 0.1, "seed": seed, "dev": {k: arm(v) for k, v in dev.items()},
            "test": {k: arm(v) for k, v in test.items()}, "runs": {}}


def test_b_and_f_best_are_chosen_on_dev_never_on_test(le):
    # on dev, cand_x and f128_ens win; on test, cand_y and f128_single would
    rows = [_row(s, {"a": 0.3, "cand_x": 0.5, "cand_y": 0.4, "g": 0.45, "f128_single": 0.2, "f128_ens": 0.3},
                 {"a": 0.3, "cand_x": 0.4, "cand_y": 0.6, "g": 0.35, "f128_single": 0.5, "f128_ens": 0.1})
            for s in range(5)]
    b = le.choose_b(rows)
    assert b == "cand_x"
    summary, paired, extra = le.summarise(rows, [], "test", b)
    assert extra["0.1"]["f_best"] == "f128_ens"
    by_arm = {s["arm"]: s for s in summary}
    assert by_arm["b"]["macro_f1_mean"] == pytest.approx(0.4) and by_arm["f_best"]["macro_f1_mean"] == pytest.approx(0.1)
    bg = next(p for p in paired if (p["a"], p["b"]) == ("b", "g"))
    assert bg["n"] == 5 and bg["diff_mean"] == pytest.approx(0.05) and bg["ci_low"] == pytest.approx(0.05)
    # (b) against every other candidate, on each split (on dev: the margin that chose it)
    by = next(p for p in paired if (p["a"], p["b"]) == ("b", "cand_y"))
    assert by["n"] == 5 and by["diff_mean"] == pytest.approx(-0.2)
    assert not any(p["a"] == "b" and p["b"] == "cand_x" for p in paired)  # not against itself
    _, dev_paired, _ = le.summarise(rows, [], "dev", b)
    assert next(p for p in dev_paired if (p["a"], p["b"]) == ("b", "cand_y"))["diff_mean"] == pytest.approx(0.1)


def test_a_challenger_replaces_the_default_only_by_more_than_the_tie_margin(le):
    """With an incumbent (today's default), a challenger whose mean dev macro F1 leads by no more
    than the margin is a tie and the default stays; a larger lead replaces it.  Test never decides."""
    rows = [_row(s, {"a": 0.3, "cand_old": 0.450, "cand_new": 0.453 + (0.01 if s == 0 else 0.0)},
                 {"a": 0.3, "cand_old": 0.40, "cand_new": 0.60}) for s in range(5)]
    # cand_new leads by 0.005 on dev (0.003 + 0.01 / 5): the best mean without an incumbent
    assert le.choose_b(rows) == "cand_new"
    assert le.choose_b(rows, incumbent="old", margin=0.006) == "cand_old"  # a tie keeps the default
    assert le.choose_b(rows, incumbent="old", margin=0.004) == "cand_new"
    assert le.choose_b(rows, incumbent="new", margin=0.005) == "cand_new"  # the best is the incumbent
    assert le.choose_b(rows, among=["new"], incumbent="old", margin=0.005) == "cand_new"  # incumbent not among


def test_a_results_file_from_another_command_is_not_replaced_without_force(le, tmp_path):
    """A trial run must not silently replace a committed summary: the same command may rewrite
    its own file (reproducing it), another command is refused before any training, --force allows."""
    import json

    stem = tmp_path / "label_efficiency"
    le.check_results_target(stem, "python x --seeds 0 1 2 3 4", force=False)  # nothing there yet
    stem.with_suffix(".json").write_text(json.dumps({"command": "python x --seeds 0 1 2 3 4"}))
    le.check_results_target(stem, "python x --seeds 0 1 2 3 4", force=False)  # the same command: fine
    with pytest.raises(SystemExit, match="another command.*--results DIR.*--force"):
        le.check_results_target(stem, "python x --seeds 4", force=False)
    le.check_results_target(stem, "python x --seeds 4", force=True)
    stem.with_suffix(".json").write_text("{not json")
    with pytest.raises(SystemExit, match="unreadable"):
        le.check_results_target(stem, "python x --seeds 4", force=False)


def test_best_f_is_chosen_on_the_seeds_that_ran_every_f_arm(le):
    """(f) at the second resolution runs on fewer seeds; the best (f) is chosen on the seeds that
    have both, so a single lucky seed does not win over a mean of five."""
    rows = [_row(s, {"a": 0.3, "f128_ens": 0.40 + (0.5 if s == 3 else 0.0)}, {"a": 0.3, "f128_ens": 0.4})
            for s in range(5)]
    rows[0]["dev"]["f192_ens"] = rows[0]["test"]["f192_ens"] = {"macro_f1": 0.45, "accuracy": 0.45, "steps": 10,
                                                                 "per_class_f1": {"x": 0.45}}
    # over its five seeds f128_ens averages 0.50 (> 0.45), but on seed 0, where both ran, f192 is ahead
    _, _, extra = le.summarise(rows, [], "test", None)
    assert extra["0.1"]["f_best"] == "f192_ens"
    rows[0]["dev"]["f192_ens"] = dict(rows[0]["dev"]["f192_ens"], macro_f1=0.39)  # behind on the common seed
    _, _, extra = le.summarise(rows, [], "test", None)
    assert extra["0.1"]["f_best"] == "f128_ens"


def test_a_stage0_candidate_trains_its_own_stage1_and_is_paired_with_a(le):
    """A candidate that changes stage 0 (pretrain.*) cannot share run A's stage 1; its own stage-1
    ensemble (cand_NAME_s1) is paired with (a) and is never a choice for (b)."""
    assert le.own_stage1(["pretrain.method=mae"]) and le.own_stage1(["x.y=1", " pretrain.epochs = 3"])
    assert not le.own_stage1(["ssl.method=ema-teacher", "pseudo.labeled_share=0.75"]) and not le.own_stage1([])
    rows = [_row(s, {"a": 0.3, "cand_mae_s1": 0.9, "cand_mae": 0.4, "cand_x": 0.5},
                 {"a": 0.3, "cand_mae_s1": 0.35 + s / 100, "cand_mae": 0.4, "cand_x": 0.5}) for s in range(5)]
    assert le.choose_b(rows) == "cand_x"  # the stage-1 arm's 0.9 on dev is not a method
    _, paired, _ = le.summarise(rows, [], "test", "cand_x")
    s1 = next(p for p in paired if (p["a"], p["b"]) == ("cand_mae_s1", "a"))
    assert s1["n"] == 5 and s1["diff_mean"] == pytest.approx(0.07)
    assert not any("cand_mae_s1" in (p["a"], p["b"]) and "a" not in (p["a"], p["b"]) for p in paired)


def test_a_distillation_rounds_candidate_counts_every_round_and_reuses_round_one(le, tmp_path, monkeypatch):
    """``pseudo.rounds=N``: the compute-matched control must match stage 3's steps summed over the
    rounds (per fold); a candidate with the same other overrides as a one-round candidate starts
    from that run's stage 2 + 3 as its round 1 (the same seeds), copied, not trained again."""
    assert le.split_rounds(["pseudo.rounds=3", "pseudo.labeled_share=0.75"]) == (["pseudo.labeled_share=0.75"], 3)
    assert le.split_rounds([]) == ([], 1)
    run = tmp_path / "C"
    for stage, steps in (("stage3_round1", [10, 12]), ("stage3_round2", [20, 22]), ("stage3", [30, 33])):
        for k, n in enumerate(steps):
            (run / stage / f"fold{k}").mkdir(parents=True)
            (run / stage / f"fold{k}" / "done.json").write_text(json.dumps({"steps": n}))
    assert le.retrain_steps(run) == [60, 67]
    assert le.stage_steps(run, "stage3") == [30, 33]
    parent, first = tmp_path / "A", tmp_path / "B"
    (parent / "stage1").mkdir(parents=True)
    (parent / "folds.json").write_text("{}")
    (first / "stage3" / "fold0").mkdir(parents=True)
    (first / "stage3" / "fold0" / "done.json").write_text("{}")
    (first / "pseudo").mkdir()
    trained = []
    monkeypatch.setattr(le, "run_training", lambda data, out, cfg, stages: trained.append(stages))
    monkeypatch.setattr(le, "open_run", lambda out, cfg, data: out.mkdir(parents=True))
    out = le.derived_run(tmp_path / "C2", None, tmp_path, parent, ["folds.json", "stage1"], "pseudo,retrain",
                         also=((first / "pseudo", "pseudo"), (first / "stage3", "stage3_round1")))
    assert (out / "stage3_round1" / "fold0" / "done.json").is_file() and (out / "pseudo").is_dir()
    assert not (out / "stage3").exists() and (out / "folds.json").is_file() and trained == ["pseudo,retrain"]


def test_upper_bound_results_are_read_back_when_only_summarising(le, tmp_path):
    """(e) recorded in --work counts in a --summarise-only run (it once dropped seed 0's, the only
    seed (e) trains); a freshly computed one is not counted twice."""
    for seed, f1 in ((0, 0.53), (1, 0.55)):
        (tmp_path / f"result-upper-elpv-s{seed}.json").write_text(json.dumps({"seed": seed, "macro_f1": f1}))
    assert [u["seed"] for u in le.upper_results(tmp_path, [])] == [0, 1]
    fresh = [{"seed": 0, "macro_f1": 0.53}]
    assert [u["seed"] for u in le.upper_results(tmp_path, fresh)] == [0, 1]
    assert le.upper_results(tmp_path / "none", []) == []


def test_lite0_learning_rate_search_extends_the_grid_past_a_winning_edge(le):
    """(f)'s learning rate: a best value on the grid's edge is extended x3 (or /3) until the best
    is interior or the limits stop it."""
    calls = []

    def peaked_at(top):
        def score(lr):
            calls.append(lr)
            return -abs(math.log(lr / top))
        return score

    assert le.search_lr(peaked_at(3e-4), [1e-4, 3e-4, 1e-3], (3e-5, 1e-2)) == 3e-4  # interior: no extension
    calls.clear()
    assert le.search_lr(peaked_at(3e-3), [1e-4, 3e-4, 1e-3], (3e-5, 1e-2)) == 3e-3  # upper edge: 3e-3, then 9e-3
    assert max(calls) == 9e-3
    assert le.search_lr(peaked_at(1e-6), [1e-4, 3e-4, 1e-3], (3e-5, 1e-2)) == 3e-5  # stops at the lower limit
    assert le.search_lr(peaked_at(1.0), [1e-4, 3e-4, 1e-3], (3e-5, 1e-2)) == 9e-3  # and at the upper one


def test_lite0_training_length_is_chosen_on_validation_at_the_chosen_rate(le, tmp_path, monkeypatch):
    """(f)'s epochs: the learning rate is searched at the first length, then each longer length is
    trained at that rate on the same validation folds and the best kept (recorded, and reused on
    the next call without training); every length trains without early stopping."""
    import semivit.trainer.folds as folds

    trained = []

    def fake_train_fold(run, stage, k):  # scripted: best lr 3e-4; 40 epochs better than 20
        lr, epochs = run.train.lr, run.train.epochs
        assert run.train.early_stopping is False and run.train.restart_epochs == epochs
        trained.append((lr, epochs, k))
        return {"val_macro_f1": 0.5 - abs(math.log(lr / 3e-4)) / 10 + (0.05 if epochs == 40 else 0.0)}

    monkeypatch.setattr(folds, "train_fold", fake_train_fold)
    monkeypatch.setattr(le, "open_run", lambda out, cfg, data: (out.mkdir(parents=True, exist_ok=True), cfg)[1])
    (tmp_path / "folds.json").write_text("{}")
    lr, epochs = le.lite0_hparams(tmp_path, "t", tmp_path, "quick", 128, [], tmp_path / "folds.json")
    assert (lr, epochs) == (3e-4, 40)
    assert {(e, k) for lr_, e, k in trained if lr_ != 3e-4} == {(20, 0), (20, 1)}  # the rate searched at 20
    assert [(lr_, e) for lr_, e, _ in trained if e == 40] == [(3e-4, 40)] * 2  # 40 only at the chosen rate
    rec = json.loads((tmp_path / "lite0-lr-t-r128.json").read_text())
    assert rec["epochs"] == 40 and set(rec["val_macro_f1_by_epochs"]) == {"20", "40"}
    n = len(trained)
    assert le.lite0_hparams(tmp_path, "t", tmp_path, "quick", 128, [], tmp_path / "folds.json") == (3e-4, 40)
    assert len(trained) == n  # read from the record


def test_model_study_ranks_variants_on_dev_by_paired_seeds(tmp_path):
    """benchmarks/model_study.py: a variant is compared with the preset seed by seed on DEV
    (test only reported), with the sample SD; a variant ahead on test but not on dev is not chosen."""
    import argparse
    import json

    spec = importlib.util.spec_from_file_location("model_study", ROOT / "benchmarks" / "model_study.py")
    ms = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ms)

    def write(work, seed, dev, test):
        work.mkdir(parents=True, exist_ok=True)
        arm = lambda f: {"macro_f1": f, "accuracy": 0.5, "seconds": 10}  # noqa: E731
        (work / f"result-elpv-f0.1-s{seed}.json").write_text(json.dumps({"dev": {"a": arm(dev)}, "test": {"a": arm(test)}}))

    for seed, (dev, test) in enumerate([(0.40, 0.40), (0.42, 0.41), (0.44, 0.42)]):
        write(tmp_path / "base", seed, dev, test)
        write(tmp_path / "study" / "d2", seed, dev + 0.02 + 0.001 * seed, test - 0.01)  # better on dev
        write(tmp_path / "study" / "d6", seed, dev - 0.01 * (seed - 1), test + 0.05)  # test only
    args = argparse.Namespace(seeds=[0, 1, 2], fraction=0.1, variants=["preset", "d2", "d6"],
                              preset_work=tmp_path / "base", work=tmp_path / "study")
    doc = ms.summarise(args)
    pre = next(r for r in doc["variants"] if r["variant"] == "preset")
    assert pre["dev_macro_f1_sd"] == pytest.approx(0.02)  # ddof=1 of 0.40, 0.42, 0.44
    d2 = next(p for p in doc["paired"] if p["a"] == "d2" and p["split"] == "dev")
    assert d2["n"] == 3 and d2["diff_mean"] == pytest.approx(0.021) and d2["ci_low"] > 0
    d6 = next(p for p in doc["paired"] if p["a"] == "d6" and p["split"] == "dev")
    assert d6["ci_low"] < 0 < d6["ci_high"]
    assert "d2" in doc["decision"] and "d6" not in doc["decision"]
    ms.write_png(doc, tmp_path / "study.png")
    assert (tmp_path / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_control_epochs_come_from_the_steps_stage1_really_took(le, tmp_path):
    """(g)'s epochs = the matched candidate's stage-3 steps / the labeled loader's steps per epoch,
    read from run A's stage-1 folds (it once read folds.json's fold count and trained 4x too long)."""
    import json

    for k, (steps, epochs) in enumerate([(60, 15), (60, 15), (48, 12), (75, 15), (60, 15)]):
        d = tmp_path / "stage1" / f"fold{k}"
        d.mkdir(parents=True)
        (d / "done.json").write_text(json.dumps({"steps": steps, "epochs_run": epochs}))
    assert le.labeled_steps_per_epoch(tmp_path, 5) == 4
    assert math.ceil(663 / le.labeled_steps_per_epoch(tmp_path, 5)) == 166


def test_compare_arms_pairs_seeds_across_result_files(tmp_path):
    """Arms of two configurations pair by (fraction, seed); only seeds both have count; the
    verdict follows the interval; a malformed --pair is a one-line error."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("compare_arms", ROOT / "benchmarks" / "compare_arms.py")
    ca = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ca)

    def doc(vals, arm="b"):  # accuracy = macro F1 + 0.1 x seed: paired differences stay those of macro F1
        return {"runs": [{"fraction": 0.1, "seed": s, "dev": {arm: {"macro_f1": v, "accuracy": v + s / 10}}, "test": {}}
                         for s, v in vals.items()]}

    docs = {"long": doc({0: 0.50, 1: 0.52, 2: 0.55, 3: 0.51, 9: 0.9}), "base": doc({0: 0.45, 1: 0.50, 2: 0.50, 3: 0.47})}
    (row,) = ca.compare(docs, ["b@long-b@base"], "dev")
    assert row["n"] == 4 and row["per_seed"] == {"0": 0.05, "1": 0.02, "2": 0.05, "3": 0.04}
    assert row["diff_mean"] == pytest.approx(0.04) and row["ci_low"] > 0 and "demonstrated" in row["verdict"]
    docs["base"] = doc({0: 0.55, 1: 0.45, 2: 0.58, 3: 0.45})  # mixed signs: the interval spans zero
    (row,) = ca.compare(docs, ["b@long-b@base"], "dev")
    assert row["ci_low"] < 0 < row["ci_high"] and "not demonstrated" in row["verdict"]
    with pytest.raises(SystemExit, match="ARM@NAME"):
        ca.compare(docs, ["b-long"], "dev")
    with pytest.raises(SystemExit, match="no --result named"):
        ca.compare(docs, ["b@long-b@other"], "dev")
    (tmp_path / "l.json").write_text(json.dumps(docs["long"]))
    (tmp_path / "b.json").write_text(json.dumps(docs["base"]))
    ca.main(["--result", f"long={tmp_path / 'l.json'}", "--result", f"base={tmp_path / 'b.json'}",
             "--pair", "b@long-b@base", "--out", str(tmp_path / "cmp")])
    assert json.loads((tmp_path / "cmp.json").read_text())["paired"][0]["n"] == 4
    assert "| macro_f1 | dev | 0.1 | b@long | b@base | 4 |" in (tmp_path / "cmp.md").read_text()
    docs["long"]["runs"][0]["dev"]["b"]["accuracy"] = 0.95  # accuracy, not macro F1, when asked
    (acc,) = ca.compare(docs, ["b@long-b@base"], "dev", "accuracy")
    assert acc["metric"] == "accuracy" and acc["per_seed"]["0"] == pytest.approx(0.95 - 0.55)
    assert acc["per_seed"]["1"] == pytest.approx(0.52 - 0.45) and acc["mean_a"] == pytest.approx((0.95 + 0.62 + 0.75 + 0.81) / 4)


def test_ensemble_weighting_measures_the_leak_and_scores_both_weightings(tmp_path, monkeypatch):
    """benchmarks/ensemble_weighting.py on a scripted seed: two stage-1 members (val F1 0.3) that
    are right, two stage-3 members (val F1 0.9, the leak) that answer class 0 for everything.
    F1 weights give the students 75% of the weight and the ensemble answers class 0 (macro F1
    1/3); equal weights let the stage-1 members carry the class-1 images (macro F1 1.0)."""
    import json

    import numpy as np

    spec = importlib.util.spec_from_file_location("ensemble_weighting", ROOT / "benchmarks" / "ensemble_weighting.py")
    ew = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ew)

    runs = tmp_path / "runs-elpv-f0.1-s0"
    (runs / "A").mkdir(parents=True)
    (runs / "A" / "ensemble.json").write_text(json.dumps({"classes": ["ok", "bad"], "img_size": 32}))
    for k in (0, 1):
        (runs / "C-mix" / "stage3" / f"fold{k}").mkdir(parents=True)
        (runs / "C-mix" / "stage3" / f"fold{k}" / "done.json").write_text("{}")
    (runs / "C-empty" / "stage3").mkdir(parents=True)  # a candidate that never finished a fold: no arm
    y = np.array([0, 0, 1, 1])
    right = np.array([[0.7, 0.3], [0.7, 0.3], [0.3, 0.7], [0.3, 0.7]])
    all0 = np.array([[0.6, 0.4]] * 4)

    def fake_members(run_dir, stages):
        if run_dir.name == "A":
            return [(run_dir, {"fold": k, "stage": "stage1", "val_macro_f1": 0.3, "path": f"s1-{k}"}) for k in (0, 1)]
        return [(run_dir, {"fold": k, "stage": "stage3", "val_macro_f1": 0.9, "path": f"s3-{k}"}) for k in (0, 1)]

    class FakeScorer:
        def __init__(self, split_dir, classes, size):
            self.y, self.classes = y, classes

        def member_probs(self, run_dir, m):
            return right if m["path"].startswith("s1") else all0

    monkeypatch.setattr(ew, "members", fake_members)
    monkeypatch.setattr(ew, "Scorer", FakeScorer)
    res = ew.one_seed(runs, tmp_path / "data")
    assert set(res["scores"]["test"]) == {"a", "cand_mix"}
    assert res["scores"]["test"]["cand_mix"] == {"f1": round(1 / 3, 4), "equal": 1.0}
    assert res["scores"]["dev"]["a"] == {"f1": 1.0, "equal": 1.0}
    assert res["folds"]["cand_mix"]["stage3_minus_stage1_val_f1"] == [0.6, 0.6]
    assert res["folds"]["cand_mix"]["stage3_weight_share"] == 0.75
    quick = ew.one_seed(runs, tmp_path / "data", rescore=False)  # --leak-only: no scoring
    assert quick["scores"] == {"dev": {}, "test": {}} and quick["folds"] == res["folds"]


def test_upper_gap_pairs_each_seed_with_its_own_upper_bound(tmp_path, le):
    """benchmarks/upper_gap.py: the share of the (a) -> (e) gap that (b) closes, per seed, with (e)
    read from a result file's upper_bound list or a per-seed record; seeds without (e) are left out."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("upper_gap", ROOT / "benchmarks" / "upper_gap.py")
    ug = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ug)

    def run(seed, a, b, g, fraction=0.1):
        return {"fraction": fraction, "seed": seed, "test": {"a": {"macro_f1": a}, "b": {"macro_f1": b},
                                                              "g": {"macro_f1": g}}}

    doc = {"machine": "m", "runs": [run(0, 0.40, 0.45, 0.44), run(1, 0.50, 0.52, 0.55), run(2, 0.4, 0.6, 0.6),
                                    run(0, 0.1, 0.1, 0.1, fraction=0.25)]}
    (tmp_path / "res.json").write_text(json.dumps(doc))
    (tmp_path / "with_upper.json").write_text(json.dumps({"upper_bound": [{"seed": 0, "macro_f1": 0.60}]}))
    (tmp_path / "result-upper-elpv-s1.json").write_text(json.dumps({"seed": 1, "macro_f1": 0.58, "accuracy": 0.7}))
    upper = ug.upper_by_seed([tmp_path / "with_upper.json", tmp_path / "result-upper-elpv-s1.json"])
    assert sorted(upper) == [0, 1]
    rows = ug.gap_rows(doc, 0.1, upper)
    assert [r["seed"] for r in rows] == [0, 1]  # seed 2 has no (e); the 0.25 run is another fraction
    assert rows[0]["gap_closed"] == pytest.approx(0.25) and rows[1]["gap_closed"] == pytest.approx(0.25)
    assert rows[0]["g_gap_closed"] == pytest.approx(0.2) and rows[1]["g_gap_closed"] == pytest.approx(0.625)
    ug.main(["--result", str(tmp_path / "res.json"), "--fraction", "0.1", "--upper", str(tmp_path / "with_upper.json"),
             str(tmp_path / "result-upper-elpv-s1.json"), "--out", str(tmp_path / "out")])
    out = json.loads((tmp_path / "out.json").read_text())
    assert out["summary"]["gap_closed"]["mean"] == pytest.approx(0.25) and out["summary"]["gap_closed"]["n"] == 2
    # mean gain 0.035 over mean gap 0.14
    assert out["summary"]["gap_closed_of_means"] == pytest.approx(0.25)
    assert "NOT reached" in (tmp_path / "out.md").read_text()


def test_lite0_preset_is_the_measured_f_baseline(le):
    """``--preset lite0`` is exactly arm (f) at 192 px with the learning rate and epochs chosen on
    validation in the committed (f) study (label_efficiency_f_lite0.json), the quick preset beneath."""
    from semivit import config

    chosen = json.loads((ROOT / "benchmarks" / "results" / "label_efficiency_f_lite0.json").read_text())["lite0_lr"]
    f192 = chosen["elpv-f0.1-r192"]
    want = config.resolve(preset="quick", overrides=le.lite0_sets(192, f192["lr"], [], f192["epochs"]))
    got = config.resolve(preset="lite0")
    assert got.model_dump(exclude={"preset"}) == want.model_dump(exclude={"preset"})
    assert got.model.name == "tf_efficientnet_lite0" and got.model.img_size == 192


def test_candidates_name_their_lite0_co_teacher(le, tmp_path):
    """{F192} in a candidate's value is that seed's 5-fold (f) run at 192 px, trained before it."""
    cands = [("cnn", ["pseudo.extra_teachers=[{F192}]"]), ("both", ["x=[{F128},{F192}]"]), ("plain", ["pseudo.soft=true"])]
    assert le.lite0_refs(cands) == [128, 192]
    assert le.lite0_refs(cands[2:]) == []
    assert le.expand_lite0("pseudo.extra_teachers=[{F192}]", tmp_path) == f"pseudo.extra_teachers=[{tmp_path / 'F192'}]"


@pytest.fixture(scope="module")
def gp():
    return _benchmark("graph_predict")


def test_graph_prediction_takes_its_neighbours_spread_labels(gp):
    """Two scripted clusters; the labeled node of each spreads to its cluster's pool nodes, and a
    query takes the mean distribution of its k nearest nodes, mixed with the ensemble's."""
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.normal(0, 0.01, (6, 2)) + [1, 0]
    b = rng.normal(0, 0.01, (6, 2)) + [0, 1]
    labeled, labels = np.stack([a[0], b[0]]), np.array([0, 1])
    pool = np.concatenate([a[1:], b[1:]])
    from semivit.pseudo.propagate import mixture, spread_all

    dist = spread_all(labeled, labels, pool, 3, neighbors=3, alpha=0.2)
    assert dist.shape == (12, 3) and (dist[:, 2] == 0).all()  # no label of class 2: no mass
    assert (dist[[0, 2, 3]].argmax(1) == 0).all() and (dist[[1, 8, 9]].argmax(1) == 1).all()
    q = np.array([[0.99, 0.01], [0.02, 0.98]])
    g = gp.node_query(np.concatenate([labeled, pool]), dist, q, k=3)
    assert g.argmax(1).tolist() == [0, 1] and np.allclose(g.sum(1), 1)
    base = np.array([[0.1, 0.2, 0.7], [0.1, 0.2, 0.7]])
    m = mixture(base, g, 0.75)[0]
    assert np.allclose(m, 0.75 * base + 0.25 * g / g.sum(1, keepdims=True))
    assert np.allclose(mixture(base, np.zeros_like(g), 0.25)[0], base)  # unreached: the ensemble's own


def test_graph_settings_are_chosen_on_dev_and_paired_on_test(gp):
    """Each (ensemble, mode) takes the setting with the best MEAN DEV macro F1 even where another
    is best on test; the test pairs use that setting's per-seed scores."""
    def seed(dev_good, test_good, base):
        rows = {split: [] for split in ("dev", "test")}
        for mode in gp.MODES:
            for k in (7, 15):
                good = {"dev": dev_good, "test": test_good}
                for split in rows:
                    rows[split].append({"mode": mode, "neighbors": k, "alpha": 0.5, "share": 0.5,
                                        "a": good[split] if k == 7 else good[split] - (0.2 if split == "dev" else -0.2)})
        return {"splits": {s: {"base": {"a": base}, "rows": rows[s]} for s in rows}}

    seeds = [seed(0.6, 0.5, 0.4), seed(0.7, 0.55, 0.45)]
    out = gp.summarise(seeds, {"dev": [0.5, 0.5], "test": [0.5, 0.5]})
    pool = next(r for r in out["chosen"] if r["mode"] == "pool")
    assert pool["neighbors"] == 7 and pool["test_per_seed"] == [0.5, 0.55]
    p = next(p for p in out["paired"] if p["split"] == "test" and p["a"] == "a+pool" and p["b"] == "a")
    assert p["per_seed"] == [0.1, 0.1] and p["diff_mean"] == pytest.approx(0.1)
    assert any(p["b"] == "g (control file)" for p in out["paired"])


def test_graph_scores_must_match_the_control_files_ensembles(gp, tmp_path, monkeypatch):
    """Paired with a control file, every ensemble that file also scored must score the same here
    (the same stage 1, the same candidate): a candidate scored on other members is refused."""
    import sys

    def seed(i, cand):
        rows = [{"mode": m, "neighbors": 7, "alpha": 0.5, "share": 0.5, "a": 0.5, "cand_x": cand} for m in gp.MODES]
        return {"work": f"/w/s{i}", "splits": {s: {"base": {"a": 0.4, "cand_x": cand}, "rows": rows}
                                               for s in ("dev", "test")}}

    control = {"runs": [{"seed": i, "fraction": 0.1, **{s: {"a": {"macro_f1": 0.4}, "g": {"macro_f1": 0.45},
                                                              "cand_x": {"macro_f1": 0.47}} for s in ("dev", "test")}}
                        for i in (0, 1)]}
    (tmp_path / "control.json").write_text(json.dumps(control))
    for cand, ok in ((0.47, True), (0.48, False)):
        (tmp_path / "seeds.json").write_text(json.dumps({"seeds": [seed(0, cand), seed(1, cand)], "commit": "x",
                                                         "machine": "m", "wall_seconds": 1.0, "command": "c"}))
        monkeypatch.setattr(sys, "argv", ["graph_predict.py", "--seeds-from", str(tmp_path / "seeds.json"),
                                          "--control", str(tmp_path / "control.json"), "--out", str(tmp_path / "out")])
        if ok:
            gp.main()
            doc = json.loads((tmp_path / "out.json").read_text())
            assert any(p["b"] == "g (control file)" and p["per_seed"] == [0.05, 0.05] for p in doc["paired"])
        else:
            with pytest.raises(SystemExit, match="cand_x"):
                gp.main()
