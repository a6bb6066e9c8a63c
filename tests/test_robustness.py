"""Issue 14: nothing a user gave is lost, every file gets its row, every bad input gets one line.

Each test is one of the attacks of the issue (or one found after it), with real files, real
processes where the behaviour is the process's (exit codes, signals, option parsing).
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from semivit.cli import app
from semivit.safe_io import open_regular, path_text, text_path

from conftest import TINY_CLASSES, write_image

try:  # issue 12 moves the shared test helpers into conftest
    from conftest import make_fake_export
except ImportError:  # pragma: no cover - depends on the merge order
    from test_predict import make_fake_export


def cli(*args: str, env: dict | None = None):
    r = CliRunner().invoke(app, list(map(str, args)), env=env)
    return r.exit_code, r.output


def one_line(code: int, output: str, want: int = 2) -> str:
    lines = [ln for ln in output.strip().splitlines() if ln.strip()]
    assert code == want, output
    assert "Traceback" not in output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


def ssl_proc(*args: str, env: dict | None = None, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    e = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})}
    e.pop("SEMIVIT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", "from semivit.cli import main; main()", *map(str, args)],
                          capture_output=True, text=True, env=e, timeout=timeout, **kw)


def proc_one_line(r: subprocess.CompletedProcess, want: int = 2) -> str:
    assert r.returncode == want, (r.returncode, r.stdout, r.stderr)
    err = r.stderr.strip()
    assert "Traceback" not in r.stderr + r.stdout and "╭" not in err, err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    return make_fake_export(tmp_path_factory.mktemp("fx") / "EXPORT")


@pytest.fixture
def images(tmp_path) -> Path:
    d = tmp_path / "IN"
    for i, c in enumerate(TINY_CLASSES):
        write_image(d / f"{c}_{i}.png", (40 * i, 100, 200 - 40 * i))
    return d


# ============================================================================ data loss

def test_eval_out_never_overwrites_the_report_or_its_png_without_force(tiny_run, tiny_data_shared, tmp_path):
    precious = tmp_path / "precious.json"
    precious.write_text("mine")
    png = tmp_path / "other.png"
    png.write_text("my picture")
    code, out = cli("eval", tiny_run, tiny_data_shared, "--out", precious)
    assert "precious.json already exists" in one_line(code, out)
    code, out = cli("eval", tiny_run, tiny_data_shared, "--out", tmp_path / "other.json")
    assert "other.png already exists" in one_line(code, out)
    assert precious.read_text() == "mine" and png.read_text() == "my picture"
    assert not (tmp_path / "other.json").exists()
    code, out = cli("eval", tiny_run, tiny_data_shared, "--out", precious, "--force")
    assert code == 0, out
    assert json.loads(precious.read_text())["n_images"] > 0 and (tmp_path / "precious.png").stat().st_size > 0


def test_eval_out_inside_the_data_is_refused(tiny_run, tiny_data_shared):
    code, out = cli("eval", tiny_run, tiny_data_shared, "--out", tiny_data_shared / "test" / "report.json")
    assert "inside the data directory" in one_line(code, out)
    assert not (tiny_data_shared / "test" / "report.png").exists()


def test_train_registry_refuses_a_foreign_folder_before_training(tiny_data_shared, tmp_path):
    foreign = tmp_path / "TEAM"
    foreign.mkdir()
    (foreign / "history.md").write_text("our history\n")
    t = time.monotonic()
    code, out = cli("train", tiny_data_shared, "--preset", "tiny", "--out", tmp_path / "RUN", "--registry", foreign)
    err = one_line(code, out)
    assert "not a semivit registry" in err and "history.md" in err
    assert time.monotonic() - t < 20  # refused up front, not after the training
    assert sorted(p.name for p in foreign.iterdir()) == ["history.md"]
    assert (foreign / "history.md").read_text() == "our history\n"
    assert not (tmp_path / "RUN").exists()


def test_registry_commands_refuse_a_foreign_folder(tmp_path):
    foreign = tmp_path / "TEAM"
    foreign.mkdir()
    (foreign / "registry.yaml").write_text("format: their-tool/3\n")
    (tmp_path / "inbox").mkdir()
    for args in (["models", "list", "--registry", foreign],
                 ["refresh", "--registry", foreign, "--inbox", tmp_path / "inbox"]):
        code, out = cli(*args)
        assert "not a semivit registry" in one_line(code, out) and "their-tool/3" in out


@pytest.mark.parametrize("content, found", [
    ("name: foo\nfolds: 2\n", "keys name, folds"),
    ("- a\n- b\n", "a list of 2 items"),
    ("just a string\n", "a str ('just a string')"),
    ("format: other/1\nconfig: {}\n", "format 'other/1'"),
])
def test_train_out_with_a_foreign_config_yaml_is_refused_and_untouched(tiny_data_shared, tmp_path, content, found):
    out = tmp_path / "THEIRS"
    out.mkdir()
    (out / "config.yaml").write_text(content)
    code, output = cli("train", tiny_data_shared, "--preset", "tiny", "--out", out)
    err = one_line(code, output)
    assert "is not a semivit run" in err and found in err, err
    assert [p.name for p in out.iterdir()] == ["config.yaml"] and (out / "config.yaml").read_text() == content


def test_train_out_inside_the_data_images_is_refused(tiny_data_shared):
    code, out = cli("train", tiny_data_shared, "--preset", "tiny", "--out", tiny_data_shared / "unlabeled" / "run")
    assert "inside" in one_line(code, out)
    assert not (tiny_data_shared / "unlabeled" / "run").exists()


def test_saved_run_config_carries_its_format_tag(tmp_path):
    from semivit import config as cfgmod
    from semivit.kinds import RUN_FORMAT, is_run

    cfgmod.save(cfgmod.resolve(preset="tiny"), tmp_path / "config.yaml")
    assert (tmp_path / "config.yaml").read_text().startswith(f"format: {RUN_FORMAT}\n")
    assert is_run(tmp_path)


# ============================================================================ every file its row

def test_undecodable_file_name_gets_its_row_in_every_format_and_round_trips(export, images, tmp_path):
    weird = os.fsencode(images) + b"/x\xff.png"
    shutil.copy(images / "red_2.png", weird)
    for fmt in ("csv", "kaggle", "json"):
        out = tmp_path / f"p.{fmt}"
        code, output = cli("predict", images, "--model", export, "--out", out, "--format", fmt)
        assert code == 0, output
        text = out.read_text(encoding="utf-8")  # valid UTF-8
        if fmt == "json":
            paths = [p["path"] for p in json.loads(text)["predictions"]]
        else:
            paths = [r[0] for r in read_csv(out)[1:]]
        assert len(paths) == 4 and "x\\xff.png" in paths, paths
        assert os.fsencode(text_path("x\\xff.png")) == b"x\xff.png"
    row = [r for r in read_csv(tmp_path / "p.csv") if r[0] == "x\\xff.png"][0]
    assert row[-3] == "ok"


def test_carriage_return_and_newline_in_a_file_name_stay_one_row(export, images, tmp_path):
    shutil.copy(images / "red_2.png", images / "a\rb.png")
    shutil.copy(images / "red_2.png", images / "c\nd.png")
    out = tmp_path / "p.csv"
    code, output = cli("predict", images, "--model", export, "--out", out)
    assert code == 0, output
    rows = read_csv(out)
    assert len(rows) == 1 + 5 and len(out.read_text().splitlines()) == 1 + 5
    paths = {r[0] for r in rows[1:]}
    assert {"a\\rb.png", "c\\nd.png"} <= paths and all(r[-3] == "ok" for r in rows[1:])
    assert text_path("a\\rb.png") == "a\rb.png"


def test_csv_rows_with_a_carriage_return_in_any_field_are_quoted(tmp_path):
    from semivit.serve.writers import CsvWriter, Row

    w = CsvWriter(tmp_path / "p.csv", ["x\ry", "z"])
    w.write(Row("a.png", "error", error="bad\rthing"))
    w.commit()
    rows = read_csv(tmp_path / "p.csv")
    assert rows[0][3] == "p_x\ry" and rows[1][0] == "a.png" and rows[1][-1] == "bad\rthing" and len(rows) == 2


@pytest.mark.parametrize("raw", [b"plain.png", b"sp ace/\xc3\xbcni.png", b"x\xff\xfe.png", b"a\\b.png",
                                 b"\\x41.png", b"t\tn\nr\r\x01\x7f.png"])
def test_path_text_is_reversible_one_line_utf8(raw):
    t = path_text(os.fsdecode(raw))
    assert os.fsencode(text_path(t)) == raw
    t.encode("utf-8")
    assert "\n" not in t and "\r" not in t
    if raw in (b"plain.png", b"sp ace/\xc3\xbcni.png"):
        assert t == raw.decode()


def test_fifo_in_the_inbox_is_skipped_not_waited_on(tmp_path):
    from semivit.refresh.inbox import Inbox

    inbox = tmp_path / "inbox"
    write_image(inbox / "a.png")
    os.mkfifo(inbox / "pipe.png")
    (tmp_path / "R").mkdir()
    result = {}

    def ingest():
        with Inbox(tmp_path / "R") as db:
            result["stats"] = db.ingest(inbox)

    t = threading.Thread(target=ingest, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # the old code blocks in open(): release it by opening the write end
        fd = os.open(inbox / "pipe.png", os.O_WRONLY | os.O_NONBLOCK)
        os.close(fd)
        t.join(5)
        pytest.fail("Inbox.ingest blocked on a FIFO named pipe.png")
    assert result["stats"].new_content == 1


def test_fifo_socket_and_dir_named_like_images_are_error_rows_at_once(export, images, tmp_path):
    import socket

    os.mkfifo(images / "pipe.png")
    (images / "zero.png").symlink_to("/dev/zero")  # a link to a device: never read from
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(images / "sock.png"))
    try:
        out = tmp_path / "p.csv"
        t = time.monotonic()
        code, output = cli("predict", images, "--model", export, "--out", out)
        assert code == 0 and time.monotonic() - t < 60, output
        rows = {r[0]: r for r in read_csv(out)[1:]}
        assert rows["pipe.png"][-3] == "error" and "FIFO" in rows["pipe.png"][-1]
        assert rows["sock.png"][-3] == "error"
        assert rows["zero.png"][-3] == "error" and "character device" in rows["zero.png"][-1]
        assert len(rows) == 6
    finally:
        s.close()


def test_open_regular_refuses_a_fifo_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "f")
    with pytest.raises(OSError, match="FIFO"):
        open_regular(tmp_path / "f")
    (tmp_path / "r").write_bytes(b"abc")
    with open_regular(tmp_path / "r") as f:
        assert f.read() == b"abc"


def test_inbox_keeps_a_name_that_is_not_utf8(tmp_path):
    from semivit.refresh.inbox import Inbox

    inbox = tmp_path / "inbox"
    write_image(inbox / "a.png")
    weird = os.fsencode(inbox) + b"/caf\xe9.png"
    write_image(os.fsdecode(weird), (1, 2, 3))
    (tmp_path / "R").mkdir()
    with Inbox(tmp_path / "R") as db:
        st = db.ingest(inbox)
        assert st.new_content == 2
        found = [db.locate(sha) for sha, _ in db.to_label("v0001")]
    assert os.fsencode(str(next(p for p in found if "caf" in str(p)))) == weird
    with Inbox(tmp_path / "R") as db:  # and the next refresh does not fail either
        assert db.ingest(inbox).unchanged == 2


def test_sigterm_stops_a_long_step_at_once_and_releases_the_lock(tmp_path):
    from semivit.refresh.lock import FileLock, StopFlag, StopRequested

    lock = tmp_path / "refresh.lock"
    timer = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGTERM))
    t = time.monotonic()
    with pytest.raises(StopRequested):
        with StopFlag(), FileLock(lock, "refresh"):
            timer.start()
            for _ in range(100):  # a long step (training, decoding) that never reaches a step boundary
                time.sleep(0.1)
    assert time.monotonic() - t < 3
    with FileLock(lock, "refresh"):  # released: the next refresh takes it
        pass
    assert signal.getsignal(signal.SIGTERM) is not None


# ============================================================================ sha256 of meta.json and the graphs

@pytest.fixture
def sealed_export(tmp_path) -> Path:
    """A hand-built export sealed by the exporter's own write_meta (files + meta_sha256)."""
    from semivit.export.meta import write_meta

    d = make_fake_export(tmp_path / "EXPORT")
    meta = json.loads((d / "meta.json").read_text())
    (d / "meta.json").unlink()
    write_meta(d, meta)
    return d


def _edit_meta(d: Path, fn) -> None:
    meta = json.loads((d / "meta.json").read_text())
    fn(meta)
    (d / "meta.json").write_text(json.dumps(meta, indent=2))


@pytest.mark.parametrize("edit", ["rename", "remove", "size"])
def test_predict_refuses_an_edited_meta_json(sealed_export, images, tmp_path, edit):
    code, out = cli("predict", images, "--model", sealed_export, "--out", tmp_path / "ok.csv")
    assert code == 0, out
    fn = {"rename": lambda m: m["classes"].__setitem__(0, "cobalt"),
          "remove": lambda m: m["classes"].pop(),
          "size": lambda m: m.__setitem__("img_size", 16)}[edit]
    _edit_meta(sealed_export, fn)
    code, out = cli("predict", images, "--model", sealed_export, "--out", tmp_path / "p.csv")
    err = one_line(code, out)
    assert "meta.json" in err and "sha256" in err
    assert not (tmp_path / "p.csv").exists()


def test_predict_refuses_an_overwritten_graph(sealed_export, images, tmp_path):
    shutil.copy(sealed_export / "levels" / "no_tta.onnx", sealed_export / "model.onnx")  # other weights
    code, out = cli("predict", images, "--model", sealed_export, "--out", tmp_path / "p.csv")
    err = one_line(code, out)
    assert "model.onnx" in err and "sha256" in err


def test_size_mismatch_between_meta_and_graph_is_a_bad_model_not_error_rows(tmp_path, images):
    d = make_fake_export(tmp_path / "EXPORT")  # no meta_sha256: an older export
    _edit_meta(d, lambda m: m.__setitem__("img_size", 16))
    code, out = cli("predict", images, "--model", d, "--out", tmp_path / "p.csv")
    assert "bad model" in one_line(code, out) and "img_size 16" in out


@pytest.fixture(scope="module")
def real_export(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("rx") / "RUN"
    shutil.copytree(tiny_run, run)
    code, out = cli("export", run)
    assert code == 0, out
    return run


def test_export_refuses_a_tampered_export_and_force_rebuilds(real_export, tiny_data_shared, tmp_path):
    run, exp = real_export, real_export / "export"
    code, out = cli("export", run)
    assert code == 0 and "up to date" in out, out
    original = (exp / "model.onnx").read_bytes()
    data = bytearray(original)
    data[-100] ^= 0xFF  # overwritten weights, same size
    (exp / "model.onnx").write_bytes(bytes(data))
    code, out = cli("export", run)
    err = one_line(code, out)
    assert "model.onnx" in err and "sha256" in err
    code, out = cli("predict", tiny_data_shared / "test", "--model", exp, "--out", tmp_path / "p.csv")
    assert "model.onnx" in one_line(code, out)
    _edit_meta(exp, lambda m: m["classes"].__setitem__(0, "renamed"))
    code, out = cli("export", run)
    assert "meta.json" in one_line(code, out)
    code, out = cli("export", run, "--force")
    assert code == 0, out
    assert (exp / "model.onnx").read_bytes() == original  # deterministic rebuild
    code, out = cli("predict", tiny_data_shared / "test", "--model", exp, "--out", tmp_path / "p.csv")
    assert code == 0, out


# ============================================================================ one line, exit 2

@pytest.mark.parametrize("args, words", [
    (["predict", "IN", "--time-limit", "0"], "--time-limit"),
    (["predict", "IN", "--batch-size", "0"], "--batch-size"),
    (["predict", "IN", "--backend", "gpu-please"], "--backend"),
    (["predict", "IN", "--format", "xml"], "--format"),
    (["train", "--preset", "huge"], "--preset"),
    (["frobnicate"], "No such command"),
    (["models", "frobnicate"], "No such command"),
    (["predict"], "Missing argument"),
    (["models", "promote"], "Missing argument"),
    (["predict", "IN", "--bogus"], "--bogus"),
])
def test_option_parsing_errors_are_one_line_exit_2(args, words):
    err = proc_one_line(ssl_proc(*args))
    assert words in err


def test_bare_ssl_still_prints_its_help():
    r = ssl_proc()
    assert r.returncode == 0 and "predict" in r.stdout + r.stderr


def test_time_limit_inf_and_nan_are_one_line(export, images, tmp_path):
    for v in ("inf", "nan"):
        code, out = cli("predict", images, "--model", export, "--out", tmp_path / "p.csv", "--time-limit", v)
        assert "--time-limit" in one_line(code, out)


def test_out_in_proc_is_refused_before_the_model_loads(images, tmp_path):
    r = ssl_proc("predict", images, "--model", tmp_path / "no-such-model", "--out", "/proc/x.csv")
    err = proc_one_line(r)
    assert "/proc" in err and "no-such-model" not in err  # checked before the model


def test_bad_decode_workers_env_is_one_line(export, images, tmp_path):
    code, out = cli("predict", images, "--model", export, "--out", tmp_path / "p.csv",
                    env={"SEMIVIT_DECODE_WORKERS": "abc"})
    assert "SEMIVIT_DECODE_WORKERS" in one_line(code, out)
    code, out = cli("predict", images, "--model", export, "--out", tmp_path / "p.csv",
                    env={"SEMIVIT_MAX_PIXELS": "lots"})
    assert "SEMIVIT_MAX_PIXELS" in one_line(code, out)


# ============================================================================ messages that say what happened

def test_file_deleted_after_listing_is_not_called_corrupt(tmp_path):
    from semivit.data.decode import DecodeError, load_rgb

    with pytest.raises(DecodeError) as e:
        load_rgb(tmp_path / "gone.png", 8)
    assert "deleted or moved" in str(e.value) and "corrupt" not in str(e.value)


def _registry_without_versions(root: Path) -> Path:
    from semivit.refresh.settings import init_registry

    return init_registry(root)


def test_dangling_current_says_so(tmp_path):
    reg = _registry_without_versions(tmp_path / "R")
    (reg / "current").symlink_to("v0099")
    (tmp_path / "inbox").mkdir()
    code, out = cli("refresh", "--registry", reg, "--inbox", tmp_path / "inbox")
    err = one_line(code, out)
    assert "v0099" in err and "does not exist" in err and "config file" not in err
    code, out = cli("predict", tmp_path / "inbox", "--model", reg, "--out", tmp_path / "p.csv")
    assert "dangling" in one_line(code, out)


def test_registry_without_current_says_so(tmp_path, images):
    reg = _registry_without_versions(tmp_path / "R")
    code, out = cli("predict", images, "--model", reg, "--out", tmp_path / "p.csv")
    assert "no current version" in one_line(code, out)


def test_dangling_symlink_out_is_not_replaced_without_force(export, images, tmp_path):
    link = tmp_path / "p.csv"
    link.symlink_to(tmp_path / "elsewhere" / "p.csv")
    code, out = cli("predict", images, "--model", export, "--out", link)
    assert "dangling symlink" in one_line(code, out)
    assert link.is_symlink() and not link.exists()


def test_out_that_is_a_fifo_is_refused_even_with_force(export, images, tmp_path):
    """(A FIFO of our own, not /dev/null: a regression here must not replace a system file.)"""
    fifo = tmp_path / "p.csv"
    os.mkfifo(fifo)
    code, out = cli("predict", images, "--model", export, "--out", fifo, "--force")
    assert "FIFO" in one_line(code, out) and "not even with --force" in out
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


# ============================================================================ decoded-pixel cap

def _png_header_only(path: Path, w: int, h: int) -> Path:
    """A PNG whose header claims w x h (a decompression bomb's header), and nothing else."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))
    return path


def test_a_small_png_that_decodes_huge_is_an_error_row(export, images, tmp_path):
    Image.new("1", (9000, 9000)).save(images / "huge.png")  # 81 MP, a few KB on disk
    assert (images / "huge.png").stat().st_size < 100_000
    out = tmp_path / "p.csv"
    code, output = cli("predict", images, "--model", export, "--out", out)
    assert code == 0, output
    rows = {r[0]: r for r in read_csv(out)[1:]}
    assert rows["huge.png"][-3] == "error" and "too large" in rows["huge.png"][-1]
    assert "SEMIVIT_MAX_PIXELS" in rows["huge.png"][-1]
    assert all(rows[k][-3] == "ok" for k in rows if k != "huge.png")


def test_pixel_cap_is_configurable_and_pillow_bombs_are_error_rows(export, images, tmp_path):
    _png_header_only(images / "bomb.png", 50_000, 50_000)
    out = tmp_path / "p.csv"
    code, output = cli("predict", images, "--model", export, "--out", out, env={"SEMIVIT_MAX_PIXELS": "none"})
    assert code == 0, output
    rows = {r[0]: r for r in read_csv(out)[1:]}
    assert rows["bomb.png"][-3] == "error" and "too large" in rows["bomb.png"][-1]
    code, output = cli("predict", images, "--model", export, "--out", out, "--force",
                       env={"SEMIVIT_MAX_PIXELS": "100"})  # below the 16x12 test images
    rows = {r[0]: r for r in read_csv(out)[1:]}
    assert code == 1 and all(r[-3] == "error" for r in rows.values()), output


# ============================================================================ shared servers, cron, full disks

def test_outputs_follow_the_umask(export, images, tmp_path):
    old = os.umask(0o027)
    try:
        code, out = cli("predict", images, "--model", export, "--out", tmp_path / "p.csv")
    finally:
        os.umask(old)
    assert code == 0, out
    assert stat.S_IMODE(os.stat(tmp_path / "p.csv").st_mode) == 0o640


def test_registry_inside_the_inbox_is_refused(tmp_path):
    inbox = tmp_path / "inbox"
    reg = _registry_without_versions(inbox / "models")
    (reg / "current").symlink_to("v0001")
    (reg / "v0001").mkdir()
    (reg / "v0001" / "manifest.json").write_text("{}")
    code, out = cli("refresh", "--registry", reg, "--inbox", inbox)
    assert "inside the inbox" in one_line(code, out)


def test_full_disk_mid_write_keeps_the_old_output_and_leaves_no_temp(export, tmp_path):
    import resource

    many = tmp_path / "MANY"
    for i in range(60):
        write_image(many / f"img_{i:03d}_{'x' * 60}.png", (i, 2 * i, 3 * i))
    out = tmp_path / "p.csv"
    out.write_text("the previous predictions\n")

    def limit():  # the file-size limit stands in for a full disk: writes fail with EFBIG
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    r = ssl_proc("predict", many, "--model", export, "--out", out, "--force", preexec_fn=limit)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    err = r.stderr.strip().splitlines()[-1]
    assert err.startswith("error: File too large writing ") and str(out) in err, err
    assert out.read_text() == "the previous predictions\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MANY", "p.csv"]


# ============================================================================ damaged registry files: one line each

def _registry_with_v1(root: Path) -> Path:
    reg = _registry_without_versions(root)
    (reg / "v0001").mkdir()
    (reg / "v0001" / "manifest.json").write_text(json.dumps(
        {"format": "semivit-version/1", "version": "v0001", "status": "promoted"}))
    (reg / "current").symlink_to("v0001")
    (root.parent / "inbox").mkdir(exist_ok=True)
    return reg


def test_registry_yaml_that_is_a_list_is_one_line(tmp_path):
    (tmp_path / "R").mkdir()
    (tmp_path / "R" / "registry.yaml").write_text("- a\n- b\n")
    code, out = cli("models", "list", "--registry", tmp_path / "R")
    assert "a list of 2 items" in one_line(code, out)


def test_manifest_that_is_a_list_is_listed_as_unreadable(tmp_path):
    reg = _registry_with_v1(tmp_path / "R")
    (reg / "v0001" / "manifest.json").write_text("[1, 2]")
    code, out = cli("models", "list", "--registry", reg)
    assert code == 0 and "unreadable" in out and "Traceback" not in out, out


def test_damaged_promotions_json_is_one_line(tmp_path):
    reg = _registry_with_v1(tmp_path / "R")
    (reg / "promotions.json").write_text("{trunc")
    code, out = cli("models", "list", "--registry", reg)  # the table is printed first, then the error
    assert code == 2 and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: ") and "promotions.json is damaged" in out


def test_inbox_sqlite_that_is_not_a_database_is_one_line(tmp_path):
    reg = _registry_with_v1(tmp_path / "R")
    (reg / "inbox.sqlite").write_bytes(b"not a database" * 100)
    code, out = cli("models", "list", "--registry", reg)  # the table is printed first, then the error
    assert code == 2 and "Traceback" not in out
    assert out.strip().splitlines()[-1].startswith("error: ") and "inbox.sqlite is not a usable SQLite" in out
    code, out = cli("refresh", "--registry", reg, "--inbox", tmp_path / "inbox")
    assert code == 2 and "Traceback" not in out


def test_refresh_on_an_incomplete_current_version_says_so(tmp_path):
    reg = _registry_with_v1(tmp_path / "R")
    code, out = cli("refresh", "--registry", reg, "--inbox", tmp_path / "inbox")
    err = one_line(code, out)
    assert "not complete" in err and "config file not found" not in err
