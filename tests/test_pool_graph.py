"""``ensemble.graph: pool``: the labeled images + the unlabeled pool as a label-spreading graph that
every prediction mixes in (semivit.models.pool_graph, the stage ``graph``), in PyTorch, in
``ssl eval``, in the exported ONNX graph and beside the INT8 gate.  The references are written
here: scikit-learn's NearestNeighbors and LabelSpreading, numpy mixing."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import invoke, one_line_error
from semivit import config
from semivit.models.pool_graph import PoolGraph


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _reference(nodes, dist, probs, queries, k, share):
    """Mean row-normalised distribution of the k nearest nodes (Euclidean on unit vectors), mixed:
    share x probs + (1 - share) x that (renormalised); a query none of whose k nodes was reached
    keeps probs."""
    from sklearn.neighbors import NearestNeighbors

    mass = dist.sum(1, keepdims=True)
    norm = np.where(mass > 0, dist / np.where(mass > 0, mass, 1), 0)
    idx = NearestNeighbors(n_neighbors=k).fit(nodes).kneighbors(queries, return_distance=False)
    g = norm[idx].mean(1)
    gm = g.sum(1, keepdims=True)
    sp = np.where(gm > 0, g / np.where(gm > 0, gm, 1), probs)
    p = share * probs + (1 - share) * sp
    return p / p.sum(1, keepdims=True)


def test_the_module_is_the_nearest_nodes_mean_mixed_with_the_ensemble():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(40, 6)), rng.normal(size=(40, 4))  # two members' embeddings of the nodes
    nodes = np.concatenate([_unit(a), _unit(b)], 1) / np.sqrt(2)
    dist = rng.random((40, 3))
    dist[30:] = 0  # nodes the spreading never reached
    nodes[30:] = _unit(np.tile([0, 0, 0, 0, 0, 9, 0, 0, 0, 1.0], (10, 1))) + 1e-3 * rng.normal(size=(10, 10))
    nodes[30:] = _unit(nodes[30:])
    qa, qb = rng.normal(size=(12, 6)), rng.normal(size=(12, 4))
    qa[-1], qb[-1] = [0, 0, 0, 0, 0, 9], [0, 0, 0, 1.0]  # in the middle of the unreached nodes
    probs = rng.dirichlet(np.ones(3), size=12)
    g = PoolGraph(nodes, dist, neighbors=5, share=0.3)
    with torch.no_grad():
        got = g(torch.tensor(probs, dtype=torch.float32),
                [torch.tensor(3 * qa, dtype=torch.float32), torch.tensor(qb, dtype=torch.float32)]).numpy()
    queries = np.concatenate([_unit(qa), _unit(qb)], 1) / np.sqrt(2)  # scale does not matter: rows normalised
    want = _reference(nodes, dist, probs, queries, 5, 0.3)
    np.testing.assert_allclose(got, want, atol=1e-5)
    np.testing.assert_allclose(got[-1], probs[-1], atol=1e-6)  # unreached neighbours: the ensemble's own
    assert np.abs(got[:-1] - probs[:-1]).max() > 0.05  # the graph moved the others
    with torch.no_grad():  # share 1: the ensemble alone
        same = g.__class__(nodes, dist, 5, 1.0)(torch.tensor(probs, dtype=torch.float32),
                                                [torch.tensor(qa, dtype=torch.float32), torch.tensor(qb, dtype=torch.float32)])
    np.testing.assert_allclose(same.numpy(), probs, atol=1e-6)


def _graph_run(tiny_run: Path, tiny_data_shared: Path, tmp_path: Path) -> tuple[Path, object]:
    """A copy of the tiny run with ``ensemble.graph: pool`` (5 neighbours, alpha 0.3, share 0.4)
    and its stage ``graph`` run."""
    from semivit.trainer.pipeline import run_stages
    from semivit.trainer.run import Run

    run_dir = tmp_path / "RUN"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    cfg = config.resolve(preset="tiny", overrides=["ensemble.graph=pool", "ensemble.graph_neighbors=5",
                                                   "ensemble.graph_alpha=0.3", "ensemble.graph_share=0.4"])
    config.save(cfg, run_dir / "config.yaml", extra={"data": str(tiny_data_shared)})
    run_stages(Run(run_dir, cfg, tiny_data_shared), ["graph"])
    return run_dir, cfg


def _member_outputs(run_dir: Path, stages, images, tta=True):
    from semivit.models.checkpoint import load_checkpoint
    from semivit.models.ensemble import members_from_stages
    from semivit.trainer.infer import predict_arrays

    out = []
    for m in members_from_stages(run_dir, stages):
        model, _ = load_checkpoint(run_dir / m["path"])
        out.append((m["name"], *predict_arrays(model, images, tta=tta, with_embeddings=True)))
    return out


def test_the_graph_stage_serves_the_spread_labels_in_eval_and_in_the_export(tiny_run, tiny_data_shared, tmp_path):
    from sklearn.semi_supervised import LabelSpreading

    from semivit.data.dataset import decode_many
    from semivit.data.layout import load_eval, load_train, unlabeled_pool
    from semivit.models.ensemble import read_ensemble
    from semivit.trainer.infer import ensemble_predict

    run_dir, cfg = _graph_run(tiny_run, tiny_data_shared, tmp_path)
    size = cfg.model.img_size
    lab = load_train(tiny_data_shared, cfg.data.labels_csv)
    lab_images = decode_many(lab.paths, size).images
    pool_images = decode_many(unlabeled_pool(tiny_data_shared, None, cfg.seed), size).images
    with np.load(run_dir / "graph.npz") as z:
        nodes, dist, members = z["nodes"], z["dist"], list(z["members"])
    assert members == ["stage1/fold0", "stage1/fold1"]

    # the nodes: the stage-1 members' embeddings of the labeled images, then of the pool
    def joint(images):
        outs = _member_outputs(run_dir, ["stage1"], images)
        return np.concatenate([_unit(e) for _, _, e in outs], 1) / np.sqrt(len(outs))

    want_nodes = np.concatenate([joint(lab_images), joint(pool_images)])
    np.testing.assert_allclose(nodes, want_nodes, atol=1e-4)
    y = np.concatenate([lab.labels, -np.ones(len(pool_images), int)])
    ls = LabelSpreading(kernel="knn", n_neighbors=5, alpha=0.3, max_iter=200, tol=1e-4).fit(want_nodes.astype(np.float64), y)
    np.testing.assert_allclose(dist[:, ls.classes_], ls.label_distributions_, atol=1e-3)

    # ssl eval's probabilities (ensemble_predict of the run): the ensemble mixed with the graph
    ev = load_eval(tiny_data_shared, read_ensemble(run_dir)["classes"])
    test_images = decode_many(ev.paths, size).images
    doc = read_ensemble(run_dir)
    outs = {n: (p, e) for n, p, e in _member_outputs(run_dir, ["stage1", "stage3"], test_images)}
    ens = sum(m["weight"] * outs[m["name"]][0] for m in doc["members"])
    q = np.concatenate([_unit(outs[n][1]) for n in members], 1) / np.sqrt(len(members))
    want = _reference(want_nodes, dist, ens, q, 5, 0.4)
    got = ensemble_predict(run_dir, test_images)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(ensemble_predict(run_dir, test_images, graph=False), ens, atol=1e-5)
    assert np.abs(got - ens).max() > 0.05

    # the export: one ONNX graph gives the same probabilities; the levels that hold both stage-1
    # members end in the graph; INT8 keeps the graph's MatMul in FP32 and its gate out of fold
    res = invoke("export", run_dir, "--int8")
    meta = json.loads((run_dir / "export" / "meta.json").read_text())
    assert res.exit_code == 0 or meta["int8"]["accepted"] is False, res.output  # (refused: FP32 kept)
    with_both = [lv for lv, ms in meta["level_members"].items() if set(members) <= {m["name"] for m in ms}]
    assert meta["graph"]["levels"] == with_both and "full" in with_both
    assert meta["graph"]["neighbors"] == 5 and meta["graph"]["share"] == 0.4
    import onnxruntime as ort

    sess = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(["probs"], {"images": test_images})[0], want, atol=1e-4)
    from semivit.export.int8 import quantize

    quantize(run_dir / "export" / "model.onnx", tmp_path / "q.onnx")
    q8 = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in q8.graph.node if any("nodes_t" in i for i in n.input)] == ["MatMul"]
    assert any(n.op_type == "MatMulInteger" for n in q8.graph.node)  # the members' MatMuls are INT8
    assert meta["int8"]["validation"].startswith("out-of-fold")  # the members' terms found through the graph


def test_the_run_report_scores_what_is_served(tiny_run, tiny_data_shared, tmp_path):
    from semivit.trainer.report import heldout_scores
    from semivit.trainer.run import Run

    run_dir, cfg = _graph_run(tiny_run, tiny_data_shared, tmp_path)
    held = heldout_scores(Run(run_dir, cfg, tiny_data_shared))
    res = invoke("eval", run_dir, tiny_data_shared, "--out", tmp_path / "ev.json")
    assert res.exit_code == 0, res.output
    served = json.loads((tmp_path / "ev.json").read_text())
    assert held["full_graph"]["macro_f1"] == pytest.approx(served["macro_f1"], abs=1e-9)
    assert held["full_graph"]["confusion_matrix"] == served["confusion_matrix"]


def test_an_unreadable_graph_file_is_a_one_line_error(tiny_run, tiny_data_shared, tmp_path):
    run_dir = tmp_path / "RUN"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    (run_dir / "graph.npz").write_bytes(b"not a numpy archive")
    line = one_line_error(invoke("eval", run_dir, tiny_data_shared, "--out", tmp_path / "ev.json"))
    assert "graph.npz is not a readable semivit graph" in line and "--stages graph" in line


def test_an_ensemble_whose_member_outputs_are_not_asked_for_still_runs(tiny_run, tmp_path):
    """The INT8 gate's fallback (members' terms not located: the whole ensemble scored) runs the
    graph with no extra outputs - no terms, the probabilities as the plain session gives them."""
    import onnxruntime as ort

    from semivit.export.int8 import run_members

    run_dir = tmp_path / "RUN"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    assert invoke("export", run_dir).exit_code == 0
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    probs, terms, _ = run_members(run_dir / "export" / "model.onnx", [], images)
    assert terms.shape == (0, 5, probs.shape[1])
    sess = ort.InferenceSession(str(run_dir / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(probs, sess.run(["probs"], {"images": images})[0], atol=1e-6)


def test_a_finished_run_gains_changes_and_drops_its_graph_on_resume(tiny_run, tiny_data_shared, tmp_path):
    """The graph is built after training, from it: its keys may change on a finished run (other
    keys may not), config.yaml follows, and graph.npz is rebuilt or removed to match."""
    run_dir = tmp_path / "RUN"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("export", "eval"))
    base = ("train", tiny_data_shared, "--preset", "tiny", "--out", run_dir)
    res = invoke(*base, "--stages", "graph", "--set", "ensemble.graph=pool")
    assert res.exit_code == 0, res.output
    first = (run_dir / "graph.npz").read_bytes()
    assert "graph: pool" in (run_dir / "config.yaml").read_text()
    assert invoke(*base, "--stages", "graph", "--set", "ensemble.graph=pool").exit_code == 0
    assert (run_dir / "graph.npz").read_bytes() == first  # same settings: kept
    res = invoke(*base, "--stages", "graph", "--set", "ensemble.graph=pool", "--set", "ensemble.graph_share=0.25")
    assert res.exit_code == 0, res.output
    with np.load(run_dir / "graph.npz") as z:
        assert json.loads(str(z["meta"]))["share"] == 0.25
    assert "graph_share: 0.25" in (run_dir / "config.yaml").read_text()
    line = one_line_error(invoke(*base, "--set", "ensemble.graph=pool", "--set", "train.epochs=3"))
    assert "different config (train.epochs" in line
    assert invoke(*base).exit_code == 0  # the tiny preset: no graph
    assert not (run_dir / "graph.npz").exists() and "graph: none" in (run_dir / "config.yaml").read_text()
