"""Correspondence pictures: the drawing function, the callback's selection rules, and PNGs from a real run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate
from callbacks import CorrespondenceVisualizer, PairProgressBar
from callbacks.visualization import safe_filename
from datamodules import SPairDataset, write_synthetic_spair
from datamodules.protocols import get_protocol
from lightning_modules.components.visualize import (
    CORRECT_COLOR,
    GT_COLOR,
    WRONG_COLOR,
    draw_correspondences,
    keypoints_correct,
    scale_keypoints,
)

from conftest import CONFIGS

# A DINO-only model small enough that a whole evaluate.py run takes seconds (numbers are meaningless).
FAST_MODEL = CONFIGS / "overlays" / "smoke_dino.yaml"  # one random DINO block: runs in seconds

GRAY = (128, 128, 128)


def _gray(width: int, height: int) -> torch.Tensor:
    return torch.full((3, height, width), 128, dtype=torch.uint8)


def _pixel(image: Image.Image, xy) -> tuple[int, int, int]:
    return image.getpixel((int(round(float(xy[0]))), int(round(float(xy[1])))))


# Source 100 x 50 and target 60 x 120, drawn at height 100: panels 200 and 50 px wide.
SRC_KPS = [[10.0, 10.0], [50.0, 25.0], [90.0, 40.0]]
TRG_KPS = [[10.0, 20.0], [30.0, 60.0], [50.0, 100.0]]
PRED_KPS = [[10.0, 20.0], [50.0, 10.0], [30.0, 100.0]]
CORRECT = [True, False, False]


def _draw(**kwargs) -> Image.Image:
    args = dict(src_image=_gray(100, 50), trg_image=_gray(60, 120), src_kps=SRC_KPS, trg_kps=TRG_KPS,
                pred_kps=PRED_KPS, correct=CORRECT, height=100, radius=4)
    args.update(kwargs)
    return draw_correspondences(**args)


def test_picture_size_colours_and_marker_positions() -> None:
    image = _draw()
    assert image.mode == "RGB" and image.size == (200 + 50, 100)
    src_xy = scale_keypoints(SRC_KPS, (100, 50), (200, 100))
    pred_xy = scale_keypoints(PRED_KPS, (60, 120), (50, 100)) + [200, 0]
    trg_xy = scale_keypoints(TRG_KPS, (60, 120), (50, 100)) + [200, 0]
    assert np.allclose(src_xy[1], [(50 + 0.5) * 2 - 0.5, (25 + 0.5) * 2 - 0.5])  # pixel-centre aligned scaling
    for i, ok in enumerate(CORRECT):
        colour = CORRECT_COLOR if ok else WRONG_COLOR
        assert _pixel(image, pred_xy[i]) == colour, i
        assert _pixel(image, src_xy[i]) == colour, i  # the source marker tells the outcome too
    # the ground truth of keypoint 1 is a hollow ring: its centre keeps the image, its outline is GT_COLOR
    assert _pixel(image, trg_xy[1]) == GRAY
    ring = [_pixel(image, trg_xy[1] - [0, r]) for r in (5, 6)]
    assert GT_COLOR in ring
    # the line from the wrong prediction 2 to its ground truth runs through their midpoint
    assert _pixel(image, (pred_xy[2] + trg_xy[2]) / 2) == WRONG_COLOR
    # nothing is drawn far from every keypoint
    assert _pixel(image, (150, 90)) == GRAY


def test_image_types_agree_and_any_height_works() -> None:
    reference = np.asarray(_draw())
    hwc = _gray(100, 50).permute(1, 2, 0).numpy()
    assert np.array_equal(np.asarray(_draw(src_image=hwc)), reference)
    assert np.array_equal(np.asarray(_draw(src_image=Image.fromarray(hwc))), reference)
    assert np.array_equal(np.asarray(_draw(src_image=_gray(100, 50).numpy())), reference)
    assert draw_correspondences(_gray(100, 50), _gray(60, 120), SRC_KPS, TRG_KPS, PRED_KPS, None, height=256).size \
        == (512 + 128, 256)


def test_invalid_keypoints_are_skipped_and_padding_matches_stay_visible() -> None:
    nan = float("nan")
    with_invalid = _draw(src_kps=SRC_KPS + [[nan, 3.0], [5.0, 5.0]], trg_kps=TRG_KPS + [[5.0, 5.0], [-1.0, -1.0]],
                         pred_kps=PRED_KPS + [[5.0, 5.0], [5.0, 5.0]], correct=CORRECT + [True, True])
    assert np.array_equal(np.asarray(with_invalid), np.asarray(_draw()))
    # a match in the zero padding left of the target image is drawn at the panel's left border
    image = _draw(pred_kps=[[-20.0, 60.0], *PRED_KPS[1:]], correct=[False, False, False])
    assert _pixel(image, (200 + 1, scale_keypoints([[0.0, 60.0]], (60, 120), (50, 100))[0, 1])) == WRONG_COLOR


def test_correct_predictions_win_when_matches_coincide() -> None:
    image = _draw(pred_kps=[[30.0, 60.0], [30.0, 60.0], PRED_KPS[2]], correct=[True, False, False])
    xy = scale_keypoints([[30.0, 60.0]], (60, 120), (50, 100))[0] + [200, 0]
    assert _pixel(image, xy) == CORRECT_COLOR


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"pred_kps": PRED_KPS[:2]}, ValueError),
        ({"trg_kps": [[1.0, 2.0, 3.0]] * 3}, ValueError),
        ({"correct": [True]}, ValueError),
        ({"height": 0}, ValueError),
        ({"radius": 0}, ValueError),
        ({"src_image": torch.zeros(3, 50, 100)}, TypeError),  # float: 0-1 or 0-255? refused
        ({"src_image": torch.zeros(4, 50, 100, dtype=torch.uint8)}, ValueError),
        ({"src_image": torch.zeros(50, 100, dtype=torch.uint8)}, ValueError),
        ({"trg_image": "image.jpg"}, TypeError),
    ],
)
def test_bad_inputs_raise(kwargs, error) -> None:
    with pytest.raises(error):
        _draw(**kwargs)


def test_correctness_follows_the_protocol_comparison() -> None:
    pred, gt = [[10.0, 0.0], [0.0, 0.0], [float("nan"), 0.0]], [[0.0, 0.0]] * 3
    assert keypoints_correct(pred, gt, threshold=100, alpha=0.1).tolist() == [False, True, False]  # strict <
    assert keypoints_correct(pred, gt, threshold=100, alpha=0.1, inclusive=True).tolist() == [True, True, False]


def test_safe_filenames() -> None:
    # a safe id is its own name (existing outputs keep their names)
    assert safe_filename("000001-2008_000001-2008_000002_aeroplane") == "000001-2008_000001-2008_000002_aeroplane"
    assert safe_filename("cat.jpg-dog_2") == "cat.jpg-dog_2" and safe_filename("pair") == "pair"
    # any other id: sanitised, plus a digest of the exact id
    assert re.fullmatch(r"000001-2008_000001-2008_000002_aeroplane-[0-9a-f]{10}",
                        safe_filename("000001-2008_000001-2008_000002:aeroplane"))
    assert re.fullmatch(r"_a_b_c-[0-9a-f]{10}", safe_filename("../a/b c"))
    assert re.fullmatch(r"pair-[0-9a-f]{10}", safe_filename("..."))
    assert len(safe_filename("x" * 300)) <= 200 and safe_filename("x" * 300) != safe_filename("x" * 301)


def test_ids_that_sanitise_alike_never_share_a_picture(tmp_path) -> None:
    """Issue 26: `dup/1` and `dup:1` were both written to dup_1.png (one picture silently overwritten)."""
    from callbacks import PictureWriter

    ids = ["dup/1", "dup:1", "dup_1", "Dup_1"]
    assert len({safe_filename(i) for i in ids[:3]}) == 3
    trainer = SimpleNamespace(loggers=[], world_size=1, is_global_zero=True, log_dir=None,
                              default_root_dir=str(tmp_path))
    writer = PictureWriter(subdir="pictures", num_logged=0)  # the match command's and the dense pictures
    writer.on_predict_start(trainer, None)
    writer.on_predict_batch_end(trainer, None, [{"pair_id": i, "picture": Image.new("RGB", (4 + k, 4))}
                                                for k, i in enumerate(ids)], None, 0)
    assert len({p.name.casefold() for p in (tmp_path / "pictures").iterdir()}) == 4  # even case-insensitively
    assert "dup_1.png" in {p.name for p in (tmp_path / "pictures").iterdir()}  # a safe id keeps its name
    assert sorted(Image.open(p).width for p in writer.saved) == [4, 5, 6, 7]
    # the correspondence pictures of a test run
    trainer, module = _fake_run(tmp_path / "test")
    callback = CorrespondenceVisualizer(num_pairs=8, log_to_wandb=False)
    callback.on_test_start(trainer, module)
    callback.on_test_batch_end(trainer, module, [_record(i, [20.0, 15.0]) for i in ids], [_sample(i) for i in ids], 0)
    assert len({p.name.casefold() for p in callback.saved}) == 4


def _fake_run(tmp_path: Path, inclusive: bool = False):
    trainer = SimpleNamespace(world_size=1, log_dir=None, default_root_dir=str(tmp_path), datamodule=None,
                              loggers=[], is_global_zero=True)
    module = SimpleNamespace(protocol=SimpleNamespace(inclusive=inclusive))
    return trainer, module


def _sample(pair_id: str) -> dict:
    return {"pair_id": pair_id, "src_image": _gray(40, 30), "trg_image": _gray(40, 30)}


def _record(pair_id: str, pred: list[float], row: str | None = None) -> dict:
    record = {"pair_id": pair_id, "category": "cat", "src_kps": [[5.0, 5.0]], "trg_kps": [[20.0, 15.0]],
              "pred_kps": [pred], "threshold": 40.0}
    return record if row is None else {"row": row, **record}


def test_callback_limits_pairs_picks_the_ablation_row_and_uses_the_protocol(tmp_path) -> None:
    trainer, module = _fake_run(tmp_path, inclusive=True)
    callback = CorrespondenceVisualizer(num_pairs=2, alpha=0.1, height=60)
    callback.on_test_start(trainer, module)
    for b in range(3):  # 3 batches of 2 pairs, two ablation rows: row "b" is right, row "a" is off by 10 px
        ids = [f"{b}:{i}" for i in range(2)]
        records = [_record(p, [30.0, 15.0], "a") for p in ids] + [_record(p, [24.0, 15.0], "b") for p in ids]
        callback.on_test_batch_end(trainer, module, records, [_sample(p) for p in ids], b)
    out = tmp_path / "correspondences"
    names = [safe_filename(f"0:{i}") + ".png" for i in range(2)]
    assert sorted(p.name for p in out.iterdir()) == sorted(names) and names[0].startswith("0_0-")  # file-safe
    picture = Image.open(out / names[0])
    pred_xy = scale_keypoints([[30.0, 15.0]], (40, 30), (80, 60))[0] + [80, 0]
    assert picture.size == (160, 60) and _pixel(picture, pred_xy) == WRONG_COLOR  # row "a" (the first) drawn

    callback = CorrespondenceVisualizer(num_pairs=1, alpha=0.1, row="b", height=60, output_dir=str(tmp_path / "b"))
    callback.on_test_start(trainer, module)
    callback.on_test_batch_end(trainer, module, [_record("p", [30.0, 15.0], "a"), _record("p", [24.0, 15.0], "b")],
                               [_sample("p")], 0)
    pred_xy = scale_keypoints([[24.0, 15.0]], (40, 30), (80, 60))[0] + [80, 0]
    assert _pixel(Image.open(tmp_path / "b" / "p.png"), pred_xy) == CORRECT_COLOR  # error 4 = 0.1 * 40: <=

    callback = CorrespondenceVisualizer(row="nope", output_dir=str(tmp_path / "c"))
    callback.on_test_start(trainer, module)
    with pytest.raises(ValueError, match="nope"):
        callback.on_test_batch_end(trainer, module, [_record("p", [1.0, 1.0], "a")], [_sample("p")], 0)


def test_dense_records_are_skipped_quietly(tmp_path) -> None:
    trainer, module = _fake_run(tmp_path)
    callback = CorrespondenceVisualizer()
    callback.on_test_start(trainer, module)
    record = {"pair_id": "p", "category": "c", "dataset": "JODS", "threshold": 10.0, "num_valid": 5, "pck": {}}
    callback.on_test_batch_end(trainer, module, [record], [_sample("p")], 0)
    assert callback.saved == [] and not (tmp_path / "correspondences").exists()


def test_pngs_of_the_first_pairs_of_a_real_run(tmp_path, monkeypatch) -> None:
    """configs/overlays/visualize.yaml (8 pairs) after configs/spair.yaml (which has the pairs/s bar), on 9 pairs."""
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog", "bus"), pairs_per_category=3)
    model = FAST_MODEL
    out = tmp_path / "out"
    cli = evaluate.main(["test", "--config", str(CONFIGS / "spair.yaml"), "--config", str(model),
                         "--config", str(CONFIGS / "overlays" / "visualize.yaml"),
                         "--data.root", str(root), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                         "--trainer.default_root_dir", str(out)])
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 9 and (out / "results.json").is_file()  # the writer is still there
    pngs = sorted((out / "correspondences").glob("*.png"))
    seen = [s["pair_id"] for batch in cli.datamodule.test_dataloader() for s in batch]  # the loop's order
    by_id = {r["pair_id"]: r for r in predictions}
    first = [by_id[p] for p in seen[:8]]
    assert sorted(p.name for p in pngs) == sorted(safe_filename(r["pair_id"]) + ".png" for r in first)
    dataset = SPairDataset(root, split="test")
    strict = not get_protocol("spair").inclusive
    checked = 0
    for record in first:
        sample = dataset[dataset.pair_ids.index(record["pair_id"])]
        (sh, sw), (th, tw) = sample["src_image"].shape[-2:], sample["trg_image"].shape[-2:]
        picture = Image.open(out / "correspondences" / (safe_filename(record["pair_id"]) + ".png"))
        panel = (round(sw * 256 / sh), round(tw * 256 / th))
        assert picture.size == (panel[0] + panel[1], 256)
        pred_xy = np.clip(scale_keypoints(record["pred_kps"], (tw, th), (panel[1], 256)), 0, [panel[1] - 1, 255])
        for i, (p, g) in enumerate(zip(record["pred_kps"], record["trg_kps"])):
            others = np.delete(pred_xy, i, axis=0)
            if len(others) and np.linalg.norm(others - pred_xy[i], axis=1).min() < 12:
                continue  # overlapping dots: the colour on top is the other prediction's
            ok = math.dist(p, g) < 0.1 * record["threshold"] if strict else math.dist(p, g) <= 0.1 * record["threshold"]
            assert _pixel(picture, pred_xy[i] + [panel[0], 0]) == (CORRECT_COLOR if ok else WRONG_COLOR)
            checked += 1
    assert checked > 0
    bar = next(c for c in cli.trainer.callbacks if isinstance(c, PairProgressBar))
    assert cli.trainer.progress_bar_metrics["pairs/s"] > 0 and bar.pairs_per_second > 0


def test_draw_matches_colours_each_point_and_its_match_alike_and_rings_non_mutual_ones() -> None:
    from lightning_modules.components.visualize import draw_matches, point_colors

    src = np.zeros((50, 100, 3), dtype=np.uint8)
    trg = np.zeros((100, 100, 3), dtype=np.uint8)
    picture = draw_matches(src, trg, [[20.0, 10.0], [80.0, 40.0]], [[30.0, 60.0], [70.0, 20.0]], [True, False],
                           height=100)
    assert picture.size == (200 + 100, 100)  # the source panel is 200 px wide at 100 px high
    colors = point_colors(2)
    assert colors[0] != colors[1]
    pixels = np.asarray(picture)

    def at(x: float, y: float) -> tuple:
        return tuple(int(v) for v in pixels[int(round(y)), int(round(x))])

    assert at(2 * 20 + 0.5, 2 * 10 + 0.5) == colors[0] and at(2 * 80 + 0.5, 2 * 40 + 0.5) == colors[1]  # sources
    # one pixel above each match (off the line that ends at it): inside a mutual match's dot, inside the open ring
    assert at(200 + 30, 59) == colors[0]  # a mutual match: a dot of its point's colour
    assert at(200 + 70, 19) != colors[1]  # not mutual: a ring, its inside left open
    with pytest.raises(ValueError, match="same number of points"):
        draw_matches(src, trg, [[1.0, 1.0]], [[1.0, 1.0], [2.0, 2.0]])
