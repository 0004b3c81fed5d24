"""Issue 26: own photos as a phone and a photo folder give them. Upright by EXIF orientation everywhere a user's
image is read (benchmark readers keep the stored pixels), a folder's stray files skipped (or a strict stop),
large photos read under a documented limit, and ``FusedCorrespondence.match`` as strict as the command."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from datamodules.own_images import ImagePairsDataModule, ImagePairsDataset, read_image_pairs
from lightning_modules.components import DinoFeaturizer, FusedCorrespondence
from lightning_modules.components import image_prep
from lightning_modules.components.image_prep import load_rgb_image
from lightning_modules.components.inputs import SWAPPED_HINT, check_points

#: The transpose that stores an upright picture so that a viewer applying EXIF orientation ``tag`` shows it
#: upright again (the inverse of PIL.ImageOps.exif_transpose's).
_STORE = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
WIDTH, HEIGHT = 96, 64  # the photo as a viewer shows it: landscape


def _upright_picture(seed: int = 0) -> Image.Image:
    """A textured landscape picture with a red block at its top-left corner (where 'up' is)."""
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, size=(HEIGHT, WIDTH, 3), dtype=np.uint8)
    array[:16, :16] = (255, 0, 0)
    return Image.fromarray(array)


def _phone_jpeg(path: Path, tag: int, seed: int = 0) -> Path:
    """A phone-style JPEG: the pixels stored turned, EXIF orientation ``tag`` saying how to show them."""
    exif = Image.Exif()
    exif[0x0112] = tag
    _upright_picture(seed).transpose(_STORE[tag]).save(path, quality=95, exif=exif)
    return path


@pytest.mark.parametrize("tag", [3, 6, 8])
def test_phone_photos_are_read_upright_by_the_command_readers(tmp_path: Path, tag: int) -> None:
    photo = _phone_jpeg(tmp_path / "phone.jpg", tag)
    _phone_jpeg(tmp_path / "other.jpg", tag, seed=1)
    stored = Image.open(photo).size
    assert stored == ((HEIGHT, WIDTH) if tag in (6, 8) else (WIDTH, HEIGHT))
    # a keypoint read off a photo viewer (the bottom-right corner of the landscape) is inside the photo
    point = [[WIDTH - 3.0, HEIGHT - 3.0]]
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "phone.jpg", "target": "other.jpg",
                                                      "source_keypoints": point}]))
    pairs = read_image_pairs(pairs=str(tmp_path / "pairs.json"))
    assert pairs[0]["points"] == point
    item = ImagePairsDataset(pairs)[0]
    assert tuple(item["src_image"].shape) == (3, HEIGHT, WIDTH) == tuple(item["trg_image"].shape)
    top_left = item["src_image"][:, 4:12, 4:12].float().mean(dim=(1, 2))
    assert top_left[0] > 200 and top_left[1] < 60 and top_left[2] < 60  # the red block where a viewer shows it
    # the benchmark readers' default keeps the stored pixels (the frame of their annotations)
    assert tuple(load_rgb_image(photo).shape) == (3, stored[1], stored[0])
    assert torch.equal(load_rgb_image(photo, upright=True), item["src_image"])
    # the folder run and a box / mask are read in the same frame
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[HEIGHT // 2:, WIDTH // 2:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    (tmp_path / "pairs.json").write_text(json.dumps([
        {"source": "phone.jpg", "target": "other.jpg", "source_box": [WIDTH / 2, HEIGHT / 2, WIDTH, HEIGHT]},
        {"source": "phone.jpg", "target": "other.jpg", "source_mask": "mask.png"}]))
    assert len(read_image_pairs(pairs=str(tmp_path / "pairs.json"))) == 2
    (tmp_path / "folder").mkdir()
    _phone_jpeg(tmp_path / "folder" / "t.jpg", tag, seed=2)
    folder_pairs = read_image_pairs(source=str(photo), targets=str(tmp_path / "folder"), source_keypoints=point)
    assert folder_pairs[0]["points"] == point


@pytest.fixture(scope="module")
def pipeline() -> FusedCorrespondence:
    dino = DinoFeaturizer(model_id=None, random_init={"seed": 0, "num_hidden_layers": 2}, layer=1, image_size=224)
    return FusedCorrespondence(None, dino, alpha=0.0)


@pytest.mark.parametrize("tag", [6, 8])
def test_match_reads_a_phone_photo_upright_from_a_path_or_a_pil_image(tmp_path: Path, tag: int,
                                                                      pipeline: FusedCorrespondence) -> None:
    photo = _phone_jpeg(tmp_path / "phone.jpg", tag)
    shown = np.asarray(ImageOps.exif_transpose(Image.open(photo)).convert("RGB"))  # what a viewer shows
    points = [[WIDTH - 6.0, HEIGHT - 6.0], [8.0, 8.0], [WIDTH / 2, 10.0]]
    cell = max(WIDTH, HEIGHT) / 16  # 224 px / 14 px patches over the long side
    for source in (photo, Image.open(photo)):
        result = pipeline.match(source, shown, points)  # the same picture: each point finds its own cell
        assert (result.points - torch.tensor(points)).abs().max() <= cell


def test_match_checks_points_as_the_command_does(tmp_path: Path, pipeline: FusedCorrespondence) -> None:
    image = np.asarray(_upright_picture())
    with pytest.raises(ValueError) as python_error:
        pipeline.match(image, image, [[10.0, 10.0], [WIDTH + 5.0, 10.0]])
    with pytest.raises(ValueError) as command_error:
        check_points([[10.0, 10.0], [WIDTH + 5.0, 10.0]], (WIDTH, HEIGHT), "points")
    assert str(python_error.value) == str(command_error.value)
    assert f"point 1 [{WIDTH + 5.0}, 10.0] lies outside the {WIDTH}x{HEIGHT} image (1 of 2 points do)" in str(
        python_error.value)
    with pytest.raises(ValueError, match=r"expected a non-empty list of \[x, y\] points, got shape \[3\]"):
        pipeline.match(image, image, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="expected"):
        pipeline.match(image, image, [["a", "b"]])
    with pytest.raises(ValueError, match="finite"):
        pipeline.match(image, image, torch.tensor([[float("nan"), 1.0]]))
    # the same check and message in a pairs file
    Image.fromarray(image).save(tmp_path / "a.png")
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "a.png", "target": "a.png",
                                                      "source_keypoints": [[10.0, 10.0], [WIDTH + 5.0, 10.0]]}]))
    with pytest.raises(ValueError, match=r"entry 0 'source_keypoints': point 1 .* lies outside the 96x64 image"):
        read_image_pairs(pairs=str(tmp_path / "pairs.json"))


def test_points_given_as_y_x_get_the_swapped_hint() -> None:
    # a tall image: (y, x) points fall below it, and would all fit swapped
    size = (40, 100)
    yx = [[80.0, 10.0], [90.0, 20.0], [5.0, 30.0]]
    with pytest.raises(ValueError, match=r"\(2 of 3 points do\); points are \(x, y\): swapped\?"):
        check_points(yx, size, "points")
    with pytest.raises(ValueError) as outside:  # outside either way: no hint
        check_points([[80.0, 10.0], [90.0, 200.0]], size, "points")
    assert SWAPPED_HINT not in str(outside.value)
    with pytest.raises(ValueError) as few:  # one stray point of many: a typo, not a swap
        check_points([[80.0, 10.0], [5.0, 20.0], [6.0, 30.0]], size, "points")
    assert SWAPPED_HINT not in str(few.value)


def _folder(root: Path) -> Path:
    folder = root / "targets"
    folder.mkdir(parents=True)
    for k in range(2):
        _upright_picture(k).save(folder / f"good_{k}.jpg")
    (folder / "broken.jpg").write_bytes(b"")
    data = (folder / "good_0.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "._IMG_0001.JPG").write_bytes(b"\x00\x05\x16\x07" + b"\x00" * 60)
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (folder / "notes.txt").write_text("not an image")
    (folder / "sub").mkdir()
    return folder


def test_a_folder_skips_unreadable_hidden_and_other_files_with_one_warning(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    source = tmp_path / "source.png"
    _upright_picture(5).save(source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pairs = read_image_pairs(source=str(source), targets=str(folder))
    assert [Path(p["target"]).name for p in pairs] == ["good_0.jpg", "good_1.jpg"]
    messages = [str(w.message) for w in caught if "data.targets" in str(w.message)]
    assert len(messages) == 1, messages
    for name in ("broken.jpg", "truncated.jpg", "._IMG_0001.JPG (hidden)", ".DS_Store (hidden)", "notes.txt"):
        assert name in messages[0]
    assert "skipping 5 file(s)" in messages[0] and "--data.strict true" in messages[0] and "sub" not in messages[0]
    with pytest.raises(ValueError, match=r"holds 5 file\(s\) that are not readable images \(data.strict is true\)"
                       r".*broken\.jpg"):
        read_image_pairs(source=str(source), targets=str(folder), strict=True)
    with pytest.raises(ValueError, match="truncated.jpg"):
        ImagePairsDataModule.check_inputs(source=str(source), targets=str(folder), strict=True)
    module = ImagePairsDataModule(source=str(source), targets=str(folder), strict=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.setup("predict")
    assert len(module.test_dataset) == 2


def test_a_photo_above_pils_guard_is_read_and_one_above_the_limit_is_one_clear_line(tmp_path: Path,
                                                                                    monkeypatch) -> None:
    photo = tmp_path / "big.jpg"
    _upright_picture().save(photo)
    # PIL's own guard (here lowered so a small file trips it, as a 200-megapixel photo trips the real one)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(Image.DecompressionBombError):
        Image.open(photo)
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "big.jpg", "target": "big.jpg"}]))
    pairs = read_image_pairs(pairs=str(tmp_path / "pairs.json"))
    assert tuple(ImagePairsDataset(pairs)[0]["src_image"].shape) == (3, HEIGHT, WIDTH)
    assert Image.MAX_IMAGE_PIXELS == 1000  # the guard is raised for own images only, and put back
    with pytest.raises(ValueError, match="Could not read image"):  # benchmark readers keep PIL's guard
        load_rgb_image(photo)
    # the documented limit
    monkeypatch.setattr(image_prep, "USER_IMAGE_MAX_PIXELS", 5000)
    with pytest.raises(ValueError) as error:
        read_image_pairs(pairs=str(tmp_path / "pairs.json"))
    message = str(error.value)
    assert "\n" not in message and str(photo) in message and f"{WIDTH}x{HEIGHT} = 0.0 megapixels" in message
    assert "above the limit of 0 megapixels" in message and "USER_IMAGE_MAX_PIXELS" in message
    with pytest.raises(ValueError, match="above the limit"):
        load_rgb_image(photo, upright=True)


def _smooth_photo(path: Path, size: tuple[int, int], tag: int | None = None) -> Path:
    """A smooth textured photo (low-frequency blobs: it keeps its look when downscaled), optionally stored
    turned with EXIF orientation ``tag``."""
    rng = np.random.default_rng(3)
    coarse = Image.fromarray(rng.integers(0, 255, size=(6, 9, 3), dtype=np.uint8)).resize(size, Image.Resampling.BICUBIC)
    if tag is None:
        coarse.save(path, quality=95)
        return path
    exif = Image.Exif()
    exif[0x0112] = tag
    coarse.transpose(_STORE[tag]).save(path, quality=95, exif=exif)
    return path


def test_a_large_photo_is_downscaled_on_load_and_answers_in_original_pixels(tmp_path: Path,
                                                                            pipeline: FusedCorrespondence) -> None:
    side = pipeline.load_side()  # twice the largest featurizer input: 448 for the tiny DINO at 224
    assert side == 448
    size = (side + 160, int((side + 160) * 2 / 3))  # just above the threshold: 608 x 405
    source, target = _smooth_photo(tmp_path / "a.jpg", size), _smooth_photo(tmp_path / "b.jpg", size, tag=6)
    loaded, original = image_prep.load_user_image(target, side)
    assert original == size and max(loaded.shape[1:]) == side and loaded.shape[2] > loaded.shape[1]  # upright
    points = [[40.0, 30.0], [300.0, 200.0], [size[0] - 20.0, size[1] - 15.0], [150.0, 350.0]]
    small = pipeline.match(source, target, points)
    whole = pipeline.match(source, target, points, downscale=False)
    cell = max(size) / 16  # one feature cell of the 224-pixel DINO input, in original pixels
    assert (small.points - whole.points).abs().max() <= cell
    assert (small.points - torch.tensor(points)).abs().max() <= cell  # the same picture: back where it was
    with pytest.raises(ValueError, match="outside the 608x405 image"):  # checked in original pixels
        pipeline.match(source, target, [[size[0] + 1.0, 10.0]])


def test_a_100_megapixel_photo_loads_downscaled(tmp_path: Path) -> None:
    # about 2 s on 2 CPU cores (not marked slow); benchmarks/user_photo_load.py measures its memory and time
    photo = _smooth_photo(tmp_path / "big.jpg", (12_000, 8_400), tag=8)  # 100.8 megapixels, stored turned
    loaded, original = image_prep.load_user_image(photo, 1920)
    assert original == (12_000, 8_400) and tuple(loaded.shape) == (3, 1344, 1920)
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "big.jpg", "target": "big.jpg",
                                                      "source_keypoints": [[11_000.0, 8_000.0]]}]))
    assert read_image_pairs(pairs=str(tmp_path / "pairs.json"))[0]["points"] == [[11_000.0, 8_000.0]]


def test_the_command_writes_a_phone_photo_upright_and_takes_data_strict(tmp_path: Path) -> None:
    import evaluate

    from conftest import CONFIGS, TINY_OVERLAY

    folder = tmp_path / "targets"
    folder.mkdir()
    source = _phone_jpeg(tmp_path / "source.jpg", 6)
    _phone_jpeg(folder / "target.jpg", 8, seed=1)
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "run"
    args = ["predict", "--config", str(CONFIGS / "match.yaml"), "--config", TINY_OVERLAY, "--trainer.accelerator",
            "cpu", "--trainer.default_root_dir", str(out), "--data.source", str(source), "--data.targets", str(folder),
            "--data.source_keypoints", json.dumps([[WIDTH - 3.0, HEIGHT - 3.0]])]
    with pytest.raises(ValueError, match=r"notes\.txt \(not an image suffix\)"):  # --data.strict true stops
        evaluate.main([*args, "--data.strict", "true"])
    assert not (out / "matches.jsonl").exists()
    (folder / "notes.txt").unlink()
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        evaluate.main(args)
    skips = [str(w.message) for w in caught if "data.targets: skipping" in str(w.message)]
    assert len(skips) == 1 and ".DS_Store (hidden)" in skips[0]  # once, though the check and the setup read it
    line = json.loads((out / "matches.jsonl").read_text().splitlines()[0])
    assert line["source_size"] == [WIDTH, HEIGHT] == line["target_size"]  # as a photo viewer shows them
    assert line["src_kps"] == [[WIDTH - 3.0, HEIGHT - 3.0]]
    picture = next((out / "pictures").glob("*.png"))
    assert Image.open(picture).width > Image.open(picture).height  # two landscape photos side by side


def _viewer_data(page: Path) -> dict:
    import re

    text = page.read_text(encoding="utf-8")
    return json.loads(re.search(r'<script id="viewer-data" type="application/json">(.*?)</script>', text, re.S).group(1))


def test_the_command_reads_large_photos_downscaled_and_writes_the_files_pixels(tmp_path: Path) -> None:
    """``--data.max_side``: the command's photos are read downscaled on load (bounded memory), and matches.jsonl,
    the pictures and the viewer page still speak the files' pixels; the matches agree with a run that reads the
    photos whole within one feature cell. (Before: every photo was decoded whole, and there was no such option.)"""
    import evaluate
    from lightning_modules.components.viewer import viewer_match

    from conftest import CONFIGS, TINY_OVERLAY

    size = (608, 405)
    _smooth_photo(tmp_path / "a.jpg", size)
    _smooth_photo(tmp_path / "b.jpg", size, tag=6)
    points = [[40.0, 30.0], [300.5, 200.25], [size[0] - 20.0, size[1] - 15.0]]
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "a.jpg", "target": "b.jpg",
                                                      "source_keypoints": points}]))
    dataset = ImagePairsDataset(read_image_pairs(pairs=str(tmp_path / "pairs.json")), max_side=304)
    item = dataset[0]
    assert tuple(item["trg_image"].shape) == (3, 202, 304) and item["trg_file_size"] == size  # 202.5 rounds to even
    scale = torch.tensor([304 / 608, 202 / 405], dtype=torch.float64)
    assert torch.allclose(item["src_kps"].double(), torch.tensor(points, dtype=torch.float64) * scale, atol=1e-4)
    runs = {}
    for name, max_side in (("small", "304"), ("whole", "null")):
        out = tmp_path / name
        evaluate.main(["predict", "--config", str(CONFIGS / "match.yaml"), "--config", TINY_OVERLAY,
                       "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(out),
                       "--data.pairs", str(tmp_path / "pairs.json"), "--data.max_side", max_side])
        runs[name] = (json.loads((out / "matches.jsonl").read_text().splitlines()[0]),
                      _viewer_data(out / "viewer.html")["pairs"][0])
    (small, small_page), (whole, whole_page) = runs["small"], runs["whole"]
    assert small["source_size"] == list(size) == small["target_size"] == whole["target_size"]
    assert small["src_kps"] == points == whole["src_kps"]  # the points as given, not a round trip
    cell = max(size) / 16  # one cell of the tiny DINO's 16 x 16 grid, in file pixels
    assert np.abs(np.array(small["pred_kps"]) - np.array(whole["pred_kps"])).max() <= cell
    assert np.abs(np.array(small["pred_kps"]) - np.array(points)).max() <= cell  # the same picture
    assert (small_page["target"]["width"], small_page["target"]["height"]) == size
    assert small_page["points"]["pred"] == small["pred_kps"]
    for x, y in points:  # the page's own arithmetic: a click at a file pixel lands in file pixels
        _, _, small_point = viewer_match(small_page, x, y)
        _, _, whole_point = viewer_match(whole_page, x, y)
        assert max(abs(a - b) for a, b in zip(small_point, whole_point)) <= cell


def test_the_commands_reader_holds_a_100_megapixel_photo_downscaled(tmp_path: Path) -> None:
    photo = _smooth_photo(tmp_path / "big.jpg", (12_000, 8_400), tag=8)  # about 2 s
    (tmp_path / "pairs.json").write_text(json.dumps([{"source": "big.jpg", "target": "big.jpg",
                                                      "source_keypoints": [[11_000.0, 8_000.0]]}]))
    item = ImagePairsDataset(read_image_pairs(pairs=str(tmp_path / "pairs.json")), max_side=1920)[0]
    assert tuple(item["src_image"].shape) == (3, 1344, 1920) and item["src_file_size"] == (12_000, 8_400)
    assert item["src_kps"].tolist() == [[1760.0, 1280.0]] and item["src_file_kps"].tolist() == [[11_000.0, 8_000.0]]
    assert photo.is_file()
