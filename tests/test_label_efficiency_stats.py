"""The label-efficiency benchmark's statistics: paired t intervals (sample SD), verdicts that
follow the interval, (b) chosen on dev only, the best (f) chosen on dev only."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def le():
    spec = importlib.util.spec_from_file_location("label_efficiency", ROOT / "benchmarks" / "label_efficiency.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
