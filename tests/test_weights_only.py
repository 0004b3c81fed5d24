"""Every ``torch.load`` of the repository, developer scripts and benchmarks included, is weights-only: a
checkpoint or weights file can never run code when it is read (``weights_only=True``, written out)."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

#: Folders that are not the repository's own code (environments, caches, outputs).
SKIPPED = {"__pycache__", "build", "outputs", "lightning_logs", "wandb", "node_modules"}


def python_files(root: Path) -> list[Path]:
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts[:-1]
        if any(p.startswith(".") or p in SKIPPED or p.endswith(".egg-info") for p in parts):
            continue
        files.append(path)
    return files


def unsafe_loads(source: str) -> list[int]:
    """Lines of ``torch.load(...)`` (also ``torch.serialization.load`` and ``from torch import load``) calls
    without a literal ``weights_only=True``."""
    tree = ast.parse(source)
    aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and node.module in ("torch", "torch.serialization") for a in node.names if a.name == "load"}
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = ast.unparse(func)
        if name not in ("torch.load", "torch.serialization.load") and not (isinstance(func, ast.Name) and func.id in aliases):
            continue
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                   for k in node.keywords)
        if not safe:
            lines.append(node.lineno)
    return lines


def test_the_checker_finds_unsafe_loads() -> None:
    assert unsafe_loads("import torch\ntorch.load('a')\ntorch.load('b', weights_only=False)\n"
                        "torch.load('c', weights_only=True)\n") == [2, 3]
    assert unsafe_loads("from torch import load as l\nl('a')\n") == [2]
    assert unsafe_loads("import torch\ntorch.serialization.load('a', **kw)\n") == [2]


def test_every_torch_load_in_the_repository_is_weights_only() -> None:
    files = python_files(REPO)
    assert any(p.name == "record_outputs.py" for p in files) and not any(".venv" in p.parts for p in files)
    found = {str(p.relative_to(REPO)): lines for p in files if (lines := unsafe_loads(p.read_text(encoding="utf-8")))}
    assert found == {}, f"torch.load without weights_only=True: {found}"


class _NotATensor:
    """An object ``torch.load(weights_only=True)`` refuses to unpickle (it would run code)."""


def test_a_weights_file_holding_more_than_tensors_is_refused_naming_the_file(tmp_path: Path) -> None:
    """The DINO / iBOT checkpoint, Table 3's layer projection and the head checkpoint (the captioner's weights:
    tests/test_captioner.py): torch's refusal (an ``UnpicklingError`` whose advice is ``weights_only=False``)
    becomes the project's error naming the file (components/hub.load_weights_file, their one reader)."""
    import pytest
    import torch

    from lightning_modules.components import DinoFeaturizer
    from lightning_modules.components.descriptors import _projection_weights

    evil = tmp_path / "evil.pth"
    torch.save({"2.weight": torch.zeros(2, 2), "meta": _NotATensor()}, evil)
    from lightning_modules.components.projection_head import _read_checkpoint

    refused = "safely: it holds more than tensors \\(torch.load with weights_only=True: .*convert it once"
    with pytest.raises(ValueError, match=rf"(?s)could not read the projection state dict {evil} {refused}"):
        _projection_weights(str(evil))
    with pytest.raises(ValueError, match=rf"(?s)could not read the head checkpoint {evil} {refused}"):
        _read_checkpoint(str(evil))
    arch = DinoFeaturizer(model_id=None, random_init={"seed": 0, "model_type": "vit"}, layer=3, image_size=224)
    arch.save_pretrained(str(tmp_path / "arch"))
    with pytest.raises(ValueError, match=rf"(?s)could not read the ViT checkpoint {evil} {refused}"):
        DinoFeaturizer(model_id=str(tmp_path / "arch"), layer=3, image_size=224, checkpoint=str(evil))
