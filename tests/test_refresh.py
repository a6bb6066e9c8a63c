"""`ssl refresh` and `ssl models`: the registry, the inbox state, the refresh job, crash safety.

Fast unit tests first (no model); then the end-to-end tests on ``tiny_run`` (2 folds, 32 px):
two refresh cycles (promote, then reject), list / rollback / promote, predictions through the
serving resolver; the lock; low disk space; the ``--every`` loop; and a crash test that SIGKILLs
real ``ssl refresh`` processes at every step (``SEMIVIT_TEST_KILL_AT``) and once at a random time.

The registry every end-to-end test starts from is registered once per session (``ssl train
--registry`` does the same through register_run) and copied per test.  Exports use the
TorchScript ONNX exporter (SEMIVIT_ONNX_EXPORTER, the exporter's documented switch): the same
graph contract, a third of dynamo's time on this 2-core box; the exporter is not under test here.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from semivit.cli import app
from semivit.errors import UserError
from semivit.refresh import history
from semivit.refresh import registry as reg
from semivit.refresh.build import register_run
from semivit.refresh.inbox import Inbox
from semivit.refresh.job import parse_duration, refresh_cli, refresh_once
from semivit.refresh.lock import EXIT_LOCKED, EXIT_LOW_DISK, FileLock, RegistryBusy

from conftest import SSL_MODULE, TINY_CLASSES, class_image, invoke, write_image

FAST_TRAIN = ["train.epochs=1", "pseudo.cluster=false"]


# --------------------------------------------------------------------------------------------- helpers

def write_inbox(root: Path, n_per_class: int, seed: int, prefix: str = "img") -> list[Path]:
    """Field images of the tiny classes, spread over root/ and root/<day>/ sub-folders."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n_per_class):
        for c in TINY_CLASSES:
            sub = root / (f"day{i % 2}" if i % 3 else "")
            out.append(write_image(sub / f"{prefix}_{seed}_{c}_{i}.png", class_image(c, rng)))
    return out


def snapshot(root: Path) -> dict:
    """path -> (sha256, size, mtime_ns) of every file under root (inbox files must never change)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(root))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return out


def tree_state(registry: Path) -> dict:
    """Everything observable in a registry: names, link targets, sizes and mtimes (no lock files)."""
    out = {}
    for p in sorted(Path(registry).rglob("*")):
        rel = str(p.relative_to(registry))
        if p.name in ("refresh.lock", "switch.lock"):
            continue
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = (p.stat().st_size, p.stat().st_mtime_ns)
    return out


def db_dump(registry: Path) -> list:
    with Inbox(registry) as db:
        return [tuple(r) for r in db.conn.execute("SELECT * FROM images ORDER BY sha256")] + \
               [tuple(r) for r in db.conn.execute("SELECT path, sha256 FROM paths ORDER BY path")]


cli = invoke


def holdout_f1_by_hand(export: Path, holdout: Path) -> float:
    """sklearn's macro F1 of an export's arg-max on DIR/<class>/ images (class = folder)."""
    from sklearn.metrics import f1_score

    from semivit.data.dataset import decode_many
    from semivit.serve.backends import open_backend

    be = open_backend(export, "onnxruntime")
    classes = be.classes if hasattr(be, "classes") else json.loads((export / "meta.json").read_text())["classes"]
    paths = sorted(p for p in holdout.rglob("*") if p.is_file())
    dec = decode_many(paths, be.img_size if hasattr(be, "img_size") else json.loads(
        (export / "meta.json").read_text())["img_size"])
    assert len(dec.ok) == len(paths) == 18
    y = np.array([classes.index(paths[i].parent.name) for i in dec.ok])
    pred = np.concatenate([be.predict(dec.images[s:s + 32])[0] for s in range(0, len(dec.images), 32)]).argmax(1)
    return float(f1_score(y, pred, average="macro", labels=list(range(len(classes))), zero_division=0))


def assert_consistent(registry: Path, why: str = "") -> None:
    """The crash-safety promise: current is a complete version whose export loads and predicts,
    every visible version is complete, the inbox state is consistent."""
    from semivit.serve.backends import open_backend
    from semivit.serve.resolve import resolve_model_dir

    problems = reg.check_registry(registry, load_export=True)
    assert problems == [], f"{why}: {problems}"
    ref = resolve_model_dir(registry)
    assert ref.version == reg.current_version(registry) and ref.export_dir is not None
    rng = np.random.default_rng(1)
    imgs = np.stack([np.asarray(class_image(c, rng, (ref.img_size, ref.img_size))) for c in TINY_CLASSES])
    probs = open_backend(ref, "onnxruntime").predict(imgs)[0]
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-4), why
    with Inbox(registry) as db:
        assert db.check() == [], why
    for v in reg.versions(registry):
        assert (registry / v / "manifest.json").is_file(), why


@pytest.fixture
def fast_export(monkeypatch):
    monkeypatch.setenv("SEMIVIT_ONNX_EXPORTER", "torchscript")


@pytest.fixture(scope="session")
def base_registry(tiny_run, tmp_path_factory) -> Path:
    """A registry whose v0001 is tiny_run (registered + exported once per session; read-only)."""
    old = os.environ.get("SEMIVIT_ONNX_EXPORTER")
    os.environ["SEMIVIT_ONNX_EXPORTER"] = "torchscript"
    try:
        registry = tmp_path_factory.mktemp("base_registry") / "REG"
        register_run(registry, tiny_run)
    finally:
        if old is None:
            os.environ.pop("SEMIVIT_ONNX_EXPORTER", None)
        else:
            os.environ["SEMIVIT_ONNX_EXPORTER"] = old
    return registry


@pytest.fixture
def registry(base_registry, tmp_path) -> Path:
    dst = tmp_path / "REG"
    shutil.copytree(base_registry, dst, symlinks=True)
    return dst


# --------------------------------------------------------------------------------------------- units

@pytest.mark.parametrize("text,seconds", [("90s", 90), ("30m", 1800), ("6h", 21600), ("1d", 86400),
                                          ("1h30m", 5400), ("1.5h", 5400), (" 2 m ", 120)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "6", "6x", "h", "0s", "-1h", "6h foo"])
def test_parse_duration_rejects_nonsense(text):
    with pytest.raises(UserError):
        parse_duration(text)


def test_version_names():
    assert [reg.parse_version(t) for t in ("3", "v3", "v0003", "0003")] == ["v0003"] * 4
    assert reg.parse_version("v12345") == "v12345"
    with pytest.raises(UserError):
        reg.parse_version("latest")


def test_inbox_state_hashes_dedups_tracks_changes_and_never_touches_files(tmp_path):
    inbox = tmp_path / "INBOX"
    files = write_inbox(inbox, 2, seed=1)
    shutil.copy(files[0], inbox / "copy_of_first.png")  # same content, another path
    (inbox / ".hidden.png").write_bytes(files[1].read_bytes())
    (inbox / "notes.txt").write_text("not an image")
    before = snapshot(inbox)
    reg_dir = tmp_path / "REG"
    reg_dir.mkdir()
    with Inbox(reg_dir) as db:
        st = db.ingest(inbox)
        assert (st.files, st.new_content, st.duplicates) == (7, 6, 1)
        assert db.counts()["new"] == 6 and db.counts()["paths"] == 7
        st = db.ingest(inbox)  # nothing changed: nothing new, nothing rehashed
        assert (st.new_content, st.duplicates, st.unchanged) == (0, 0, 7)
        # a file rewritten under the same name is new content; the old content's row stays
        rng = np.random.default_rng(99)
        write_image(files[2], class_image("red", rng))
        after_change = snapshot(inbox)
        st = db.ingest(inbox)
        assert (st.new_content, st.changed) == (1, 1)
        assert db.counts()["new"] == 7
        sha_new = hashlib.sha256(files[2].read_bytes()).hexdigest()
        assert db.locate(sha_new) == files[2].resolve()
        old_sha = before[str(files[2].relative_to(inbox))][0]
        assert db.row(old_sha)["state"] == "new" and db.locate(old_sha) is None  # content gone from disk
        # state transitions are transactions; used is idempotent
        first = hashlib.sha256(files[0].read_bytes()).hexdigest()
        db.record_labels("v0001", [{"sha256": first, "label": "red", "confidence": 0.99, "source": "threshold",
                                    "probs": [0.0, 0.01, 0.99]}], [(sha_new, "unconfident")])
        assert db.pending() == 1 and db.row(sha_new)["state"] == "rejected"
        assert [s for s, _ in db.to_label("v0001")].count(sha_new) == 0  # same version: not again
        assert [s for s, _ in db.to_label("v0002")].count(sha_new) == 1  # a new version looks again
        assert db.mark_used("v0002", [first]) == 1 and db.mark_used("v0002", [first]) == 1
        assert db.row(first)["state"] == "used" and db.row(first)["used_in"] == "v0002" and db.pending() == 0
        assert db.check() == []
    assert snapshot(inbox) == after_change  # only the test itself changed a file
    assert set(before) == set(after_change)


def test_promotion_journal_survives_a_kill_between_its_steps(tmp_path):
    r = tmp_path / "REG"
    for v in ("v0001", "v0002", "v0003"):
        (r / v).mkdir(parents=True)
        reg.write_manifest(r / v, {"format": reg.MANIFEST_FORMAT, "version": v, "status": "candidate"})
    reg.switch_current(r, "v0001")
    reg.switch_current(r, "v0002")
    assert reg.promotion_stack(r) == ["v0001", "v0002"] and os.readlink(r / "current") == "v0002"
    # killed after writing the intent, before switching: the switch did not happen
    stack = reg.promotion_stack(r)
    from semivit.utils import atomic_write_json

    atomic_write_json(r / "promotions.json", {"stack": stack, "pending": {"target": "v0003",
                                                                          "stack_after": stack + ["v0003"]}})
    assert reg.promotion_stack(r) == ["v0001", "v0002"]
    # killed after switching, before committing: the switch happened
    reg._switch_link(r, "v0003")
    assert reg.promotion_stack(r) == ["v0001", "v0002", "v0003"]
    # a rollback killed after its switch: the stack is popped, not pushed
    atomic_write_json(r / "promotions.json", {"stack": ["v0001", "v0002", "v0003"],
                                              "pending": {"target": "v0002", "stack_after": ["v0001", "v0002"]}})
    reg._switch_link(r, "v0002")
    assert reg.promotion_stack(r) == ["v0001", "v0002"]
    with pytest.raises(reg.CurrentChanged):
        reg.switch_current(r, "v0003", expect={"v0001"})
    assert reg.current_version(r) == "v0002"
    assert not list(r.glob(".current.*"))  # no temporary link left behind


def test_stale_lock_is_taken_over_and_a_held_lock_refuses(tmp_path):
    lock = tmp_path / "refresh.lock"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from semivit.refresh.lock import FileLock\n"
                               f"with FileLock({str(lock)!r}):\n    print('locked', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RegistryBusy, match=f"pid {holder.pid}") as e:
            with FileLock(lock):
                pass
        assert e.value.exit_code == EXIT_LOCKED
    finally:
        holder.kill()  # SIGKILL: no cleanup, its pid stays written in the lock file
        holder.wait()
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with FileLock(lock) as fl:
        assert fl.previous["pid"] == holder.pid  # taken over (the kernel dropped the dead flock)
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lock.read_text() == ""  # released cleanly


# --------------------------------------------------------------------------------------------- end to end

def test_two_refresh_cycles_promote_then_reject_list_rollback_and_serve_current(registry, tmp_path, fast_export,
                                                                                tiny_data_shared):
    from semivit.serve.backends import open_backend
    from semivit.serve.resolve import resolve_model_dir

    shutil.copytree(tiny_data_shared / "test", registry / "holdout")  # a fixed labeled holdout

    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 6, seed=11)  # 18 field images: enough for UMAP + KMeans cluster cores
    shutil.copy(next(inbox.glob("*.png")), inbox / "day0" / "same_bytes_again.png")
    (inbox / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (inbox / "readme.txt").write_text("field notes")
    before = snapshot(inbox)

    # cycle 1: everything new is pseudo-labeled, retrained, exported, compared and promoted
    rec = refresh_once(registry, inbox, min_new=5, tolerance=1.0, overrides=["train.epochs=1"])
    assert rec["decision"] == "promoted" and rec["version"] == "v0002", rec
    assert rec["ingested"]["files"] == 20 and rec["ingested"]["new_content"] == 19 and rec["ingested"]["duplicates"] == 1
    assert rec["labeled"]["undecodable"] == 1 and rec["labeled"]["clusters"] is True
    assert reg.current_version(registry) == "v0002"
    man2 = reg.read_manifest(registry / "v0002")
    assert man2["status"] == "promoted" and man2["parent"] == "v0001"
    assert man2["data"]["inbox_pseudo_labels"] == rec["labeled"]["accepted"] > 0
    assert man2["comparison"]["checks"][0]["current"] == reg.read_manifest(registry / "v0001")["metrics"]["val"]["macro_f1"]
    assert [c["metric"] for c in man2["comparison"]["checks"]] == ["val_macro_f1", "holdout_macro_f1"]
    assert man2["metrics"]["holdout"]["n_images"] == 18
    # the holdout score is v0002's own macro F1 on the registry's holdout, worked out here from
    # its export's predictions (not, say, the parent's or the validation score)
    assert man2["metrics"]["holdout"]["macro_f1"] == pytest.approx(
        holdout_f1_by_hand(registry / "v0002" / "export", registry / "holdout"), abs=1e-6)
    assert man2["comparison"]["checks"][1]["candidate"] == pytest.approx(man2["metrics"]["holdout"]["macro_f1"])
    ens = json.loads((registry / "v0002" / "run" / "ensemble.json").read_text())
    assert sorted(m["name"] for m in ens["members"]) == ["stage1/fold0", "stage1/fold1", "stage3/fold0", "stage3/fold1"]
    s3 = json.loads((registry / "v0002" / "run" / "stage3" / "fold0" / "done.json").read_text())
    assert s3["extra_samples"] >= rec["labeled"]["accepted"]  # original stage-2 + inbox pseudo-labels
    # stage 1 is the parent's, unchanged (shared by hard link, never rewritten)
    a, b = (registry / v / "run" / "stage1" / "fold0" / "best.pt" for v in ("v0001", "v0002"))
    assert a.read_bytes() == b.read_bytes()
    with Inbox(registry) as db:
        c = db.counts()
    assert c["used"] == rec["labeled"]["accepted"] and c["rejected"] >= 1 and c["paths"] == 20
    assert snapshot(inbox) == before  # never moved, modified or deleted

    # cycle 2: new images plus one rewritten file; a tolerance that demands an impossible
    # improvement (macro F1 + 1.0) keeps the candidate as rejected, with its numbers
    write_inbox(inbox, 3, seed=12, prefix="late")
    rng = np.random.default_rng(5)
    write_image(inbox / "readme_image.png", class_image("green", rng))
    before = snapshot(inbox)
    code = refresh_cli(registry, inbox, min_new=3, tolerance=-1.0, overrides=FAST_TRAIN)
    assert code == 0
    man3 = reg.read_manifest(registry / "v0003")
    assert man3["status"] == "rejected" and man3["comparison"]["passed"] is False
    assert "improvement of at least 1" in man3["comparison"]["reason"]
    assert man3["metrics"]["val"]["macro_f1"] is not None and reg.current_version(registry) == "v0002"
    assert snapshot(inbox) == before
    with Inbox(registry) as db:
        assert db.pending() == 0  # the rejected candidate used them: the next retrain waits for new ones
    assert_consistent(registry, "after two cycles")

    # models list shows all three with their status and numbers, and which is current
    r = CliRunner().invoke(app, ["models", "list", "--registry", str(registry)], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    lines = {ln.split()[ln.split()[0] == "*"]: ln for ln in r.output.splitlines()
             if ln.strip().startswith(("v0", "* "))}
    assert set(lines) == {"v0001", "v0002", "v0003"}, r.output
    assert "promoted" in lines["v0002"] and lines["v0002"].lstrip().startswith("*")
    assert "rejected" in lines["v0003"] and f"{man3['metrics']['val']['macro_f1']:.4f}" in lines["v0003"]

    # predictions follow current: v0002 now, v0001 after a rollback
    imgs = np.stack([class_image(c, np.random.default_rng(3), (32, 32)) for c in TINY_CLASSES])

    def served():
        ref = resolve_model_dir(registry)
        return ref.version, open_backend(ref, "onnxruntime").predict(imgs)[0]

    def of(version):
        return open_backend(registry / version / "export", "onnxruntime").predict(imgs)[0]

    v, p = served()
    assert v == "v0002" and np.allclose(p, of("v0002"))
    r = cli("models", "rollback", "--registry", str(registry))
    assert r.exit_code == 0 and "v0002 -> v0001" in r.output, r.output
    v, p = served()
    assert v == "v0001" and np.allclose(p, of("v0001")) and not np.allclose(p, of("v0002"))
    r = cli("models", "rollback", "--registry", str(registry))
    assert r.exit_code == 2 and "nothing to roll back to" in r.output
    # a rejected candidate can still be promoted by hand, and rolled back again
    r = cli("models", "promote", "3", "--registry", str(registry))
    assert r.exit_code == 0 and reg.current_version(registry) == "v0003"
    assert reg.read_manifest(registry / "v0003")["status"] == "promoted"
    assert cli("models", "rollback", "--registry", str(registry)).exit_code == 0
    assert reg.current_version(registry) == "v0001"
    r = cli("models", "promote", "v0042", "--registry", str(registry))
    assert r.exit_code == 2 and "no version v0042" in r.output

    # ssl predict --model REGISTRY serves current
    out = tmp_path / "pred.csv"
    r = cli("predict", str(inbox / "day1"), "--model", str(registry), "--out", str(out))
    assert r.exit_code == 0, r.output
    assert out.is_file() and len(out.read_text().splitlines()) > 1

    hist = history.read(registry)
    actions = [h["action"] for h in hist]
    assert actions == ["register", "refresh", "refresh", "rollback", "promote", "rollback"], actions
    assert [h.get("decision") for h in hist[1:3]] == ["promoted", "rejected"]
    md = (registry / "history.md").read_text()
    assert md.count("| refresh |") == 2 and "rejected" in md


def ssl_refresh(registry: Path, inbox: Path, kill: str | None = None, wait: bool = True, *extra: str):
    """A real `ssl refresh` process (optionally told to SIGKILL itself at a step)."""
    env = {**os.environ, "SEMIVIT_ONNX_EXPORTER": "torchscript", "SEMIVIT_QUIET": "1", "COLUMNS": "200"}
    env.pop("SEMIVIT_TEST_KILL_AT", None)
    if kill:
        env["SEMIVIT_TEST_KILL_AT"] = kill
    args = [*SSL_MODULE, "refresh", "--registry", str(registry),
            "--inbox", str(inbox), "--min-new", "3", "--tolerance", "1.0",
            *[a for s in FAST_TRAIN for a in ("--set", s)], *extra]
    if not wait:
        return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)


def test_refresh_labels_the_inbox_by_the_runs_configured_rule_per_class_oof_thresholds(registry, tmp_path):
    """A registry whose run has the per-class oof pseudo-label rule (threshold_mode oof,
    target_precision 0.9, max_per_class 200): ``ssl refresh`` selects inbox pseudo-labels by
    per-class thresholds calibrated on that run's stage-1 out-of-fold predictions - not by the
    global pseudo.threshold (the tiny run's 0.3), which would accept nearly every image."""
    import yaml

    from semivit.data.dataset import decode_many
    from semivit.pseudo.rules import oof_thresholds
    from semivit.trainer.infer import ensemble_predict

    run = registry / "v0001" / "run"
    doc = yaml.safe_load((run / "config.yaml").read_text())
    doc["config"]["pseudo"].update({"threshold_mode": "oof", "target_precision": 0.9, "max_per_class": 200})
    (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    inbox = tmp_path / "INBOX"
    files = write_inbox(inbox, 3, seed=21)  # 9 images: below UMAP + KMeans's minimum, rule only

    # label only (no retrain); a tiny model's ensemble never reaches 0.9 precision with
    # confidence, so the refresh's --set asks 0.6 - an override goes the way the run's config does
    rec = refresh_once(registry, inbox, min_new=10 ** 6, overrides=["pseudo.target_precision=0.6"])
    assert rec["decision"] == "waiting" and rec["labeled"]["looked_at"] == 9 and not rec["labeled"]["clusters"]

    # the thresholds it applied: the oof rule on the run's own out-of-fold predictions
    folds = json.loads((run / "folds.json").read_text())
    y = np.asarray([folds["classes"].index(it["label"]) for it in folds["items"]])
    want = oof_thresholds(np.load(run / "stage1" / "oof_probs.npy"), y, 0.6, 5)
    got = rec["labeled"]["thresholds"]
    assert list(got) == folds["classes"]
    assert [None if t is None else round(t, 4) for t in got.values()] == \
        [round(float(t), 4) if np.isfinite(t) else None for t in want]
    assert any(t is None for t in got.values()) and any(t is not None for t in got.values())  # per class

    # what it accepted is exactly what that rule accepts on the ensemble's predictions
    dec = decode_many(files, int(json.loads((run / "ensemble.json").read_text())["img_size"]))
    probs = ensemble_predict(run, dec.images, tta=True)
    conf, pred = probs.max(1), probs.argmax(1)
    sha = [hashlib.sha256(f.read_bytes()).hexdigest() for f in files]
    expect = {sha[i] for i in range(len(files)) if conf[i] >= want[pred[i]]}
    by_global = {sha[i] for i in range(len(files)) if conf[i] >= 0.3}
    with Inbox(registry) as db:
        accepted = db.accepted()
    assert {a.sha256 for a in accepted} == expect and len(expect) >= 1
    assert expect != by_global  # the global threshold would have labeled other images
    for a in accepted:
        t = got[a.label]
        assert t is not None and a.confidence >= t - 1e-4 and a.source == "threshold"


def test_refresh_under_the_quick_presets_distillation_keeps_every_image_as_a_soft_target(registry, tmp_path):
    """The quick preset's default is ensemble distillation (rule ``all``, ``pseudo.soft``,
    ``pseudo.weight: one``): ``ssl refresh`` then accepts every decodable inbox image, stores the
    ensemble's probabilities with it, and its retrain learns them as soft targets of weight one -
    the same conversion stage 3 of ``ssl train`` uses."""
    import yaml

    from semivit.config import PRESETS
    from semivit.data.dataset import decode_many
    from semivit.refresh.build import candidate_config, inbox_extra
    from semivit.trainer.infer import ensemble_predict

    run = registry / "v0001" / "run"
    doc = yaml.safe_load((run / "config.yaml").read_text())
    # the quick preset's selection rule (not its stage-3 epochs: the tiny run keeps its own)
    doc["config"]["pseudo"].update({k: v for k, v in PRESETS["quick"]["pseudo"].items() if k != "train"})
    (run / "config.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    inbox = tmp_path / "INBOX"
    files = write_inbox(inbox, 3, seed=23)  # 9 images: below UMAP + KMeans's minimum, rule only
    (inbox / "broken.png").write_bytes(b"not an image")

    rec = refresh_once(registry, inbox, min_new=10 ** 6)
    lab = rec["labeled"]
    assert rec["decision"] == "waiting" and (lab["accepted"], lab["unconfident"], lab["undecodable"]) == (9, 0, 1), lab
    with Inbox(registry) as db:
        accepted = db.accepted()
    assert len(accepted) == 9  # every decodable image, whatever its confidence; the broken file is not
    dec = decode_many(files, int(json.loads((run / "ensemble.json").read_text())["img_size"]))
    probs = ensemble_predict(run, dec.images, tta=True)
    by_sha = {hashlib.sha256(f.read_bytes()).hexdigest(): probs[i] for i, f in enumerate(files)}
    for a in accepted:
        assert np.allclose(a.probs, by_sha[a.sha256], atol=1e-5)
        assert a.label == folds_classes(run)[int(np.argmax(by_sha[a.sha256]))]

    cfg = candidate_config(run, [])
    extra, used = inbox_extra(accepted, folds_classes(run), cfg)
    assert extra.labels.shape == (9, len(folds_classes(run)))  # soft targets, not class indices
    assert np.allclose(extra.labels.sum(1), 1, atol=1e-4) and np.all(extra.weights == 1)


def folds_classes(run: Path) -> list[str]:
    return json.loads((run / "folds.json").read_text())["classes"]


def test_refresh_killed_at_every_step_leaves_a_serving_registry_and_the_next_one_finishes(registry, tmp_path):
    """SIGKILL at each step in turn.  Each following refresh first gets past the step where the
    previous one died (finishing, resuming or redoing its work) before it is killed at a later
    step; after every kill `current` predicts and the integrity check passes; the last refresh
    completes.  The build killed after its first fold is resumed, not retrained."""
    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 3, seed=21)
    files = snapshot(inbox)
    seen_staging = []
    for step in ("ingest", "train", "exporting", "switched"):
        r = ssl_refresh(registry, inbox, kill=step)
        assert r.returncode == -signal.SIGKILL, (step, r.returncode, r.stdout[-2000:], r.stderr[-3000:])
        assert_consistent(registry, f"after SIGKILL at {step}")
        staging = sorted(p.name for p in (registry / reg.STAGING).glob("*")) if (registry / reg.STAGING).is_dir() else []
        assert len(staging) <= 1 and not set(staging) & set(seen_staging), (step, staging)  # old ones cleaned
        seen_staging += staging
        with Inbox(registry) as db:
            c = db.counts()
        if step == "ingest":
            assert c["new"] == 9 and reg.versions(registry) == ["v0001"]
        elif step in ("train", "exporting"):
            assert c["pseudo_labeled"] == 9 and reg.versions(registry) == ["v0001"]  # nothing half-built visible
            fold0 = registry / reg.STAGING / staging[0] / "run" / "stage3" / "fold0" / "done.json"
            if step == "train":
                fold0_done = fold0.read_text()
            else:  # the build was resumed: the finished fold was not trained again
                assert fold0.read_text() == fold0_done
        elif step == "switched":  # published, and killed in the middle of its promotion
            assert reg.current_version(registry) == "v0002" and reg.versions(registry) == ["v0001", "v0002"]
            assert reg.read_manifest(registry / "v0002")["status"] == "candidate"  # complete, undecided
    r = ssl_refresh(registry, inbox)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert reg.read_manifest(registry / "v0002")["status"] == "promoted"
    assert (registry / "v0002" / "run" / "stage3" / "fold0" / "done.json").read_text() == fold0_done
    assert reg.promotion_stack(registry) == ["v0001", "v0002"]
    with Inbox(registry) as db:
        assert db.counts()["used"] == 9 and db.pending() == 0
    hist = history.read(registry)
    assert [h["decision"] for h in hist if h.get("version") == "v0002"] == ["promoted"]  # recorded once
    assert_consistent(registry, "after the completing refresh")

    # one real external SIGKILL at a random moment of a refresh that has work to do
    write_inbox(inbox, 2, seed=22, prefix="more")
    files = snapshot(inbox)
    seed = int(os.environ.get("SEMIVIT_TEST_SEED", random.randrange(10**6)))
    delay = random.Random(seed).uniform(0.5, 20.0)
    p = ssl_refresh(registry, inbox, None, False)
    try:
        p.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
    out = p.communicate()[0]
    why = f"external SIGKILL after {delay:.1f}s (SEMIVIT_TEST_SEED={seed}, rc {p.returncode}): {out[-1500:]}"
    assert_consistent(registry, why)
    r = ssl_refresh(registry, inbox)
    assert r.returncode == 0, (why, r.stdout[-2000:], r.stderr[-3000:])
    assert_consistent(registry, why)
    with Inbox(registry) as db:
        assert db.counts()["used"] == 15 and db.pending() == 0, why
    assert reg.versions(registry)[-1] == "v0003" and reg.current_version(registry) == "v0003", why
    assert not (registry / reg.STAGING).is_dir() or not list((registry / reg.STAGING).iterdir())
    assert snapshot(inbox) == files  # no kill ever touched an inbox file


def _processes_of(registry: Path) -> list[int]:
    """Pids of live processes whose command line names ``registry`` (a refresh and its forked fold
    workers, which share its command line)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (d / "stat").read_text().split(")")[-1].split()[0]
        except OSError:
            continue
        if str(registry) in cmd and "refresh" in cmd and state != "Z":
            pids.append(int(d.name))
    return pids


def test_refresh_with_fold_workers_killed_while_folds_train_leaves_no_worker_and_resumes(registry, tmp_path):
    """The refresh's stage 3 with two fold workers (each fold a forked process): SIGKILL the refresh
    as fold 1 starts beside fold 0 - its workers die with it (none left training into the staged
    run), `current` still serves, and the next refresh builds and promotes the candidate."""
    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 3, seed=24)
    workers = ("--set", "train.fold_workers=2")
    r = ssl_refresh(registry, inbox, "train", True, *workers)
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "2 at a time" in r.stdout + r.stderr  # the folds were training side by side
    deadline = time.time() + 10
    while _processes_of(registry) and time.time() < deadline:
        time.sleep(0.1)
    assert not _processes_of(registry)
    assert_consistent(registry, "after SIGKILL with fold workers")
    assert reg.versions(registry) == ["v0001"]
    r = ssl_refresh(registry, inbox, None, True, *workers)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert reg.current_version(registry) == "v0002"
    done = [json.loads((registry / "v0002" / "run" / "stage3" / f"fold{k}" / "done.json").read_text()) for k in range(2)]
    assert all(d["fold_worker"] for d in done)
    assert_consistent(registry, "after the resumed refresh")


def test_second_refresh_while_one_holds_the_lock_exits_3_and_changes_nothing(registry, tmp_path):
    """A real refresh holds the lock (it is retraining); a second one exits 3 with the holder's pid
    and changes nothing.  Then SIGTERM stops the first cleanly at its next step boundary."""
    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 2, seed=31)
    holder = ssl_refresh(registry, inbox, None, False)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:  # wait until it holds the lock and is building a candidate
            lock = registry / "refresh.lock"
            if lock.is_file() and lock.read_text().strip() and any((registry / reg.STAGING).glob("v*")):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the first refresh never took the lock")
        db = db_dump(registry)
        state = tree_state(registry)
        staging = sorted(p.name for p in (registry / reg.STAGING).iterdir())
        r = cli("refresh", "--registry", str(registry), "--inbox", str(inbox), "--min-new", "1")
        assert r.exit_code == EXIT_LOCKED, r.output
        assert "another refresh is running" in r.output and f"pid {holder.pid}" in r.output
        assert len(r.output.strip().splitlines()) == 1
        with pytest.raises(RegistryBusy):
            register_run(registry, registry / "v0001" / "run")
        # nothing changed: files (lock files aside), the inbox database, the first one's build
        assert db_dump(registry) == db
        assert {k: v for k, v in tree_state(registry).items() if not k.startswith((reg.STAGING, "inbox.sqlite"))} == \
               {k: v for k, v in state.items() if not k.startswith((reg.STAGING, "inbox.sqlite"))}
        assert sorted(p.name for p in (registry / reg.STAGING).iterdir()) == staging
        holder.send_signal(signal.SIGTERM)
        out = holder.communicate(timeout=120)[0]
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert holder.returncode == 130 and "stopped by SIGTERM" in out, out[-3000:]
    assert reg.versions(registry) == ["v0001"]
    kept = list((registry / reg.STAGING).iterdir())  # the prepared build is kept for the next refresh
    assert len(kept) == 1 and (kept[0] / "inputs.json").is_file()
    assert history.read(registry)[-1]["decision"] == "stopped"
    assert (registry / "refresh.lock").read_text() == ""  # released cleanly
    assert_consistent(registry, "after stopping the lock holder")


def test_a_stop_signal_a_library_re_raises_as_its_own_error_is_still_a_clean_stop(registry, tmp_path, monkeypatch):
    """SIGTERM lands while a library runs (in CI: pydantic-core building a validator, which wrapped
    the handler's StopRequested in a SchemaError): the refresh still stops as a stop - exit 130,
    history "stopped", the prepared build kept for the next refresh, the lock released - not as a
    failure that deletes the build and exits 1."""
    import semivit.trainer.pipeline as pipeline

    def library_that_wraps_exceptions(run, stages, **kw):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises StopRequested here
            time.sleep(5)
        except BaseException as e:  # what pydantic-core does with an exception from Python code
            raise ValueError(f"Error building validator: {e!r}") from None
        raise AssertionError("the SIGTERM handler never ran")

    monkeypatch.setattr(pipeline, "run_stages", library_that_wraps_exceptions)  # build imports it per call
    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 2, seed=37)
    before = signal.getsignal(signal.SIGTERM)
    assert refresh_cli(registry, inbox, min_new=1, overrides=FAST_TRAIN) == 130
    assert signal.getsignal(signal.SIGTERM) == before  # the handler was restored
    assert history.read(registry)[-1]["decision"] == "stopped"
    kept = list((registry / reg.STAGING).iterdir())
    assert len(kept) == 1 and (kept[0] / "inputs.json").is_file()
    assert (registry / "refresh.lock").read_text() == ""
    assert reg.versions(registry) == ["v0001"]
    assert_consistent(registry, "after a wrapped stop")


def test_low_disk_space_refuses_before_changing_anything(registry, tmp_path, monkeypatch):
    inbox = tmp_path / "INBOX"
    write_inbox(inbox, 2, seed=41)
    settings = (registry / "registry.yaml").read_text()
    (registry / "registry.yaml").write_text(settings.replace("min_free_mb: 512.0", "min_free_mb: 1.0e+12"))
    db = db_dump(registry)
    state = tree_state(registry)
    r = cli("refresh", "--registry", str(registry), "--inbox", str(inbox), "--min-new", "1")
    assert r.exit_code == EXIT_LOW_DISK and "not enough free disk space" in r.output, r.output
    assert tree_state(registry) == state and db_dump(registry) == db

    # enough for the refresh to start, not for the retrain: ingest + labels are kept, nothing is built
    (registry / "registry.yaml").write_text(settings)
    import semivit.refresh.lock as lockmod

    real = lockmod.shutil.disk_usage
    monkeypatch.setattr(lockmod.shutil, "disk_usage",
                        lambda p: real(p)._replace(free=512 * 2**20 + 1024))  # reserve + 1 KiB
    with pytest.raises(UserError, match="not enough free disk space for retraining"):
        refresh_once(registry, inbox, min_new=1, overrides=FAST_TRAIN)
    assert reg.versions(registry) == ["v0001"] and reg.current_version(registry) == "v0001"
    assert not (registry / reg.STAGING).is_dir() or not list((registry / reg.STAGING).iterdir())
    with Inbox(registry) as db:
        assert db.pending() == 6  # labeled and waiting: the next refresh with space retrains
    assert history.read(registry)[-1]["action"] == "failed"


def test_every_loop_runs_repeatedly_and_stops_cleanly_on_sigterm(registry, tmp_path):
    inbox = tmp_path / "INBOX"
    inbox.mkdir()
    p = ssl_refresh(registry, inbox, None, False, "--every", "1s")
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len([h for h in history.read(registry) if h["action"] == "refresh"]) < 2:
            time.sleep(0.2)
        assert len([h for h in history.read(registry) if h["action"] == "refresh"]) >= 2
        p.send_signal(signal.SIGTERM)
        out = p.communicate(timeout=30)[0]
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0 and "stopped by SIGTERM" in out, out
    assert_consistent(registry, "after SIGTERM")


def test_bad_inputs_are_one_line_errors(registry, tmp_path):
    inbox = tmp_path / "INBOX"
    inbox.mkdir()
    for args, msg in ((["--inbox", str(tmp_path / "nope")], "inbox directory not found"),
                      (["--inbox", str(inbox), "--set", "model.img_size=64"], "keeps the current version's model"),
                      (["--inbox", str(inbox), "--set", "pseudo.propagate_labels=fold"], "label spreading is part of stage 2"),
                      (["--inbox", str(inbox), "--every", "soon"], "not a duration")):
        r = cli("refresh", "--registry", str(registry), *args)
        assert r.exit_code == 2 and msg in r.output and len(r.output.strip().splitlines()) == 1, r.output
    r = cli("models", "list", "--registry", str(tmp_path / "empty"))
    assert r.exit_code == 2 and "registry not found" in r.output


def test_integrity_check_finds_broken_versions_and_promote_refuses_them(registry, tiny_run, fast_export):
    assert reg.check_registry(registry) == []
    # a second registration stays a candidate beside current (ssl train --registry on a live registry)
    assert register_run(registry, tiny_run) == "v0002"
    assert reg.current_version(registry) == "v0001"
    man = reg.read_manifest(registry / "v0002")
    assert man["status"] == "candidate" and "ssl models promote v0002" in man["decision"]["reason"]
    assert reg.check_registry(registry, all_versions=True) == []
    (registry / "v0002" / "export" / "model.onnx").write_bytes(b"not a graph")
    assert any("v0002" in p and "does not load" in p for p in reg.check_registry(registry, all_versions=True))
    r = cli("models", "promote", "v0002", "--registry", str(registry))
    assert r.exit_code == 2 and "refusing to promote v0002" in r.output and reg.current_version(registry) == "v0001"
    (registry / "v0002" / "export" / "meta.json").unlink()
    assert any("export/meta.json missing" in p for p in reg.check_registry(registry))
    reg._switch_link(registry, "v0009")
    assert any("v0009, which does not exist" in p for p in reg.check_registry(registry))
    reg._switch_link(registry, "v0001")
    assert reg.check_registry(registry) == [p for p in reg.check_registry(registry) if "v0002" in p]


def test_a_refresh_keeps_the_pool_graph_of_the_stage_1_it_keeps(registry, tmp_path, fast_export, tiny_data_shared):
    """``ensemble.graph: pool``: the candidate's stage 1 is the parent's, so is its graph (same
    bytes), and the candidate's export ends in it; the inbox is labeled through it."""
    from semivit.trainer.infer import ensemble_predict

    run = registry / "v0001" / "run"
    res = invoke("train", tiny_data_shared, "--preset", "tiny", "--out", run, "--stages", "graph",
                 "--set", "ensemble.graph=pool")
    assert res.exit_code == 0, res.output
    inbox = tmp_path / "INBOX"
    files = write_inbox(inbox, 6, seed=5)
    rec = refresh_once(registry, inbox, min_new=5, tolerance=1.0, overrides=["train.epochs=1"])
    assert rec["version"] == "v0002", rec
    new = registry / "v0002"
    assert (new / "run" / "graph.npz").read_bytes() == (run / "graph.npz").read_bytes()
    meta = json.loads((new / "export" / "meta.json").read_text())
    assert "full" in meta["graph"]["levels"] and meta["graph"]["members"] == ["stage1/fold0", "stage1/fold1"]
    from semivit.data.dataset import decode_many

    with Inbox(registry) as db:
        accepted = {a.sha256: a for a in db.accepted()}
    images = decode_many(files, 32).images
    with_graph, without = ensemble_predict(run, images), ensemble_predict(run, images, graph=False)
    assert np.abs(with_graph - without).max() > 1e-3  # (the graph changes the probabilities here)
    compared = 0
    for f, p in zip(files, with_graph):
        a = accepted.get(hashlib.sha256(f.read_bytes()).hexdigest())
        if a is not None:
            assert np.allclose(a.probs, p, atol=1e-5)
            compared += 1
    assert compared > 0
