"""End to end through ``evaluate.py``: configs, output files, and an independent PCK recomputation."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import pytest
import torch

import evaluate
from datamodules import SPairDataset, write_synthetic_spair
from cli import build_cli
from lightning_modules.components import DinoFeaturizer, SDFeaturizer

from conftest import CONFIGS, SPAIR_CONFIG as SPAIR, TINY_OVERLAY as TINY


def recompute_official_pck(predictions: list[dict], alphas: list[float]) -> dict[str, dict[str, float]]:
    """SPair protocol from scratch, in plain Python: strict error < alpha * max side of the target bbox."""
    out: dict[str, dict[str, float]] = {}
    for alpha in alphas:
        per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        per_image, hits_all, n_all = [], 0, 0
        for rec in predictions:
            hits = sum(
                math.dist(p, g) < alpha * rec["threshold"] for p, g in zip(rec["pred_kps"], rec["trg_kps"])
            )
            n = len(rec["trg_kps"])
            per_cat[rec["category"]][0] += hits
            per_cat[rec["category"]][1] += n
            hits_all, n_all = hits_all + hits, n_all + n
            if n:
                per_image.append(100 * hits / n)
        cats = {c: 100 * h / n for c, (h, n) in per_cat.items() if n}
        out[str(alpha)] = {
            "per_point": 100 * hits_all / n_all,
            "per_image": sum(per_image) / len(per_image),
            "category_mean": sum(cats.values()) / len(cats),
            **{f"cat:{c}": v for c, v in cats.items()},
        }
    return out


def _read_outputs(out: Path) -> tuple[list[dict], dict]:
    lines = (out / "predictions.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines], json.loads((out / "results.json").read_text())


def _assert_matches_recomputation(predictions: list[dict], results: dict) -> None:
    alphas = [float(a) for a in results["pck"]]
    expected = recompute_official_pck(predictions, alphas)
    for alpha in results["pck"]:
        got = results["pck"][alpha]
        for average in ("per_point", "per_image", "category_mean"):
            assert got[average] == pytest.approx(expected[alpha][average], abs=1e-6), (alpha, average)
        for cat, value in got["per_category"].items():
            assert value == pytest.approx(expected[alpha][f"cat:{cat}"], abs=1e-6)
    assert results["num_points"] == sum(len(p["trg_kps"]) for p in predictions)


def test_demo_writes_the_contracted_files_and_its_numbers_match_the_protocol(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in configs must not write into the repository
    evaluate.main(["test", "--config", str(CONFIGS / "demo.yaml"), "--trainer.default_root_dir", str(tmp_path / "run")])
    out = tmp_path / "run"
    predictions, results = _read_outputs(out)
    dataset = SPairDataset(out / "synthetic_spair", split="test")
    assert len(predictions) == len(dataset) == results["num_pairs"] == 18
    assert sorted(p["pair_id"] for p in predictions) == sorted(dataset.pair_ids)
    assert set(results["pck"]) == {"0.01", "0.05", "0.1"}
    for rec in predictions:
        sample = dataset[dataset.pair_ids.index(rec["pair_id"])]
        assert rec["src_kps"] == sample["src_kps"].tolist() and rec["trg_kps"] == sample["trg_kps"].tolist()
        assert rec["threshold"] == pytest.approx(sample["threshold"])
        assert len(rec["pred_kps"]) == len(rec["trg_kps"])
        height, width = sample["trg_image"].shape[-2:]
        side = max(height, width)  # predictions are ORIGINAL target pixels of a cell centre in the padded square
        for x, y in rec["pred_kps"]:  # (a match may land in the zero padding, as in the reference)
            assert -(side - width) / 2 - 1 <= x <= (side + width) / 2 + 1
            assert -(side - height) / 2 - 1 <= y <= (side + height) / 2 + 1
    _assert_matches_recomputation(predictions, results)
    printed = capsys.readouterr().out
    assert "category_mean" in printed and "per_point" in printed
    # the demo shows matching: its warped pairs are found by the random networks, far above chance
    assert "chance: category_mean" in printed
    headline, chance = results["pck"]["0.1"]["category_mean"], results["chance"]["0.1"]["category_mean"]
    assert headline >= 30.0 and headline >= 5 * chance + 20.0, (headline, chance)


def test_spair_config_with_tiny_models_on_a_real_format_root(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat", "dog", "bus"), pairs_per_category=3)
    out = tmp_path / "out"
    evaluate.main(["test", "--config", SPAIR, "--config", TINY, "--data.root", str(root),
                   "--data.num_workers", "0", "--trainer.accelerator", "cpu",
                   "--trainer.default_root_dir", str(out)])
    predictions, results = _read_outputs(out)
    assert results["num_pairs"] == len(predictions) == 9
    assert sorted(results["pck"]["0.1"]["per_category"]) == ["bus", "cat", "dog"]
    _assert_matches_recomputation(predictions, results)
    assert (out / "config.yaml").is_file()
    # SPair extras: the pair-count-weighted category average and the per-variation breakdown
    for alpha, got in results["pck"].items():
        pairs = {c: sum(p["category"] == c for p in predictions) for c in got["per_category"]}
        weighted = sum(pairs[c] * v for c, v in got["per_category"].items()) / sum(pairs.values())
        assert got["weighted"] == pytest.approx(weighted, abs=1e-6)
        for variation in ("scale_variation", "truncation"):
            levels: dict[str, list[float]] = defaultdict(list)
            for p in predictions:
                level = json.loads((root / "PairAnnotation" / "test" / f"{p['pair_id']}.json").read_text())[variation]
                hits = sum(math.dist(a, b) < float(alpha) * p["threshold"] for a, b in zip(p["pred_kps"], p["trg_kps"]))
                levels[str(level)].append(100 * hits / len(p["trg_kps"]))
            table = got["per_variation"][variation]
            assert sorted(table) == sorted(levels)
            for level, values in levels.items():
                assert table[level]["per_image"] == pytest.approx(sum(values) / len(values), abs=1e-6)
                assert table[level]["num_pairs"] == len(values)


def test_local_pretrained_directories_load_through_the_config(tmp_path, monkeypatch) -> None:
    """The production from_pretrained path, driven from YAML, gives the same predictions as the in-memory models."""
    monkeypatch.chdir(tmp_path)
    # the same tiny models that configs/featurizers/tiny_*.yaml build
    sd = SDFeaturizer(model_id=None, random_init={"seed": 0}, image_size=256, crop_size=128)
    dino = DinoFeaturizer(
        model_id=None, random_init={"seed": 0, "num_hidden_layers": 12, "hidden_size": 80}, layer=11, image_size=224
    )
    sd.save_pretrained(tmp_path / "sd")
    dino.save_pretrained(str(tmp_path / "dino"))
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=3)
    common = ["--config", SPAIR, "--config", TINY, "--data.root", str(root), "--data.num_workers", "0",
              "--trainer.accelerator", "cpu"]
    evaluate.main(["test", *common, "--trainer.default_root_dir", str(tmp_path / "random")])
    local = tmp_path / "local_models.yaml"
    local.write_text(
        "model:\n  class_path: lightning_modules.ZeroShotCorrespondence\n  init_args:\n    pipeline:\n"
        "      sd:\n        class_path: lightning_modules.components.SDFeaturizer\n"
        f"        init_args: {{model_id: {tmp_path / 'sd'}, random_init: null}}\n"
        "      dino:\n        class_path: lightning_modules.components.DinoFeaturizer\n"
        f"        init_args: {{model_id: {tmp_path / 'dino'}, random_init: null}}\n"
    )
    cli = evaluate.main(["test", *common, "--config", str(local), "--trainer.default_root_dir", str(tmp_path / "loaded")])
    assert cli.model.pipeline.sd.model_id == str(tmp_path / "sd")
    assert cli.model.pipeline.dino.model_id == str(tmp_path / "dino")
    random_preds, _ = _read_outputs(tmp_path / "random")
    loaded_preds, _ = _read_outputs(tmp_path / "loaded")
    assert random_preds == loaded_preds


def _config_sets() -> list[list[str]]:
    """Every config file, composed the way the README composes it."""
    sets = [[str(CONFIGS / "demo.yaml")], [SPAIR, TINY]]
    for fragment in sorted((CONFIGS / "overlays").glob("*.yaml")):
        # sd_dino_reference.yaml needs ODISE's weights (its own test), fuse_dinov3.yaml DINOv3's (its own test with
        # a tiny stand-in, test_more_featurizers.py); the logger overlays have theirs (test_wandb_logging.py,
        # test_visualization.py)
        if fragment.name not in ("tiny.yaml", "sd_dino_reference.yaml", "fuse_dinov3.yaml", "wandb.yaml",
                                 "visualize.yaml"):
            sets.append([SPAIR, TINY, str(fragment)])
    return sets


@pytest.mark.parametrize("configs", _config_sets(), ids=lambda c: "+".join(Path(p).stem for p in c))
def test_every_config_parses_and_instantiates(configs, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    args = [arg for path in configs for arg in ("--config", path)]
    if SPAIR in configs:
        args += ["--data.root", str(tmp_path)]
    cli = build_cli(args, run=False)
    pipeline = cli.model.pipeline
    if any(p.endswith("sd_only.yaml") for p in configs):
        assert pipeline.alpha == 1.0 and pipeline.dino is None and pipeline.sd is not None
    elif any(p.endswith(("dino_only.yaml", "smoke_dino.yaml")) for p in configs):
        assert pipeline.alpha == 0.0 and pipeline.sd is None and pipeline.dino is not None
    else:
        assert pipeline.alpha == 0.5 and pipeline.sd.layers == [2, 5, 8] and pipeline.sd.timestep == 100
    if any(p.endswith("spair_subset20.yaml") for p in configs):
        assert cli.datamodule.pairs_per_category == 20
        assert (cli.datamodule.seed, cli.datamodule.subset_draw) == (42, "reference")  # the reference's --SAMPLE


REFERENCE = str(CONFIGS / "overlays" / "sd_dino_reference.yaml")


def test_the_reference_default_is_one_config_away(tmp_path, monkeypatch) -> None:
    """configs/overlays/sd_dino_reference.yaml: implicit conditioning per crop from ODISE's captioner, its
    weights named; with tiny stand-ins for the weights, it builds that featurizer."""
    from omegaconf import OmegaConf

    monkeypatch.chdir(tmp_path)
    overlay = OmegaConf.load(REFERENCE).model.pipeline
    assert overlay.sd == "../featurizers/sd15_implicit_captioner.yaml" and set(overlay) == {"sd"}
    sd = OmegaConf.load(CONFIGS / "featurizers" / "sd15_implicit_captioner.yaml").init_args
    paper = OmegaConf.load(CONFIGS / "featurizers" / "sd15.yaml").init_args
    assert {k: v for k, v in sd.items() if k not in ("conditioning", "captioner")} == dict(paper)
    assert sd.conditioning == "implicit"
    captioner = sd.captioner.init_args
    assert captioner.clip_model_id == "openai/clip-vit-large-patch14-336"
    assert captioner.weights == "odise_label_coco_50e-b67d2efc.pth" and captioner.time_embed_dim == 1280
    # without the checkpoint: an error naming the file and the field
    with pytest.raises(ValueError, match=r"model.pipeline.sd.captioner.weights: file "
                                         r"odise_label_coco_50e-b67d2efc.pth not found"):
        build_cli(["--config", SPAIR, "--config", REFERENCE, "--data.root", str(tmp_path)], run=False)
    stand_in = tmp_path / "tiny_captioner.yaml"
    stand_in.write_text(
        "model:\n  pipeline:\n    sd:\n      init_args:\n        captioner:\n"
        "          init_args: {clip_model_id: null, weights: null, random_init: {seed: 1}, text_dim: 32, "
        "time_embed_dim: 64}\n"
    )
    cli = build_cli(["--config", SPAIR, "--config", REFERENCE, "--config", TINY, "--config", str(stand_in),
                     "--data.root", str(tmp_path)], run=False)
    featurizer = cli.model.pipeline.sd
    assert featurizer.conditioning == "implicit" and featurizer.captioner is not None
    assert cli.model.pipeline.alpha == 0.5 and cli.model.pipeline.dino is not None


def test_the_paper_config_holds_the_reference_defaults(tmp_path) -> None:
    """configs/spair.yaml must say what the paper ran (parsed, not instantiated: no weights here)."""
    from omegaconf import OmegaConf

    assert OmegaConf.load(SPAIR).model == "model/sd_dino.yaml"
    cfg = OmegaConf.create({"model": OmegaConf.load(CONFIGS / "model" / "sd_dino.yaml")})
    assert cfg.model.init_args.pipeline == "pipeline.yaml"  # the node every model config shares
    pipeline = OmegaConf.load(CONFIGS / "model" / "pipeline.yaml").init_args
    assert pipeline.sd == "../featurizers/sd15.yaml"
    assert pipeline.dino == "../featurizers/dinov2_b14.yaml"
    sd = OmegaConf.load(CONFIGS / "featurizers" / "sd15.yaml").init_args
    dino = OmegaConf.load(CONFIGS / "featurizers" / "dinov2_b14.yaml").init_args
    assert sd.model_id == "stable-diffusion-v1-5/stable-diffusion-v1-5" and list(sd.layers) == [2, 5, 8]
    assert (sd.timestep, sd.image_size, sd.crop_size, sd.sliding_window, sd.seed) == (100, 960, 512, True, 42)
    assert sd.prompt == "a photo of {category}" and sd.ensemble_size == 1
    assert (dino.model_id, dino.layer, dino.image_size) == ("facebook/dinov2-base", 11, 840)
    assert pipeline.alpha == 0.5 and list(pipeline.pca_dims) == [256, 256, 256]


def test_missing_root_is_a_clear_error(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="PairAnnotation"):
        evaluate.main(["test", "--config", SPAIR, "--config", TINY, "--data.root", str(tmp_path / "nope"),
                       "--trainer.accelerator", "cpu"])
    with pytest.raises(ValueError, match="--data.root"):
        evaluate.main(["test", "--config", SPAIR, "--config", TINY, "--trainer.accelerator", "cpu"])


def test_identical_images_are_matched_to_themselves(tiny_sd, tiny_dino) -> None:
    """Geometry end to end: a pair of one image with itself maps every keypoint into its own cell."""
    from lightning_modules.components import FusedCorrespondence

    torch.manual_seed(0)
    image = (torch.rand(3, 90, 150) * 255).to(torch.uint8)
    kps = torch.tensor([[3.0, 4.0], [75.0, 45.0], [149.0, 89.0], [20.5, 70.2]])
    sample = {"src_image": image, "trg_image": image, "src_image_path": "a", "trg_image_path": "a",
              "category": "cat", "src_kps": kps}
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=(16, 16, 8))
    pred = pipeline.predict_pairs([sample])[0]["pred_kps"]
    cell = 150 / 16  # one 14 px cell of the 224 px square, in original pixels
    assert (pred - kps).abs().max() <= cell / 2 + 0.5


def test_the_progress_bar_flag_overrides_the_configs_progress_bar(tmp_path, monkeypatch) -> None:
    """`--trainer.enable_progress_bar false` on a benchmark config (which lists a PairProgressBar) runs silently."""
    from callbacks import PairProgressBar

    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SPAIR, "--config", TINY, "--data.root", str(tmp_path),
                     "--trainer.enable_progress_bar", "false"], run=False)
    assert not any(isinstance(c, PairProgressBar) for c in cli.trainer.callbacks)
    assert cli.trainer.progress_bar_callback is None
    with_bar = build_cli(["--config", SPAIR, "--config", TINY, "--data.root", str(tmp_path)], run=False)
    assert isinstance(with_bar.trainer.progress_bar_callback, PairProgressBar)


def test_the_trainer_block_is_written_once_per_subcommand(tmp_path, monkeypatch) -> None:
    """configs/defaults/<subcommand>.yaml hold the trainer block; the run configs state only their own fields."""
    from omegaconf import OmegaConf

    own = {"default_root_dir", "callbacks", "accelerator", "enable_model_summary"}  # the demo's cpu and writer
    runs = [p for p in CONFIGS.rglob("*.yaml") if p.parent.name not in ("defaults", "overlays", "featurizers", "model")]
    for path in runs:
        trainer = OmegaConf.load(path).get("trainer") or {}
        assert set(trainer) <= own, f"{path}: {sorted(set(trainer) - own)}"
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["--config", SPAIR, "--config", TINY, "--data.root", str(tmp_path)], run=False)
    kinds = [type(c).__name__ for c in cli.trainer.callbacks]
    assert "CorrespondenceWriter" in kinds and "PairProgressBar" in kinds
    assert cli.trainer.logger is None and str(cli.trainer.default_root_dir) == "outputs/spair"
    fit = OmegaConf.load(CONFIGS / "defaults" / "fit.yaml")
    assert fit.trainer.callbacks[0].init_args.monitor == "val/pck@0.1" and fit.trainer.max_epochs == 2


def test_null_reaches_an_option_two_classes_down(tmp_path, monkeypatch) -> None:
    """jsonargparse reads `--model.pipeline.<knob> null` as the text "None"; the CLI passes it as None."""
    monkeypatch.chdir(tmp_path)
    root = write_synthetic_spair(tmp_path / "spair", categories=("cat",), pairs_per_category=1)
    common = ["--config", SPAIR, "--config", TINY, "--data.root", str(root), "--trainer.accelerator", "cpu"]
    nulls = ["--model.pipeline.soft_argmax_window", "null", "--model.pipeline.projection_ckpt=null",
             "--model.pipeline.feature_cache_dir", "null", "--model.pipeline.soft_argmax_window", "null"]
    cli = build_cli([*common, "--model.pipeline.soft_argmax_window", "3", "--model.pipeline.alpha", "0.25",
                     *nulls], run=False)
    pipeline = cli.model.pipeline
    assert pipeline.refinement is None and pipeline.head is None and pipeline.cache is not None
    assert pipeline.cache.directory is None and pipeline.alpha == 0.25  # the other settings are kept
    assert not (tmp_path / "None").exists()
