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


# --- issue 26: "N of M pairs" in input order, hostile ids, matches outside the target -------------------------

HOSTILE = "x<!--<script>window.pwned=1</script>\"'&amp;\u2028\u2029"


def test_hostile_ids_stay_data_and_cannot_end_or_reopen_the_script(viewer_pairs: list[dict]) -> None:
    pairs = [dict(viewer_pairs[0], pair_id=HOSTILE, category="</script><img src=x onerror=alert(1)>")]
    page = render_viewer(pairs, title="__DATA__ <!--<script>")
    start = page.index('<script id="viewer-data" type="application/json">') + len('<script id="viewer-data" type="application/json">')
    data = page[start:page.index("</script>", start)]
    assert "<" not in data and ">" not in data and "&" not in data and "\u2028" not in data and "\u2029" not in data
    parsed = json.loads(data)
    assert parsed["pairs"][0]["pair_id"] == HOSTILE and parsed["pairs"][0]["category"].startswith("</script>")
    assert page.count('<script id="viewer-data"') == 1  # a title holding __DATA__ is not filled with the data
    assert "<title>__DATA__ &lt;!--&lt;script&gt;</title>" in page


class _Dataset:
    def __init__(self, ids: list[str]) -> None:
        self.pair_ids = ids


def test_viewer_writer_keeps_the_first_pairs_of_the_input_in_input_order(tmp_path: Path, monkeypatch, capsys) -> None:
    """Issue 26: 25 pairs gave a page of 16 in processing order and a console line saying nothing of the other 9."""
    from types import SimpleNamespace

    import callbacks.viewer_writer as viewer_writer
    from callbacks import ViewerWriter

    ids = [f"pair{k:02d}" for k in range(25)]
    monkeypatch.setattr(viewer_writer, "viewer_pair", lambda pipeline, sample, points, **kw: {"pair_id": str(sample["pair_id"]),
                                                                                              "points": points})
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, log_dir=None, default_root_dir=str(tmp_path),
                              datamodule=SimpleNamespace(test_dataset=_Dataset(ids)))
    module = SimpleNamespace(pipeline=object())
    writer = ViewerWriter(num_pairs=16)
    writer.on_predict_start(trainer, module)
    processing = ids[::-1]  # the run goes image by image, not in the file's order
    for k in range(0, 25, 2):
        batch = [{"pair_id": i} for i in processing[k:k + 2]]
        writer.on_predict_batch_end(trainer, module, [None] * len(batch), batch, k)
    writer.on_predict_end(trainer, module)
    page = (tmp_path / "viewer.html").read_text()
    data = json.loads(re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', page, re.S).group(1))
    assert [p["pair_id"] for p in data["pairs"]] == ids[:16]
    assert data["total_pairs"] == 25 and data["more_hint"] == "--trainer.callbacks.init_args.num_pairs 25"
    out = capsys.readouterr().out
    assert "viewer (16 of 25 pairs" in out and "--trainer.callbacks.init_args.num_pairs 25" in out


def test_matches_outside_the_target_follow_one_rule_in_lines_pictures_and_page() -> None:
    """Issue 26: the page hid such matches, the pictures clamped them as ordinary dots, the lines said nothing."""
    import numpy as np
    from PIL import Image

    from lightning_modules.components.visualize import draw_matches, inside_image, point_colors
    from lightning_modules.point_transfer import match_line

    assert inside_image([[-0.5, 0], [99.5, 49.5], [99.6, 10], [10, -0.6], [float("nan"), 1]], (100, 50)).tolist() == \
        [True, True, False, False, False]
    src, trg = torch.full((3, 50, 100), 90, dtype=torch.uint8), torch.full((3, 50, 100), 90, dtype=torch.uint8)
    sample = {"pair_id": "p", "category": "c", "src_image_path": "a.png", "trg_image_path": "b.png",
              "src_image": src, "trg_image": trg, "src_kps": torch.tensor([[10.0, 10.0], [50.0, 25.0]])}
    output = {"pred_kps": torch.tensor([[120.0, 25.0], [40.0, 20.0]]), "distance": torch.zeros(2),
              "confidence": torch.ones(2), "mutual": torch.tensor([True, True])}
    line = match_line(sample, output)
    assert line["pred_kps"][0] == [120.0, 25.0] and line["inside"] == [False, True]  # kept as computed, flagged
    picture = np.asarray(draw_matches(src, trg, line["src_kps"], line["pred_kps"], line["mutual"], height=50))
    radius = max(2, round(50 / 64))
    x, y = 199, 25  # clamped to the target panel's right border (panel x 100..199)
    assert (picture[y, x - 1] == np.array(point_colors(2)[0])).all()
    assert (picture[y - radius, x - radius] == 0).all()  # a square: its outlined corner (a circle misses it)
    cx, cy = 100 + 40, 20  # the match on the target: a circle
    assert (picture[cy, cx] == np.array(point_colors(2)[1])).all() and not (picture[cy - radius, cx - radius] == 0).all()
    # the page: the same flags travel with the pair (and default to the same rule without them)
    entry_points = viewer_writer_points({"line": line})
    assert entry_points["inside"] == [False, True] and entry_points["pred"][0] == [120.0, 25.0]


def viewer_writer_points(record: dict) -> dict:
    from callbacks.viewer_writer import _run_points

    return _run_points(record)


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (CI installs it)")
def test_page_says_n_of_m_keeps_the_order_shows_hostile_ids_as_text_and_marks_outside_matches(
        viewer_pairs: list[dict], tmp_path: Path) -> None:
    pairs = [dict(p) for p in viewer_pairs]
    pairs[1]["pair_id"] = HOSTILE  # today: the page breaks, 0 of 3 pairs in its menu
    pairs[1]["category"] = "<b>cat</b> & </script>"
    pairs[0]["points"] = dict(pairs[0]["points"], pred=[[-40.0, 5.0]] + pairs[0]["points"]["pred"][1:])
    pairs[0]["points"]["inside"] = [False] + [True] * (len(pairs[0]["points"]["pred"]) - 1)
    page = tmp_path / "viewer.html"
    page.write_text(render_viewer(pairs, total_pairs=25, more_hint="--trainer.callbacks.init_args.num_pairs 25"),
                    encoding="utf-8")
    with Browser(CHROMIUM, width=1100, height=700) as browser:
        browser.goto(page.as_uri())
        browser.wait_for("window.viewerState && window.viewerState.ready")
        options = browser.evaluate("Array.from(document.getElementById('pair').options).map(o => o.textContent)")
        assert options == [p["pair_id"] for p in pairs]  # the given (input) order, the hostile id as text
        assert browser.evaluate("document.getElementById('count').textContent") == \
            "3 of 25 pairs (show more: --trainer.callbacks.init_args.num_pairs 25)"
        assert browser.evaluate("typeof window.pwned") == "undefined"
        assert browser.evaluate("document.querySelectorAll('script, img, b').length") == 2  # nothing injected
        markers = browser.evaluate("window.viewerState.runMarkers")
        assert markers[0]["inside"] is False and markers[0]["x"] == 0  # clamped to the border, drawn as a square
        assert all(m["inside"] for m in markers[1:])
        browser.evaluate("(() => { const s = document.getElementById('pair'); s.value = '1';"
                         " s.dispatchEvent(new Event('change')); })()")
        assert browser.evaluate("document.getElementById('info').textContent").startswith("<b>cat</b> & </script>")
