"""`ssl export`: one ONNX graph per degradation level with the ensemble, flip TTA and
preprocessing fused, verified against PyTorch; INT8 acceptance; the TensorRT path (GPU only).

The module's exports use the TorchScript exporter (SEMIVIT_ONNX_EXPORTER=torchscript: about 10x
faster on the tiny model); the dynamo exporter, the default, has its own test of the full graph.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from semivit.cli import app
from semivit.data.dataset import decode_many
from semivit.errors import UserError
from semivit.export import fp16, graph, int8 as int8mod, levels as levelmod, tensorrt, verify
from semivit.export.exporter import export_run
from semivit.export.meta import check_files, read_meta
from semivit.models.ensemble import load_ensemble, read_ensemble
from semivit.models.checkpoint import load_checkpoint

from conftest import invoke, one_line_error

FAST = {"SEMIVIT_ONNX_EXPORTER": "torchscript"}


def cli(*args, env=None):
    return invoke(*args, env={**FAST, **(env or {})})


@pytest.fixture(scope="module")
def run_copy(tiny_run, tmp_path_factory) -> Path:
    """A private copy of the shared tiny run (exports write into RUN/export by default)."""
    dst = tmp_path_factory.mktemp("export") / "RUN"
    shutil.copytree(tiny_run, dst)
    return dst


@pytest.fixture(scope="module")
def exported(run_copy) -> Path:
    """`ssl export RUN` (default out RUN/export, flip TTA on)."""
    res = cli("export", run_copy)
    assert res.exit_code == 0, res.output
    return run_copy / "export"


@pytest.fixture(scope="module")
def held_out(tiny_data_shared) -> np.ndarray:
    """Real images the run never trained on (DATA/test), decoded at the model's size."""
    paths = sorted((tiny_data_shared / "test").rglob("*.*"))
    return decode_many(paths, 32).images


def member_probs_by_hand(run: Path, images: np.ndarray, tta: bool) -> np.ndarray:
    """sum_i w_i * mean over views of softmax(member_i(view)), views = image (and its mirror made
    in numpy) - computed member by member, without EnsembleModel."""
    doc = read_ensemble(run)
    mean, std = np.asarray(doc["mean"], np.float32), np.asarray(doc["std"], np.float32)
    views = [images] + ([images[:, :, ::-1, :]] if tta else [])  # NHWC: axis 2 is the width
    out = 0.0
    for m in doc["members"]:
        model, _ = load_checkpoint(run / m["path"])
        model.eval()
        p = 0.0
        for v in views:
            x = torch.from_numpy(((v.astype(np.float32) / 255.0 - mean) / std).transpose(0, 3, 1, 2).copy())
            with torch.no_grad():
                p = p + torch.softmax(model(x), dim=1).numpy()
        out = out + m["weight"] * p / len(views)
    return out / sum(m["weight"] for m in doc["members"])


# ----------------------------------------------------------------------------- the graph
def test_cli_export_writes_levels_and_meta(exported, run_copy, capsys):
    meta = read_meta(exported)
    m = len(read_ensemble(run_copy)["members"])
    k = -(-m // 2)
    assert meta["levels"] == [
        {"name": "full", "file": "model.onnx", "tta": True, "members": m},
        {"name": "no_tta", "file": "levels/no_tta.onnx", "tta": False, "members": m},
        {"name": f"top{k}_no_tta", "file": f"levels/top{k}_no_tta.onnx", "tta": False, "members": k},
    ]
    for lv in meta["levels"]:
        assert (exported / lv["file"]).is_file()
        v = meta["verification"][lv["name"]]
        assert v["passed"] and v["max_abs_diff"] <= 1e-4 and v["argmax_agreement"] == 1.0
        assert v["batch_sizes"] == [1, 3, 17] and v["images"] > 17
        assert graph.member_count(exported / lv["file"]) == lv["members"]
    assert not list(exported.parent.glob(".export.*")), "temporary export directory left behind"


def test_graph_runs_at_batch_1_3_17_and_matches_pytorch(exported, run_copy, held_out):
    sess = verify.ort_session(exported / "model.onnx")
    (inp,), outs = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str), "batch axis must be dynamic"
    assert [(o.name, o.type) for o in outs] == [("probs", "tensor(float)"), ("label", "tensor(int64)")]
    model, _ = load_ensemble(run_copy, tta=True)
    ref_p, ref_y = verify.run_torch(model, held_out)
    for b in (1, 3, 17):
        p, y = verify.run_ort(sess, held_out, b)
        assert p.shape == (len(held_out), 3) and y.dtype == np.int64
        assert np.abs(p - ref_p).max() <= 1e-4
        assert (y == ref_y).all() and (y == p.argmax(1)).all()
        np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_graph_holds_every_member_with_flip_tta_and_layernorm(exported, run_copy):
    path = exported / "model.onnx"
    members = read_ensemble(run_copy)["members"]
    assert graph.member_count(path) == len(members) == 4
    assert graph.flip_slices(path) >= 1
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    ops = graph.op_counts(path)
    assert ops["LayerNormalization"] >= 2 * len(members)  # per block norm1/norm2 + final norm, one op each
    md = graph.read_metadata(path)
    assert md["classes"] == ["blue", "green", "red"] and md["img_size"] == 32 and md["tta"] is True
    assert [m["name"] for m in md["members"]] == [m["name"] for m in members]
    assert md["verification"]["passed"] is True and md["source_run"] == str(run_copy.resolve())


def test_tta_is_fused_in_the_graph(exported, run_copy, held_out):
    """The graph's output = weighted mean over members of the mean of the member's softmax on
    the image and on its mirror, computed independently here."""
    p, _ = verify.run_ort(verify.ort_session(exported / "model.onnx"), held_out, 5)
    want = member_probs_by_hand(run_copy, held_out, tta=True)
    assert np.abs(p - want).max() <= 1e-4
    no_flip = member_probs_by_hand(run_copy, held_out, tta=False)
    assert np.abs(p - no_flip).max() > 1e-4, "the mirror must change something, or this test proves nothing"


def test_meta_is_complete_and_hashes_match(exported, run_copy):
    meta = read_meta(exported)
    for key in ("classes", "img_size", "mean", "std", "members", "tta", "levels", "source_run", "opset",
                "exporter", "verification", "files", "input", "outputs", "level_members"):
        assert key in meta, key
    assert meta["opset"] >= 17 and meta["int8"] is None and meta["tensorrt"] is None
    assert [m["weight"] for m in meta["members"]] == pytest.approx([m["weight"] for m in read_ensemble(run_copy)["members"]])
    on_disk = {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file() and p.name != "meta.json"}
    assert set(meta["files"]) == on_disk
    assert check_files(exported) == []
    for lv in meta["level_members"].values():
        assert sum(m["weight"] for m in lv) == pytest.approx(1.0)


def test_top_level_keeps_highest_weights(exported):
    meta = read_meta(exported)
    full = {m["name"]: m["weight"] for m in meta["level_members"]["full"]}
    top = meta["levels"][-1]
    chosen = [m["name"] for m in meta["level_members"][top["name"]]]
    ranked = sorted(full, key=lambda n: -full[n])
    assert full[min(chosen, key=full.get)] >= full[ranked[len(chosen)]]
    p = verify.run_ort(verify.ort_session(exported / top["file"]), np.zeros((2, 32, 32, 3), np.uint8), 2)[0]
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)


def test_dynamo_exporter_full_graph(run_copy, held_out, tmp_path):
    """The default exporter (torch.onnx dynamo) on a TTA ensemble (two members: its cost grows
    with the node count, and the graph pattern is the same for four)."""
    names = [m["name"] for m in read_ensemble(run_copy)["members"]][:2]
    model, _ = load_ensemble(run_copy, tta=True, names=names)
    done = graph.export_graph(model, tmp_path / "model.onnx", 32, exporter="dynamo")
    assert done["exporter"] == "dynamo" and done["external_data"] is False
    res = verify.compare(tmp_path / "model.onnx", model, held_out)
    assert res["passed"], res
    d = graph.describe(tmp_path / "model.onnx")
    assert d["layer_norm_nodes"] > 0 and d["flip_slices"] >= 1 and d["member_weight_sets"] == 2


def test_predict_serves_the_export_with_the_graphs_probabilities(exported, tiny_data_shared, tmp_path):
    """The contract end to end: `ssl predict` on this export gives the graph's own numbers."""
    import csv

    from semivit.serve.predict import run_predict

    src = tiny_data_shared / "test"
    run_predict(src, exported, out=tmp_path / "p.csv", backend="onnxruntime", quiet=True)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = {r["path"]: r for r in csv.DictReader(f)}
    paths = sorted(src.rglob("*.*"))
    assert sorted(rows) == sorted(p.relative_to(src).as_posix() for p in paths)
    p, _ = verify.run_ort(verify.ort_session(exported / "model.onnx"), decode_many(paths, 32).images, 17)
    for path, probs in zip(paths, p):
        row = rows[path.relative_to(src).as_posix()]
        assert row["status"] == "ok" and row["label"] == ["blue", "green", "red"][int(probs.argmax())]
        got = [float(row[f"p_{c}"]) for c in ("blue", "green", "red")]
        np.testing.assert_allclose(got, probs, atol=1e-4)


def test_dynamo_failure_falls_back_to_torchscript_and_says_so(run_copy, held_out, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("simulated dynamo failure")

    monkeypatch.setattr(graph, "_export_dynamo", broken)
    model, _ = load_ensemble(run_copy, tta=True)
    done = graph.export_graph(model, tmp_path / "model.onnx", 32, exporter="auto")
    assert done["exporter"] == "torchscript" and "simulated dynamo failure" in done["dynamo_error"]
    assert verify.compare(tmp_path / "model.onnx", model, held_out)["passed"]
    with pytest.raises(RuntimeError):
        graph.export_graph(model, tmp_path / "again.onnx", 32, exporter="dynamo")


# ----------------------------------------------------------------------------- --no-tta, INT8
@pytest.fixture(scope="module")
def no_tta_refused(run_copy, tmp_path_factory):
    """`ssl export RUN --out EXPORT --no-tta --int8 --force` with the INT8 tolerance forced below
    any possible drop, over an existing EXPORT holding a stale file."""
    out = tmp_path_factory.mktemp("ntta") / "EXPORT"
    out.mkdir()
    (out / "meta.json").write_text("{}")  # an earlier export ...
    (out / "stale.txt").write_text("old")  # ... with a file the new one does not have
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(int8mod, "TOLERANCE", -1.0)
        res = cli("export", run_copy, "--out", out, "--no-tta", "--int8", "--force")
    return out, res


def test_no_tta_graph_has_no_flip_and_matches_pytorch(no_tta_refused, run_copy, held_out):
    out, _ = no_tta_refused
    meta = read_meta(out)
    assert meta["tta"] is False
    assert [lv["name"] for lv in meta["levels"]] == ["full", "top2_no_tta"]
    assert meta["levels"][0] == {"name": "full", "file": "model.onnx", "tta": False, "members": 4}
    assert graph.flip_slices(out / "model.onnx") == 0 and graph.flip_slices(out / "levels/top2_no_tta.onnx") == 0
    model, _ = load_ensemble(run_copy, tta=False)
    p, _ = verify.run_ort(verify.ort_session(out / "model.onnx"), held_out, 3)
    assert np.abs(p - verify.run_torch(model, held_out)[0]).max() <= 1e-4
    assert np.abs(p - member_probs_by_hand(run_copy, held_out, tta=False)).max() <= 1e-4


def test_int8_refusal_is_one_line_exit_2_and_leaves_no_int8_file(no_tta_refused, run_copy):
    out, res = no_tta_refused
    line = one_line_error(res, after_progress=True)
    assert "INT8 refused" in line and "macro F1" in line
    assert not (out / "model.int8.onnx").exists()
    meta = read_meta(out)  # the FP32 export itself is complete and verified
    assert meta["int8"]["accepted"] is False and meta["int8"]["file"] is None
    # the numbers behind the refusal are the real out-of-fold ones, and the line says them
    model, doc = load_ensemble(run_copy, tta=False)
    data = verify.load_run_images(run_copy, doc["classes"], doc["img_size"])
    f32 = oof_macro_f1_by_hand(model, doc["members"], data)
    assert meta["int8"]["macro_f1_fp32"] == pytest.approx(f32, abs=1e-9)
    assert meta["int8"]["drop"] == pytest.approx(meta["int8"]["macro_f1_fp32"] - meta["int8"]["macro_f1_int8"])
    assert f"({meta['int8']['macro_f1_fp32']:.4f} -> {meta['int8']['macro_f1_int8']:.4f})" in line
    assert check_files(out) == []


@torch.no_grad()
def oof_macro_f1_by_hand(model, members: list[dict], data) -> float:
    """The gate's reference number computed independently, in PyTorch: each labeled image scored
    by the members validated on its fold (weights renormalised), then sklearn's macro F1."""
    from sklearn.metrics import f1_score

    x = model.pre(torch.from_numpy(np.ascontiguousarray(data.images)))
    per = []
    for m in model.members:
        p = torch.softmax(m(x), dim=1)
        if model.tta:
            p = 0.5 * (p + torch.softmax(m(x.flip(3)), dim=1))
        per.append(p.numpy())
    w = np.asarray([m["weight"] for m in members], dtype=np.float64)
    pred = np.full(len(data.images), -1)
    for k in np.unique(data.folds):
        idx = [i for i, m in enumerate(members) if m.get("fold") == k]
        rows = data.folds == k
        pred[rows] = (sum(w[i] * per[i][rows] for i in idx) / w[idx].sum()).argmax(1)
    n_cls = per[0].shape[1]
    return float(f1_score(data.labels, pred, average="macro", labels=list(range(n_cls)), zero_division=0))


def test_int8_accepted_when_macro_f1_holds(exported, run_copy, tmp_path):
    """The gate on the real numbers: macro F1 of FP32 is the out-of-fold ensemble's (checked
    against an independent PyTorch computation); with the limit at the measured drop INT8 is
    kept, with the limit just below it INT8 is refused and deleted, the same numbers reported."""
    d = tmp_path / "EXPORT"
    shutil.copytree(exported, d)
    model, doc = load_ensemble(run_copy, tta=True)
    data = verify.load_run_images(run_copy, doc["classes"], doc["img_size"])
    rep = int8mod.add_int8(d, model, doc["members"], data)
    assert rep["accepted"] and rep["file"] == "model.int8.onnx" and (d / "model.int8.onnx").is_file()
    assert rep["images"] == len(data.images) and rep["validation"].startswith("out-of-fold")
    assert rep["macro_f1_fp32"] == pytest.approx(oof_macro_f1_by_hand(model, doc["members"], data), abs=1e-9)
    assert abs(rep["macro_f1_fp32"] - rep["macro_f1_int8"]) <= 0.01 and rep["drop"] == pytest.approx(
        rep["macro_f1_fp32"] - rep["macro_f1_int8"])
    at_limit = int8mod.add_int8(d, model, doc["members"], data, tolerance=rep["drop"])
    assert at_limit["accepted"] and (d / "model.int8.onnx").is_file()  # drop == limit: kept
    with pytest.raises(int8mod.Int8Refused) as refused:
        int8mod.add_int8(d, model, doc["members"], data, tolerance=rep["drop"] - 1e-6)
    r = refused.value.report
    assert not r["accepted"] and r["file"] is None and not (d / "model.int8.onnx").exists()
    assert (r["macro_f1_fp32"], r["macro_f1_int8"]) == (rep["macro_f1_fp32"], rep["macro_f1_int8"])
    assert f"{rep['macro_f1_fp32']:.4f} -> {rep['macro_f1_int8']:.4f}" in str(refused.value)
    int8mod.add_int8(d, model, doc["members"], data)  # put it back for the checks below
    assert rep["bytes_int8"] < rep["bytes_fp32"]
    ops = graph.op_counts(d / "model.int8.onnx")
    assert ops["MatMulInteger"] + ops["DynamicQuantizeMatMul"] > 0
    p, y = verify.run_ort(verify.ort_session(d / "model.int8.onnx"), data.images, 17)
    assert p.shape == (len(data.images), 3) and (y == p.argmax(1)).all()


def test_oof_predictions_use_only_members_of_the_images_fold():
    # 2 members (fold 0, fold 1), 3 classes, 4 images; member 0 says class 0, member 1 says class 2
    terms = np.zeros((2, 4, 3))
    terms[0, :, 0] = 0.5
    terms[1, :, 2] = 0.5
    preds, mask = int8mod.oof_predictions(terms, np.array([0.5, 0.5]), [0, 1], np.array([0, 1, 0, 1]))
    assert preds.tolist() == [0, 2, 0, 2] and mask.all()
    preds, mask = int8mod.oof_predictions(terms, np.array([0.5, 0.5]), [0, None], np.array([0, 1, 0, 1]))
    assert preds.tolist() == [0, -1, 0, -1] and mask.tolist() == [True, False, True, False]


# ----------------------------------------------------------------------------- CLI rules
def test_same_export_again_is_a_no_op_and_other_options_need_force(exported, run_copy):
    before = (exported / "meta.json").read_text()
    res = cli("export", run_copy)  # same ensemble.json, same options: up to date
    assert res.exit_code == 0 and "up to date" in res.output
    assert (exported / "meta.json").read_text() == before
    line = one_line_error(cli("export", run_copy, "--no-tta"))  # different options: refuse
    assert "--force" in line
    assert (exported / "meta.json").read_text() == before


def test_force_replaces_an_export(no_tta_refused):
    out, _ = no_tta_refused
    assert not (out / "stale.txt").exists() and read_meta(out)["tta"] is False
    assert [p.name for p in out.parent.iterdir()] == ["EXPORT"]  # no temporary or old copy left


def test_force_never_replaces_a_run_or_a_foreign_directory(run_copy, tmp_path):
    assert "replace the run itself" in one_line_error(cli("export", run_copy, "--out", run_copy, "--force"))
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"x")
    assert "not a semivit export" in one_line_error(cli("export", run_copy, "--out", foreign, "--force"))
    assert (foreign / "holiday.jpg").is_file()


def test_failed_verification_fails_the_export_and_leaves_nothing(run_copy, tmp_path, monkeypatch):
    real = verify.compare
    monkeypatch.setattr(verify, "compare", lambda *a, **k: real(*a, **{**k, "atol": -1.0}))
    with pytest.raises(UserError, match="verification of the full graph failed"):
        export_run(run_copy, out=tmp_path / "EXPORT", tta=False, exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_not_a_run_is_one_line_exit_2(tmp_path):
    assert "ensemble.json" in one_line_error(cli("export", tmp_path))


@pytest.mark.skipif(tensorrt.unavailable_reason() is None, reason="TensorRT and a CUDA GPU are available here")
def test_trt_without_gpu_is_one_line_exit_2_before_any_work(run_copy, tmp_path):
    line = one_line_error(cli("export", run_copy, "--out", tmp_path / "EXPORT", "--trt"))
    assert "--trt needs TensorRT and a CUDA GPU" in line
    assert not (tmp_path / "EXPORT").exists()
    with pytest.raises(UserError, match="needs TensorRT"):
        tensorrt.check_engine(tmp_path)


# ----------------------------------------------------------------------------- formats
def test_external_data_when_weights_pass_the_limit(run_copy, held_out, tmp_path, monkeypatch):
    monkeypatch.setattr(graph, "PROTO_LIMIT_BYTES", 1000)  # the tiny ensemble "passes 2 GB"
    model, _ = load_ensemble(run_copy, tta=True)
    path = tmp_path / "model.onnx"
    done = graph.export_graph(model, path, 32, exporter="torchscript")
    assert done["external_data"] and graph.data_file(path).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert path.stat().st_size < graph.data_file(path).stat().st_size
    graph.set_metadata(path, {"level": "full"})
    onnx.checker.check_model(str(path))
    assert verify.compare(path, model, held_out)["passed"]


def test_fp16_graph_for_tensorrt_keeps_io_types(exported, held_out, tmp_path):
    """The TensorRT >= 11 path's FP16 conversion, checked on CPU with ONNX Runtime."""
    dst = tmp_path / "model.fp16.onnx"
    fp16.convert_file(exported / "model.onnx", dst)
    model = onnx.load(str(dst))
    assert not [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    p32, y32 = verify.run_ort(verify.ort_session(exported / "model.onnx"), held_out, 17)
    p16, y16 = verify.run_ort(verify.ort_session(dst), held_out, 17)
    assert p16.dtype == np.float32 and y16.dtype == np.int64
    assert np.abs(p16 - p32).max() <= 1e-2 and (y16 == y32).mean() >= 0.9


def test_level_plan_contract():
    mk = lambda ws: [{"name": f"m{i}", "weight": w} for i, w in enumerate(ws)]  # noqa: E731
    one = levelmod.plan_levels(mk([1.0]), tta=True)
    assert [lv.contract() for lv in one] == [{"name": "full", "file": "model.onnx", "tta": True, "members": 1},
                                             {"name": "no_tta", "file": "levels/no_tta.onnx", "tta": False, "members": 1}]
    five = levelmod.plan_levels(mk([0.1, 0.3, 0.2, 0.3, 0.1]), tta=False)
    assert [lv.name for lv in five] == ["full", "top3_no_tta"] and five[0].tta is False
    top = five[1].members
    assert [m["name"] for m in top] == ["m1", "m2", "m3"]
    assert [m["weight"] for m in top] == pytest.approx([0.375, 0.25, 0.375])


# ----------------------------------------------------------------------------- TensorRT (GPU)
@pytest.mark.gpu
@pytest.mark.skipif(tensorrt.unavailable_reason() is not None,
                    reason=f"TensorRT engine tests need TensorRT and a CUDA GPU: {tensorrt.unavailable_reason()}")
def test_tensorrt_engine_builds_verifies_and_rebuilds_on_mismatch(exported, run_copy, held_out, tmp_path, monkeypatch):
    monkeypatch.setenv("SEMIVIT_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "EXPORT"
    shutil.copytree(exported, d)
    doc = tensorrt.build_and_verify(d, held_out, 32, max_batch=17)
    engine = (d / "model.engine").read_bytes()
    assert engine[:4] != b"{\"fo" and doc["engine_sha256"]  # raw plan, no JSON header glued on
    info = json.loads((d / "engine.json").read_text())
    assert info["profile"]["min"][0] == 1 and info["profile"]["max"][0] == 17
    assert info["onnx_sha256"] == read_meta(d)["files"]["model.onnx"]
    assert info["verification"]["passed"] and Path(info["timing_cache"]).is_file()
    assert tensorrt.engine_mismatches(d) == [] and tensorrt.check_engine(d) == d / "model.engine"
    info["tensorrt"] = "0.0.0"
    (d / "engine.json").write_text(json.dumps(info))
    with pytest.raises(UserError, match="does not fit this machine"):
        tensorrt.check_engine(d, rebuild=False)
    assert tensorrt.check_engine(d) == d / "model.engine"
    assert json.loads((d / "engine.json").read_text())["rebuilt_because"]
    p, y = tensorrt.EngineRunner(d / "model.engine")(held_out[:5])
    assert p.shape == (5, 3) and (y == p.argmax(1)).all()


# ----------------------------------------------------------------------------- TensorRT logic on CPU
class _FakeTRT:
    """The slice of the tensorrt Python API that build_engine uses, recording what it is asked."""

    def __init__(self, version: str, plan=b"PLAN", parse_ok=True):
        import types

        self.__version__, self.plan, self.parse_ok = version, plan, parse_ok
        self.flags, self.parsed, self.shapes, self.cache_in = [], [], [], None
        self.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda s, level=None: None})
        flags = {"FP16": "fp16"} if version.startswith("10.") else {}  # TensorRT 11 has no FP16 flag
        self.BuilderFlag = types.SimpleNamespace(**flags)
        fake = self

        class Parser:
            num_errors = 0 if parse_ok else 1

            def __init__(self, network, logger):
                pass

            def parse_from_file(self, path):
                model = onnx.load(path)
                fake.parsed.append((Path(path).name, {t.data_type for t in model.graph.initializer}))
                return fake.parse_ok

            def get_error(self, i):
                return "In node 3 (Slice): unsupported"

        class Cache:
            def serialize(self):
                return b"TIMINGS"

        class Config:
            def set_flag(self, f):
                fake.flags.append(f)

            def add_optimization_profile(self, p):
                pass

            def create_timing_cache(self, blob):
                fake.cache_in = blob
                return Cache()

            def set_timing_cache(self, cache, ignore_mismatch):
                pass

            def get_timing_cache(self):
                return Cache()

        class Profile:
            def set_shape(self, name, lo, opt, hi):
                fake.shapes.append((name, list(lo), list(opt), list(hi)))

        class Builder:
            def __init__(self, logger):
                pass

            def create_network(self, flags):
                return object()

            def create_builder_config(self):
                return Config()

            def create_optimization_profile(self):
                return Profile()

            def build_serialized_network(self, network, config):
                return fake.plan

        self.OnnxParser, self.Builder = Parser, Builder


@pytest.mark.parametrize("version", ["10.13.0", "11.4.0"])
def test_tensorrt_build_uses_fp16_flag_on_10_and_an_fp16_graph_on_11(version, exported, tmp_path, monkeypatch):
    import sys

    fake = _FakeTRT(version)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setenv("SEMIVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tensorrt, "machine", lambda: {"tensorrt": version, "gpu": "NVIDIA Test GPU",
                                                      "compute_capability": "9.0"})
    d = tmp_path / "EXPORT"
    shutil.copytree(exported, d)
    doc = tensorrt.build_engine(d / "model.onnx", d / "model.engine", tensorrt.profile_for(32, 64))
    assert (d / "model.engine").read_bytes() == b"PLAN"  # the raw plan, nothing glued on
    assert fake.shapes == [("images", [1, 32, 32, 3], [32, 32, 32, 3], [64, 32, 32, 3])]
    (name, dtypes), = fake.parsed
    if version.startswith("10."):
        assert fake.flags == ["fp16"] and name == "model.onnx" and dtypes == {onnx.TensorProto.FLOAT}
    else:
        assert fake.flags == [] and name.endswith(".fp16.onnx") and onnx.TensorProto.FLOAT not in dtypes
        assert "strongly typed" in doc["fp16_method"]
    assert not [p for p in d.iterdir() if "fp16" in p.name], "the FP16 graph is a build intermediate"
    assert doc["onnx_sha256"] == read_meta(d)["files"]["model.onnx"] and doc["gpu"] == "NVIDIA Test GPU"
    cache = Path(doc["timing_cache"])
    assert cache.read_bytes() == b"TIMINGS" and cache.parent == tmp_path / "cache" / "tensorrt"
    tensorrt.build_engine(d / "model.onnx", d / "model.engine", tensorrt.profile_for(32, 64))
    assert fake.cache_in == b"TIMINGS", "the timing cache is reused by the next build"


def test_tensorrt_build_failures_are_clear_errors(exported, tmp_path, monkeypatch):
    import sys

    monkeypatch.setenv("SEMIVIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tensorrt, "machine", lambda: {"tensorrt": "10.13.0", "gpu": "G", "compute_capability": "8.6"})
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT("10.13.0", plan=None))
    with pytest.raises(UserError, match="failed to build an engine"):
        tensorrt.build_engine(exported / "model.onnx", tmp_path / "model.engine", tensorrt.profile_for(32, 8))
    monkeypatch.setitem(sys.modules, "tensorrt", _FakeTRT("10.13.0", parse_ok=False))
    with pytest.raises(UserError, match="cannot parse model.onnx: In node 3"):
        tensorrt.build_engine(exported / "model.onnx", tmp_path / "model.engine", tensorrt.profile_for(32, 8))
    assert not (tmp_path / "model.engine").exists()
    assert tensorrt.profile_for(32, 8)["opt"] == [8, 32, 32, 3]
