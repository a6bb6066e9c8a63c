"""Shared helpers: one seed for python/numpy/torch, atomic writes, hashing, devices."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest
import torch

from semivit.errors import UserError
from semivit.utils import atomic_path, atomic_write_json, read_json, resolve_device, seed_everything, sha256_file


def _draws():
    return (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(),
            torch.randint(0, 1000, (4,)).tolist(), torch.randperm(10).tolist())


def test_seed_everything_gives_identical_draws():
    seed_everything(1234)
    a = _draws()
    seed_everything(1234)
    b = _draws()
    assert a == b
    seed_everything(1235)
    assert _draws() != a


def test_seed_everything_makes_model_init_reproducible():
    seed_everything(7)
    w1 = torch.nn.Linear(8, 4).weight.detach().clone()
    x1 = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
    seed_everything(7)
    w2 = torch.nn.Linear(8, 4).weight.detach().clone()
    x2 = torch.nn.functional.dropout(torch.ones(64), 0.5, training=True)
    assert torch.equal(w1, w2) and torch.equal(x1, x2)


def test_seed_everything_accepts_large_seeds():
    seed_everything(2**40 + 3)
    a = _draws()
    seed_everything(2**40 + 3)
    assert _draws() == a


def test_atomic_write_json_round_trip(tmp_path):
    path = tmp_path / "sub" / "x.json"
    atomic_write_json(path, {"a": 1, "b": [1, 2], "p": tmp_path})
    assert read_json(path) == {"a": 1, "b": [1, 2], "p": str(tmp_path)}
    atomic_write_json(path, {"a": 2})
    assert read_json(path) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]  # no temp files left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_path_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


def test_sha256_file(tmp_path):
    p = tmp_path / "b.bin"
    data = os.urandom(3 * 1024 + 7)
    p.write_bytes(data)
    assert sha256_file(p, chunk=1024) == hashlib.sha256(data).hexdigest()


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="cuda"):
            resolve_device("cuda")


def test_read_format_json_names_what_is_wrong(tmp_path):
    from semivit.utils import read_format_json

    p = tmp_path / "doc.json"
    with pytest.raises(UserError, match="^no doc here$"):
        read_format_json(p, "fmt/1", "no doc here", "not fmt")
    p.write_text('{"format": "other/2", "x": 1}')
    with pytest.raises(UserError, match=r"^not fmt \(format 'other/2'\)$"):
        read_format_json(p, "fmt/1", "no doc here", "not fmt")
    p.write_text('{"format": "fmt/1", "x"')  # truncated
    with pytest.raises(UserError, match=r"^not fmt \(not valid JSON: "):
        read_format_json(p, "fmt/1", "no doc here", "not fmt")
    p.write_text('[1, 2]')
    with pytest.raises(UserError, match=r"^not fmt \(format None\)$"):
        read_format_json(p, "fmt/1", "no doc here", "not fmt")
    p.write_text('{"format": "fmt/1", "x": 1}')
    assert read_format_json(p, "fmt/1", "no doc here", "not fmt") == {"format": "fmt/1", "x": 1}


def test_info_and_warn_print_brackets_as_written(capsys):
    """Install hints and paths hold brackets; rich markup must not eat them ("[openvino]" once
    vanished from the export's skip message)."""
    from semivit.utils import info, warn

    info("candidate skipped: pip install 'semivit[openvino]' for runs/[a]/x")
    warn("nncf is missing: pip install 'semivit[openvino]'")
    err = capsys.readouterr().err
    assert "pip install 'semivit[openvino]' for runs/[a]/x" in err
    assert "warning: nncf is missing: pip install 'semivit[openvino]'" in err
