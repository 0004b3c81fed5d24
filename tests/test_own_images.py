"""docs/own-images.md's Python example runs as written, with the tiny random models in place of the real ones."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import lightning_modules.components as components
from lightning_modules.components import DinoFeaturizer, SDFeaturizer

from conftest import REPO


def _example() -> str:
    text = (REPO / "docs" / "own-images.md").read_text()
    return re.search(r"```python\n(.*?)```", text, re.S).group(1)


def test_the_documented_example_matches_two_image_files(tmp_path, monkeypatch, capsys) -> None:
    # the documented call loads the paper's models; here the same classes build the tiny random ones
    monkeypatch.setattr(components, "SDFeaturizer", lambda: SDFeaturizer(model_id=None, random_init={"seed": 0},
                                                                         image_size=192, crop_size=128))
    monkeypatch.setattr(components, "DinoFeaturizer", lambda: DinoFeaturizer(
        model_id=None, random_init={"seed": 0, "num_hidden_layers": 4}, layer=3, image_size=224))
    rng = np.random.default_rng(0)
    picture = rng.integers(0, 255, size=(90, 140, 3), dtype=np.uint8)
    Image.fromarray(picture).save(tmp_path / "cat.jpg")
    Image.fromarray(np.ascontiguousarray(picture[:, ::-1])).save(tmp_path / "other_cat.jpg")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_example(), "docs/own-images.md", "exec"), namespace)  # noqa: S102 - the documentation's code
    result = namespace["result"]
    assert result.points.shape == (2, 2) and result.distance.shape == (2,)
    assert (result.points[:, 0] <= 140 + 30).all()  # target pixels (a match may land in the padding)
    assert "tensor" in capsys.readouterr().out
    expected = namespace["pipeline"].match(torch.from_numpy(picture).permute(2, 0, 1),
                                           Image.open(tmp_path / "other_cat.jpg"), [[120.0, 80.0], [60.0, 40.0]],
                                           category="cat")
    cat = np.asarray(Image.open(tmp_path / "cat.jpg"))  # the JPEG differs from the array: compare file to file
    from_file = namespace["pipeline"].match(cat, "other_cat.jpg", [[120.0, 80.0], [60.0, 40.0]], category="cat")
    assert torch.equal(from_file.points, result.points) and expected.points.shape == result.points.shape
    with pytest.raises(FileNotFoundError, match="no_such.jpg"):
        namespace["pipeline"].match("no_such.jpg", "cat.jpg", [[1.0, 1.0]])
