"""The `ssl` command line as a user runs it: real processes, real exit codes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from semivit.data.demo import CLASS_NAMES

from conftest import SSL_MODULE, one_line_error

ELPV_COUNTS = {"defect_000": 1508, "defect_033": 295, "defect_067": 106, "defect_100": 715}
COMMANDS = ["demo-data", "train", "eval", "export", "predict", "refresh", "models"]


def ssl(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1"}
    env.pop("SEMIVIT_DEBUG", None)
    return subprocess.run([*SSL_MODULE, *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


def test_help_lists_the_commands():
    r = ssl("--help")
    assert r.returncode == 0
    for cmd in COMMANDS:
        assert cmd in r.stdout, cmd
    r = ssl("models", "--help")
    assert r.returncode == 0 and all(c in r.stdout for c in ("list", "promote", "rollback"))


def test_console_script_is_called_ssl():
    script = Path(sys.executable).parent / "ssl"
    if not script.exists():
        pytest.skip("not running from the virtual environment that installed the `ssl` script")
    r = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0 and all(cmd in r.stdout for cmd in COMMANDS)
    import semivit

    assert semivit.__name__ != "ssl"  # the package never shadows the standard library


@pytest.mark.parametrize("command", ids=lambda c: c[0], argvalues=[
    ["train", "--help"], ["eval", "--help"], ["export", "--help"], ["predict", "--help"],
    ["refresh", "--help"], ["demo-data", "--help"],
])
def test_subcommand_help(command):
    r = ssl(*command)
    assert r.returncode == 0 and "Usage" in r.stdout


def test_train_help_has_the_contract_options():
    out = ssl("train", "--help").stdout
    for opt in ("--out", "--config", "--preset", "--set", "--stages", "--device", "--seed", "--registry"):
        assert opt in out, opt


def test_unknown_config_key_is_one_line_exit_2():
    err = one_line_error(ssl("train", "--preset", "tiny", "--set", "train.epocs=3"))
    assert "train.epocs" in err and "unknown" in err


def test_wrong_type_is_one_line_exit_2():
    err = one_line_error(ssl("train", "--set", "train.epochs=many"))
    assert "train.epochs" in err and "many" in err


def test_missing_weights_path_is_one_line_exit_2(tmp_path):
    err = one_line_error(ssl("train", "--set", f"model.weights={tmp_path / 'none.pt'}"))
    assert "model.weights" in err and "none.pt" in err


def test_missing_config_file_is_one_line_exit_2(tmp_path):
    err = one_line_error(ssl("train", "--config", str(tmp_path / "c.yaml")))
    assert "c.yaml" in err


def test_bad_preset_is_a_usage_error():
    r = ssl("train", "--preset", "huge")
    assert r.returncode == 2 and "Traceback" not in r.stderr


def test_demo_data_refuses_foreign_dir(tmp_path):
    (tmp_path / "x.txt").write_text("mine")
    err = one_line_error(ssl("demo-data", str(tmp_path)))
    assert "not empty" in err
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_demo_data_bad_fraction(tmp_path):
    err = one_line_error(ssl("demo-data", str(tmp_path / "d"), "--labeled-fraction", "0"))
    assert "labeled-fraction" in err
    assert not (tmp_path / "d").exists()


def test_demo_data_full_default_counts(tmp_path):
    """The acceptance check: `ssl demo-data OUT` with the real 2,624 ELPV images."""
    out = tmp_path / "d"
    r = ssl("demo-data", str(out))
    assert r.returncode == 0, r.stderr
    assert f"wrote {out}" in r.stdout
    train = {c: len(list((out / "train" / c).iterdir())) for c in CLASS_NAMES}
    test = {c: len(list((out / "test" / c).iterdir())) for c in CLASS_NAMES}
    truth = (out / "unlabeled_truth.csv").read_text().splitlines()[1:]
    unl = {c: sum(1 for row in truth if row.split(",")[1] == c) for c in CLASS_NAMES}
    assert len(list((out / "unlabeled").iterdir())) == len(truth) == sum(unl.values())
    for c, n in ELPV_COUNTS.items():
        assert train[c] + test[c] + unl[c] == n, c
        assert abs(test[c] - 0.25 * n) <= 1, (c, test[c])  # stratified 25 % held out
        pool = n - test[c]
        assert abs(train[c] - 0.2 * pool) <= 1, (c, train[c])  # 20 % of the pool keeps labels
    assert sum(test.values()) == 656 and sum(train.values()) == 393
    # the printed summary matches the files
    assert f"train        393" in r.stdout and f"test         656" in r.stdout
    # a second run with the same parameters is a no-op, not an error
    again = ssl("demo-data", str(out))
    assert again.returncode == 0 and again.stdout == r.stdout
