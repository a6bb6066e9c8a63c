"""The package's floors hold: every import of every module under semivit/ (module level and
function level alike, read with ``ast``, nothing is imported) is checked against the rules.

    data                       imports no stage (models, pseudo, trainer, export, serve, refresh, ...)
    models                     imports none of trainer, export, serve, refresh (it is below them all)
    pseudo                     imports none of trainer, export, serve, refresh (stage 2 and refresh share it)
    serve, export              import no trainer
    refresh                    is imported by nobody but the CLI
    cli                        is imported by nobody (it parses and delegates)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "semivit"

STAGES = {"models", "pseudo", "trainer", "export", "serve", "refresh", "evaluate", "cli"}
# importer component -> components it must not import
FORBIDDEN = {
    "data": STAGES,
    "models": {"pseudo", "trainer", "export", "serve", "refresh", "evaluate", "cli"},
    "pseudo": {"trainer", "export", "serve", "refresh", "evaluate", "cli"},
    "serve": {"trainer"},
    "export": {"trainer"},
}
# component -> the only other components allowed to import it
ONLY_IMPORTED_BY = {"refresh": {"cli"}, "cli": set()}


def component(module: str) -> str:
    """'semivit.trainer.folds' -> 'trainer'; 'semivit.cli' -> 'cli'; 'semivit' -> ''."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in ``path`` that names the package."""
    pkg = root.name
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module_name(path, root).split(".")
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, minus (level - 1) parents
                base = here if is_pkg else here[:-1]
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from semivit import trainer` imports the submodule semivit.trainer
            names = [f"{mod}.{a.name}" for a in node.names] if mod == pkg else [mod]
            out += [(node.lineno, m) for m in names]
    return [(line, m) for line, m in out if m == pkg or m.startswith(pkg + ".")]


def forbidden_edges(root: Path) -> list[str]:
    """Every import under the package directory ``root`` that breaks a rule, one line each."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        src = component(module_name(path, root))
        for line, target in imports_of(path, root):
            dst = component(target)
            if not dst or dst == src:
                continue
            why = None
            if dst in FORBIDDEN.get(src, ()):
                why = f"{src} must not import {dst}"
            elif dst in ONLY_IMPORTED_BY and src not in ONLY_IMPORTED_BY[dst]:
                allowed = ONLY_IMPORTED_BY[dst]
                why = f"only {', '.join(sorted(allowed))} may import {dst}" if allowed else f"nothing may import {dst}"
            if why:
                problems.append(f"{path.relative_to(root.parent)}:{line} imports {target} ({why})")
    return problems


def test_the_package_keeps_its_layers():
    problems = forbidden_edges(PACKAGE)
    assert not problems, "forbidden imports:\n" + "\n".join(problems)


def test_every_module_is_checked():
    # the walk sees the real package: its stages and their lazy (function-level) imports
    mods = {module_name(p, PACKAGE) for p in PACKAGE.rglob("*.py")}
    assert {"semivit.cli", "semivit.models.ensemble", "semivit.serve.torch_eager",
            "semivit.trainer.pipeline", "semivit.refresh.build"} <= mods
    lazy = imports_of(PACKAGE / "serve" / "torch_eager.py", PACKAGE)
    assert any(m == "semivit.models.ensemble" for _, m in lazy)  # imported inside __init__


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "semivit"
    for rel, text in {"__init__.py": "", **files}.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        for parent in p.parents:
            if parent == root.parent:
                break
            (parent / "__init__.py").touch()
        p.write_text(text)
    return root


def test_a_clean_synthetic_tree_passes(tmp_path):
    root = _tree(tmp_path, {
        "models/ensemble.py": "from semivit.data.dataset import Preprocess\n",
        "serve/torch_eager.py": "def f():\n    from semivit.models.ensemble import EnsembleModel\n",
        "trainer/pipeline.py": "from . import folds\nfrom semivit.models import ensemble\n",
        "cli.py": "def train():\n    from semivit.refresh.build import register_run\n",
        "refresh/build.py": "from semivit.trainer.folds import run_stage\nfrom .registry import publish\n",
    })
    assert forbidden_edges(root) == []


@pytest.mark.parametrize("rel, text, rule", [
    ("serve/torch_eager.py", "def load():\n    from semivit.trainer.ensemble import EnsembleModel\n",
     "serve must not import trainer"),
    ("export/exporter.py", "import semivit.trainer.models\n", "export must not import trainer"),
    ("trainer/pipeline.py", "def f():\n    from semivit.refresh.registry import register_run\n",
     "only cli may import refresh"),
    ("trainer/evaluate.py", "from ..refresh import registry\n", "only cli may import refresh"),
    ("data/folds.py", "from semivit.trainer.run import Run\n", "data must not import trainer"),
    ("models/ensemble.py", "from semivit import serve\n", "models must not import serve"),
    ("pseudo/select.py", "from semivit.trainer.folds import Extra\n", "pseudo must not import trainer"),
    ("serve/predict.py", "from semivit.cli import app\n", "nothing may import cli"),
])
def test_a_forbidden_edge_fails_the_check(tmp_path, rel, text, rule):
    root = _tree(tmp_path, {rel: text})
    problems = forbidden_edges(root)
    assert len(problems) == 1 and rule in problems[0] and problems[0].startswith(f"semivit/{rel}:")
