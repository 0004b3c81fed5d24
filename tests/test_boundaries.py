"""The layering holds: the plain-torch core imports without Lightning, and no product code imports the tests."""

from __future__ import annotations

import ast
import subprocess
import sys

from conftest import REPO

#: The product's Python folders and top-level scripts (everything but tests/).
PRODUCT = ["lightning_modules", "datamodules", "callbacks", "scripts", "benchmarks"]


def test_every_core_module_imports_with_lightning_and_torchmetrics_blocked() -> None:
    """Each module of ``lightning_modules/components`` (featurizers, co-PCA and fusion, matching, PCK, the
    prediction path, the ablation's core, the projection head) imports in a fresh interpreter in which importing
    ``lightning`` or ``torchmetrics`` raises."""
    modules = sorted(p.stem for p in (REPO / "lightning_modules" / "components").glob("*.py") if p.stem != "__init__")
    code = (
        "import importlib, sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('lightning', 'pytorch_lightning', 'torchmetrics'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module('lightning_modules.components.' + name)\n"
        "print('ok', len(sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.startswith("ok"), done.stderr[-2000:]
    assert {"ablation", "pck", "prediction", "pipeline", "fusion"} <= set(modules)


def test_no_product_code_imports_the_tests() -> None:
    offenders = []
    files = [p for folder in PRODUCT for p in (REPO / folder).rglob("*.py")] + list(REPO.glob("*.py"))
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(REPO)}: {n}" for n in names if n.split(".")[0] in ("tests", "conftest")]
    assert not offenders, offenders
