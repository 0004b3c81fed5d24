"""TSS: .flo I/O, the reader's directions/padding/masks, dense flow recovery, and the end-to-end protocol."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import evaluate
from datamodules.tss import TSSDataset, read_flo, tss_category, write_flo, write_synthetic_tss
from lightning_modules.components import FusedCorrespondence
from lightning_modules.components.matching import dense_flow
from lightning_modules.metrics import dense_flow_counts

from conftest import CONFIGS


def _png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def test_flo_round_trip_and_errors(tmp_path) -> None:
    flow = torch.randn(2, 5, 7)
    write_flo(tmp_path / "a.flo", flow)
    assert torch.equal(read_flo(tmp_path / "a.flo"), flow)
    raw = bytearray((tmp_path / "a.flo").read_bytes())
    (tmp_path / "magic.flo").write_bytes(b"\x00\x00\x00\x00" + bytes(raw[4:]))
    with pytest.raises(ValueError, match="magic.flo.*magic number"):
        read_flo(tmp_path / "magic.flo")
    (tmp_path / "short.flo").write_bytes(bytes(raw[:-8]))
    with pytest.raises(ValueError, match="short.flo.*7x5"):
        read_flo(tmp_path / "short.flo")
    with pytest.raises(FileNotFoundError, match="none.flo"):
        read_flo(tmp_path / "none.flo")


def test_categories_follow_the_reference_rule() -> None:
    assert tss_category("FG3DCar", "001") == "car"
    assert tss_category("JODS", "busd_003") == "bus"
    assert tss_category("PASCAL", "bike_02") == "bicycle"
    assert tss_category("PASCAL", "plane_01") == "aeroplane"
    assert tss_category("JODS", "horse_1") == "horse"


def test_reader_directions_padding_masks_and_threshold(tmp_path) -> None:
    root = write_synthetic_tss(tmp_path / "TSS", {"JODS": [("horse_1", (40, 30), (36, 44))]})
    dataset = TSSDataset(root, datasets=["JODS"])
    assert len(dataset) == 2 and dataset.categories == ["JODS"]
    forward, backward = dataset[0], dataset[1]
    assert forward["pair_id"] == "JODS/horse_1/image1-image2" and backward["pair_id"] == "JODS/horse_1/image2-image1"
    for sample in (forward, backward):
        assert sample["src_image"].shape == sample["trg_image"].shape == (3, 44, 40)  # common size
        assert sample["flow"].shape == (2, 44, 40) and sample["mask"].shape == (44, 40)
        assert sample["category"] == "horse" and sample["dataset"] == "JODS"
    # image1 -> image2 is scored with flow2/mask2 on image2's grid; the threshold is image1's long side
    assert forward["threshold"] == 40.0 and backward["threshold"] == 44.0
    flow2 = read_flo(root / "JODS/horse_1/flow2.flo")
    assert torch.equal(forward["flow"][:, :44, :36], flow2) and forward["flow"][:, :, 36:].abs().max() == 0
    mask2 = np.array(Image.open(root / "JODS/horse_1/mask2.png")) == 255
    assert torch.equal(forward["mask"][:44, :36], torch.from_numpy(mask2)) and not forward["mask"][:, 36:].any()
    assert not forward["mask"][0, 0]  # a 128 pixel is not valid
    assert torch.equal(forward["src_image"][:, 30:], torch.zeros(3, 14, 40, dtype=torch.uint8))  # padded below


def test_reader_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="TSS root not found"):
        TSSDataset(tmp_path / "nope")
    root = write_synthetic_tss(tmp_path / "TSS", {"PASCAL": [("bike_1", (30, 20), (30, 20))]})
    with pytest.raises(FileNotFoundError, match="FG3DCar"):
        TSSDataset(root)  # the default reads all three
    write_flo(root / "PASCAL/bike_1/flow2.flo", torch.zeros(2, 21, 30))
    with pytest.raises(ValueError, match="flow2.flo is 30x21"):
        TSSDataset(root, ["PASCAL"])[0]
    write_flo(root / "PASCAL/bike_1/flow2.flo", torch.zeros(2, 20, 30))
    _png(root / "PASCAL/bike_1/mask2.png", np.zeros((10, 30), np.uint8))
    with pytest.raises(ValueError, match="mask2.png is 30x10"):
        TSSDataset(root, ["PASCAL"])[0]
    (root / "PASCAL/bike_1/flow1.flo").unlink()
    with pytest.raises(FileNotFoundError, match="bike_1 lacks flow1.flo"):
        TSSDataset(root, ["PASCAL"])


def test_dense_flow_counts_by_hand() -> None:
    gt = torch.zeros(2, 2, 3)
    est = torch.zeros(2, 2, 3)
    est[0, 0, 0], est[1, 0, 1], est[0, 1, 2] = 2.0, 3.0, 4.0  # EPEs 2, 3, 4, 0, 0, 0
    mask = torch.tensor([[True, True, True], [True, False, True]])  # the pixel of EPE 0 at (1, 1) is not scored
    correct, valid, epe_sum = dense_flow_counts(est, gt, mask, threshold=40.0, alphas=[0.05, 0.1])
    assert valid == 5 and epe_sum == pytest.approx(9.0)
    assert correct.tolist() == [3, 5]  # at 0.05 the bound is 2: EPE 2 counts (<=), 3 and 4 do not
    strict, _, _ = dense_flow_counts(est, gt, mask, threshold=40.0, alphas=[0.05], inclusive=False)
    assert strict.tolist() == [2]


class PatchOracle(torch.nn.Module):
    """A 'DINO' whose token is the cell's raw pixels: unique per content, so matches are exact."""

    image_size, grid_size, uses_prompt = 224, 16, False

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.pixel_unshuffle(images, 14)


def test_a_known_translation_is_recovered_exactly_as_dense_flow() -> None:
    torch.manual_seed(0)
    source = (torch.rand(3, 224, 224) * 255).to(torch.uint8)
    target = torch.roll(source, shifts=28, dims=2)  # target(x) = source(x - 28): flow -28 px
    pipeline = FusedCorrespondence(sd=None, dino=PatchOracle(), alpha=0.0, feature_cache_gb=0)
    sample = {"src_image": source, "trg_image": target, "src_image_path": "s", "trg_image_path": "t", "category": "x"}
    flow = pipeline.predict_flows([sample])[0]
    assert flow.shape == (2, 224, 224)
    valid = flow[:, :, 42:]  # cells 0-1 wrap around and their bilinear neighbourhood (< 3 cells) mixes them
    assert torch.equal(valid[0], torch.full_like(valid[0], -28.0)) and valid[1].abs().max() == 0


def test_dense_flow_crops_the_padded_square_like_the_reference() -> None:
    torch.manual_seed(0)
    desc = torch.randn(8, 6, 6)
    flow = dense_flow(desc, desc, height=30, width=60)  # identical descriptors: zero flow
    assert flow.shape == (2, 30, 60) and flow.abs().max() == 0


def test_tss_config_end_to_end_with_tiny_models(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_tss(
        tmp_path / "TSS_CVPR2016",
        {"FG3DCar": [("001", (48, 32), (48, 36))], "JODS": [("horse_1", (40, 30), (36, 44))],
         "PASCAL": [("bike_1", (30, 30), (30, 30)), ("cat_2", (50, 40), (50, 40))]},
    )
    out = tmp_path / "out"
    evaluate.main(["test", "--config", str(CONFIGS / "tss.yaml"), "--config", str(CONFIGS / "overlays" / "tiny.yaml"),
                   "--data.root", str(root), "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(out)])
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    results = json.loads((out / "results.json").read_text())
    assert len(records) == results["num_pairs"] == 8
    assert {r["dataset"] for r in records} == {"FG3DCar", "JODS", "PASCAL"}
    assert results["protocol"]["inclusive"] is True and list(results["pck"]) == ["0.05"]
    by_dataset = {d: [r["pck"]["0.05"] for r in records if r["dataset"] == d] for d in ("FG3DCar", "JODS", "PASCAL")}
    pck = results["pck"]["0.05"]
    assert pck["per_image"] == pytest.approx(sum(r["pck"]["0.05"] for r in records) / 8)
    for name, values in by_dataset.items():
        assert pck["per_dataset"][name] == pytest.approx(sum(values) / len(values))
    assert pck["dataset_mean"] == pytest.approx(sum(pck["per_dataset"].values()) / 3)
    assert results["aepe"]["per_image"] == pytest.approx(sum(r["epe"] for r in records) / 8)
    assert all(r["threshold"] in (48.0, 40.0, 44.0, 30.0, 50.0) for r in records)
