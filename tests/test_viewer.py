"""The viewer page: reduced descriptors, the page's match computed in Python, and clicks in headless Chromium."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from browser import Browser, find_chromium
from datamodules.own_images import ImagePairsDataset, read_image_pairs, write_example_photos
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence, SDFeaturizer
from lightning_modules.components.features import pair_features
from lightning_modules.components.matching import nearest_neighbors
from lightning_modules.components.viewer import reduce_descriptors, render_viewer, viewer_match, viewer_pair

from conftest import tiny_overlay_args

CHROMIUM = find_chromium()


@pytest.fixture(scope="module")
def viewer_pairs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """The viewer entries of the example photos' three pairs (tiny random models of configs/overlays/tiny.yaml)."""
    pairs = write_example_photos(tmp_path_factory.mktemp("photos"))
    pipeline = FusedCorrespondence(SDFeaturizer(**tiny_overlay_args("sd")), DinoFeaturizer(**tiny_overlay_args("dino")), mutual_check=True)
    dataset = ImagePairsDataset(read_image_pairs(pairs=str(pairs)))
    entries = []
    for index in range(len(dataset)):
        sample = dataset[index]
        output = pipeline.predict_pairs([sample])[0]
        points = {"src": sample["src_kps"].tolist(), "pred": output["pred_kps"].tolist(),
                  "mutual": output["mutual"].tolist()}
        entry = viewer_pair(pipeline, sample, points, dims=16, image_side=128)
        full = pipeline.describe_pair(*pair_features(pipeline.batch_features([sample]), sample))
        entry["_full_nn"] = nearest_neighbors(full[0].flatten(1).T, full[1].flatten(1).T)[0].tolist()  # the method's
        entries.append(entry)
    return entries


def test_reduced_descriptors_are_unit_int8_vectors_in_the_top_directions() -> None:
    generator = torch.Generator().manual_seed(0)
    basis = torch.randn(3, 40, generator=generator)
    descriptors = (torch.randn(2, 8 * 8, 3, generator=generator) @ basis).transpose(1, 2).reshape(2, 40, 8, 8)
    reduced = reduce_descriptors(descriptors, dims=5)
    assert reduced.dtype == torch.int8 and reduced.shape == (2, 64, 5)
    norms = reduced.float().norm(dim=-1)
    assert ((norms - 127).abs() <= 2).all()
    # rank-3 descriptors: the reduction keeps their cosine similarities (up to the int8 rounding)
    flat = descriptors.flatten(2).transpose(1, 2)
    exact = torch.nn.functional.normalize(flat[0], dim=1) @ torch.nn.functional.normalize(flat[1], dim=1).T
    approx = reduced[0].float() @ reduced[1].float().T / 127**2
    assert (exact - approx).abs().max() < 0.03
    assert reduce_descriptors(descriptors, dims=64).shape == (2, 64, 40)  # at most D dimensions


def test_page_match_agrees_with_the_full_descriptors_mostly(viewer_pairs: list[dict]) -> None:
    agree = total = 0
    for pair in viewer_pairs:
        grid = pair["grid"]
        for cell in range(0, grid * grid, 7):
            x, y = _cell_centre(pair, cell)
            source_cell, target_cell, _ = viewer_match(pair, x, y)
            assert source_cell == cell
            agree += int(target_cell == pair["_full_nn"][cell])
            total += 1
    print(f"page match = full-descriptor nearest neighbour for {agree} of {total} source cells")
    assert total > 50 and agree / total > 0.5


def test_page_is_self_contained_and_its_data_cannot_end_the_script(viewer_pairs: list[dict]) -> None:
    pair = dict(viewer_pairs[0], pair_id="a</script><b>")
    page = render_viewer([pair], title="run <1>")
    data = re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(data)["pairs"][0]["pair_id"] == "a</script><b>"
    assert "<title>run &lt;1&gt;</title>" in page
    assert "http://" not in page and "https://" not in page and "src=" not in page.replace("image.src =", "")


def _cell_centre(pair: dict, cell: int) -> tuple[float, float]:
    """The source pixel at the centre of source ``cell``."""
    grid, source = pair["grid"], pair["source"]
    step = source["square"] / grid
    x = ((cell % grid) * step + step / 2 - 0.5 - source["offset"][0]) / source["scale"]
    y = ((cell // grid) * step + step / 2 - 0.5 - source["offset"][1]) / source["scale"]
    return x, y


def _cells_on_the_image(pair: dict, count: int = 4) -> list[int]:
    """``count`` source cells spread over the image (their centres inside it, not in the padding)."""
    inside = [c for c in range(pair["grid"] ** 2) if 0 <= _cell_centre(pair, c)[0] < pair["source"]["width"]
              and 0 <= _cell_centre(pair, c)[1] < pair["source"]["height"]]
    return [inside[round(i * (len(inside) - 1) / (count - 1))] for i in range(count)]


def _click_cell_centre(browser: Browser, pair: dict, cell: int) -> tuple[float, float]:
    """Click the centre of source ``cell`` on the page; returns the source pixel clicked."""
    x, y = _cell_centre(pair, cell)
    source = pair["source"]
    rect = browser.evaluate("(() => { const c = document.getElementById('source'); const r = c.getBoundingClientRect();"
                            " return [r.left + c.clientLeft, r.top + c.clientTop]; })()")
    factor = 360 / source["height"]
    browser.click(rect[0] + (x + 0.5) * factor, rect[1] + (y + 0.5) * factor)
    return x, y


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (CI installs it)")
def test_clicks_in_headless_chromium_land_where_python_predicts(viewer_pairs: list[dict], tmp_path: Path) -> None:
    page = tmp_path / "viewer.html"
    page.write_text(render_viewer(viewer_pairs), encoding="utf-8")
    with Browser(CHROMIUM, width=1100, height=700) as browser:
        browser.goto(page.as_uri())
        browser.wait_for("window.viewerState && window.viewerState.ready")
        assert browser.evaluate("document.getElementById('pair').options.length") == 3
        for index in (0, 2):
            browser.evaluate(f"(() => {{ const s = document.getElementById('pair'); s.value = '{index}';"
                             " s.dispatchEvent(new Event('change')); })()")
            pair = viewer_pairs[index]
            for cell in _cells_on_the_image(pair):
                x, y = _click_cell_centre(browser, pair, cell)
                state = browser.evaluate("window.viewerState")
                expected_source, expected_target, point = viewer_match(pair, x, y)
                assert state["pair"] == index
                assert state["sourceCell"] == expected_source == cell
                assert state["targetCell"] == expected_target
                factor = 360 / pair["target"]["height"]
                assert state["targetPoint"] == pytest.approx(list(point), abs=1e-9)
                width = max(1, round(pair["target"]["width"] * factor))  # a match in the padding: clamped marker
                marker = [min(max((point[0] + 0.5) * factor, 0), width - 1), min(max((point[1] + 0.5) * factor, 0), 359)]
                assert state["marker"] == pytest.approx(marker, abs=1e-6)
            # the marker is drawn: the target canvas holds the white cross at the marker
            pixel = browser.evaluate(
                "(() => { const m = window.viewerState.marker; const c = document.getElementById('target');"
                " const y = m[1] > 20 ? m[1] - 12 : m[1] + 12;"  # a pixel on the cross's vertical bar, inside the canvas
                " return Array.from(c.getContext('2d').getImageData(Math.floor(m[0]), Math.floor(y), 1, 1).data); })()"
            )
            assert pixel[:3] == [255, 255, 255]
        shot = Path(os.environ.get("SD_DINO_VIEWER_SCREENSHOT", tmp_path / "viewer.png"))
        browser.screenshot(shot)
        assert shot.stat().st_size > 10_000
