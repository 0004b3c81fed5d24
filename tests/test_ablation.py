"""Ablation tables: many descriptor settings over ONE extraction per image and featurizer variant.

The point of ``AblationCorrespondence`` is that every row predicts exactly what a separately built
``FusedCorrespondence`` with the same settings predicts, while every image goes through each featurizer
variant once per batch. The tiny SD model is slow on a CPU (about 1.6 s per image), so the expensive
runs are module-scoped fixtures shared by several tests.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import warnings
from collections import defaultdict
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import evaluate
from datamodules import SPairDataset, write_synthetic_spair
from lightning_modules.ablation import ablation_table
from lightning_modules.components.ablation import AblationCorrespondence, AblationRow
from lightning_modules.components.keypoints import transfer
from lightning_modules.components.pipeline import FusedCorrespondence

from conftest import REPO
ABLATIONS = REPO / "configs" / "ablations"
TINY = REPO / "configs" / "overlays" / "tiny.yaml"
#: Table configs. The common tiny overlay swaps in tiny random SD / DINO (``model.pipeline``, as for every
#: config); a table with extra models (``sd_models`` / ``dino_models``) names its own tiny stand-ins
#: (``tiny_<...>.yaml``) in its smoke-run comment.
TABLES = sorted(p for p in ABLATIONS.glob("*.yaml") if not p.name.startswith("tiny"))


def _tiny_configs(table: Path) -> list[Path]:
    """tiny.yaml, then the per-table tiny overrides that the table's header comment tells users to add."""
    named = re.findall(r"configs/ablations/(tiny_[\w-]+\.yaml)", table.read_text())
    return [TINY, *(ABLATIONS / name for name in dict.fromkeys(named))]

SIZES = [(90, 150), (120, 100), (64, 64), (100, 130)]  # (height, width) of the 4 distinct images
PAIRS = [(0, 1), (1, 2), (0, 3)]  # 3 pairs over 4 images; images 0 and 1 are shared
KPS = torch.tensor([[3.0, 4.0], [20.5, 30.0], [50.0, 60.2], [63.0, 12.0]])

#: The six rows of the equivalence check (names -> AblationRow).
ROWS = [
    AblationRow("fused"),
    AblationRow("sd only", dino=None),
    AblationRow("dino only", sd=None),
    AblationRow("layer 5", sd_layers=[5]),
    AblationRow("no pca", pca_dims=None),
    AblationRow("concat", fusion="concat"),
]


def _samples() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in SIZES]
    return [
        {"src_image": images[a], "trg_image": images[b], "src_image_path": f"img{a}.jpg",
         "trg_image_path": f"img{b}.jpg", "category": "cat", "src_kps": KPS.clone()}
        for a, b in PAIRS
    ]


def _assert_same(got: list[dict], expected: list[dict], what: str) -> None:
    assert len(got) == len(expected) == len(PAIRS)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert torch.equal(g["pred_kps"], e["pred_kps"]), f"{what}, pair {i}: {g['pred_kps']} != {e['pred_kps']}"
        assert torch.equal(g["distance"], e["distance"]), f"{what}, pair {i}: distances differ"


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return _samples()


@pytest.fixture(scope="module")
def ablation_run(tiny_sd, tiny_dino, samples):
    """The six rows, an SD-only row at the SD resolution, an alpha=1 row and a row on a t=0 SD variant; one batch.

    Hooks record what the shared UNet and ViT really ran (images and timesteps).
    """
    rows = [*ROWS, AblationRow("sd only @192", dino=None, annotation_size=192), AblationRow("alpha 1", alpha=1.0),
            AblationRow("sd t0", sd="t0", dino=None)]
    ablation = AblationCorrespondence(rows, sd=tiny_sd, dino=tiny_dino, sd_variants={"t0": {"timestep": 0}})
    unet_timesteps: list[int] = []
    vit_images: list[int] = []

    def on_unet(module, args, kwargs):
        timesteps = args[1] if len(args) > 1 else kwargs["timestep"]
        unet_timesteps.extend(int(t) for t in timesteps)

    def on_vit(module, args, kwargs):
        vit_images.append(int(kwargs["pixel_values"].shape[0]))

    handles = [
        tiny_sd.unet.register_forward_pre_hook(on_unet, with_kwargs=True),
        tiny_dino.model.register_forward_pre_hook(on_vit, with_kwargs=True),
    ]
    try:
        outputs = ablation.predict_pairs(samples)
    finally:
        for handle in handles:
            handle.remove()
    return ablation, outputs, unet_timesteps, vit_images


@pytest.fixture(scope="module")
def reference_features(tiny_sd, tiny_dino, samples):
    """Features of the 4 images extracted by a plain ``FusedCorrespondence`` (tiny_sd + tiny_dino)."""
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=(256,) * 3)
    paths = {}
    for s in samples:
        paths.setdefault(s["src_image_path"], s["src_image"])
        paths.setdefault(s["trg_image_path"], s["trg_image"])
    features = pipeline.extract(list(paths.values()), ["cat"] * len(paths))
    return dict(zip(paths, features))


def _reference(pipeline: FusedCorrespondence, features, samples) -> list[dict]:
    """What ``pipeline.predict_pairs`` gives, on features its featurizers produce (extracted once)."""
    out = []
    for s in samples:
        source, target = features[s["src_image_path"]], features[s["trg_image_path"]]
        pred, distance, _ = transfer(pipeline.describe_pair(source, target), source, target, s["src_kps"],
                                     pipeline.annotation_size)
        out.append({"pred_kps": pred, "distance": distance})
    return out


# ----------------------------------------------------------------------------------------- AblationRow.spec


def test_row_spec_sd_only_dino_only_and_fused() -> None:
    layers = [2, 5, 8]
    sd_only = AblationRow("sd", dino=None, alpha=0.3).spec(layers)
    assert sd_only.alpha == 1.0 and sd_only.uses_sd and not sd_only.uses_dino
    assert sd_only.pca_dims == (256, 256, 256) and sd_only.sd_layers is None
    dino_only = AblationRow("dino", sd=None, alpha=0.3).spec(())
    assert dino_only.alpha == 0.0 and dino_only.uses_dino and not dino_only.uses_sd
    fused = AblationRow("fused", alpha=0.3, fusion="sum_l2").spec(layers)
    assert (fused.alpha, fused.fusion) == (0.3, "sum_l2")


def test_row_spec_pca_dim_expands_to_one_entry_per_used_layer() -> None:
    assert AblationRow("a", pca_dims=64).spec([2, 5, 8]).pca_dims == (64, 64, 64)
    spec = AblationRow("b", sd_layers=[5, 8], pca_dims=32).spec([2, 5, 8])
    assert spec.pca_dims == (32, 32) and spec.sd_layers == (5, 8)
    assert spec.layer_positions([2, 5, 8]) == [1, 2]
    assert AblationRow("c", sd_layers=[8], pca_dims=None).spec([2, 5, 8]).pca_dims is None


def test_row_using_neither_featurizer_is_an_error() -> None:
    with pytest.raises(ValueError, match="row 'nothing' uses neither SD nor DINO"):
        AblationRow("nothing", sd=None, dino=None).spec([2, 5, 8])


def test_row_with_unknown_fusion_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown fusion 'max'"):
        AblationRow("bad", fusion="max").spec([2, 5, 8])


# -------------------------------------------------------------------------------- equivalence to pipelines


def test_fused_row_equals_a_separate_fused_pipeline(tiny_sd, tiny_dino, ablation_run, samples) -> None:
    """The reference pipeline runs end to end here (its own extraction through predict_pairs)."""
    _, outputs, _, _ = ablation_run
    reference = FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=(256,) * 3)
    _assert_same(outputs["fused"], reference.predict_pairs(samples), "fused")


def test_rows_equal_separate_pipelines(tiny_sd, tiny_dino, ablation_run, reference_features, samples) -> None:
    _, outputs, _, _ = ablation_run
    references = {
        "no pca": FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=None),
        "concat": FusedCorrespondence(tiny_sd, tiny_dino, alpha=0.5, pca_dims=(256,) * 3, fusion="concat"),
        "sd only @192": FusedCorrespondence(tiny_sd, tiny_dino, alpha=1.0, pca_dims=(256,) * 3, annotation_size=192),
        # keypoints map at the DINO input size whenever DINO is configured, even for SD-only (the reference)
        "sd only": FusedCorrespondence(tiny_sd, tiny_dino, alpha=1.0, pca_dims=(256,) * 3),
    }
    assert references["sd only"].annotation_size == 224
    assert FusedCorrespondence(tiny_sd, None, alpha=1.0, pca_dims=(256,) * 3).annotation_size == 192
    for name, pipeline in references.items():
        _assert_same(outputs[name], _reference(pipeline, reference_features, samples), name)


def test_dino_only_row_equals_a_separate_dino_pipeline(tiny_dino, ablation_run, samples) -> None:
    _, outputs, _, _ = ablation_run
    reference = FusedCorrespondence(None, tiny_dino, alpha=0.0)
    _assert_same(outputs["dino only"], reference.predict_pairs(samples), "dino only")


def test_layer_subset_row_equals_a_pipeline_extracting_only_that_layer(tiny_sd, tiny_dino, ablation_run, samples):
    """Against an independent extraction of layer 5 alone (an SD variant with ``layers=[5]``)."""
    _, outputs, _, _ = ablation_run
    reference = FusedCorrespondence(tiny_sd.variant(layers=[5]), tiny_dino, alpha=0.5, pca_dims=(256,))
    _assert_same(outputs["layer 5"], reference.predict_pairs(samples), "layer 5")


def test_sd_only_row_with_default_annotation_size_equals_a_separate_sd_only_pipeline(
    tiny_sd, tiny_dino, ablation_run, reference_features, samples
) -> None:
    _, outputs, _, _ = ablation_run
    reference = FusedCorrespondence(tiny_sd, tiny_dino, alpha=1.0, pca_dims=(256,) * 3)
    _assert_same(outputs["sd only"], _reference(reference, reference_features, samples), "sd only")


def test_dino_variant_row_with_default_annotation_size_equals_a_separate_pipeline(tiny_dino, samples) -> None:
    ablation = AblationCorrespondence(
        [AblationRow("dino 112", sd=None, dino="small")], dino=tiny_dino, dino_variants={"small": {"image_size": 112}}
    )
    reference = FusedCorrespondence(None, tiny_dino.variant(image_size=112), alpha=0.0)
    _assert_same(ablation.predict_pairs(samples)["dino 112"], reference.predict_pairs(samples), "dino 112")


def test_original_annotation_row_equals_a_separate_pipeline_and_differs_from_the_default(tiny_dino, samples) -> None:
    rows = [AblationRow("840", sd=None), AblationRow("original", sd=None, annotation_size="original")]
    outputs = AblationCorrespondence(rows, dino=tiny_dino).predict_pairs(samples)
    reference = FusedCorrespondence(None, tiny_dino, alpha=0.0, annotation_size="original")
    _assert_same(outputs["original"], reference.predict_pairs(samples), "original")
    assert any(not torch.equal(a["pred_kps"], b["pred_kps"]) for a, b in zip(outputs["original"], outputs["840"]))


def test_alpha_one_row_equals_a_separate_alpha_one_pipeline(
    tiny_sd, tiny_dino, ablation_run, reference_features, samples
) -> None:
    _, outputs, _, _ = ablation_run
    reference = FusedCorrespondence(tiny_sd, tiny_dino, alpha=1.0, pca_dims=(256,) * 3, annotation_size=224)
    _assert_same(outputs["alpha 1"], _reference(reference, reference_features, samples), "alpha 1")


# ----------------------------------------------------------------------------------------- pass counting


def test_each_image_is_extracted_once_per_variant(ablation_run, tiny_sd) -> None:
    ablation, outputs, unet_timesteps, vit_images = ablation_run
    assert list(outputs) == [row.name for row in ablation.rows]
    assert all(len(per_pair) == len(PAIRS) for per_pair in outputs.values())
    # 4 distinct images, 9 rows: 4 per variant, not 9 x 6 (rows x pair images)
    assert ablation.extraction_passes == {"sd:default": 4, "sd:t0": 4, "dino:default": 4}
    # what really ran: 4 windows (2x2 sliding) per image and SD variant, at the variant's timestep
    windows = 4
    assert sorted(set(unet_timesteps)) == [0, tiny_sd.timestep]
    assert unet_timesteps.count(tiny_sd.timestep) == unet_timesteps.count(0) == 4 * windows
    assert sum(vit_images) == 4


def test_unused_variants_are_neither_counted_nor_run(tiny_sd, tiny_dino) -> None:
    rows = [AblationRow("sd", dino=None), AblationRow("sd t0", sd="t0", dino=None)]
    ablation = AblationCorrespondence(rows, sd=tiny_sd, dino=tiny_dino, sd_variants={"t0": {"timestep": 0}, "t9": {"timestep": 9}})
    assert ablation.extraction_passes == {"sd:default": 0, "sd:t0": 0}  # no DINO row, "t9" unused
    assert ablation.used_variants == ["default", "t0"]


def test_a_variant_shares_the_weights(tiny_sd) -> None:
    variant = tiny_sd.variant(timestep=0, prompt="")
    assert variant.unet is tiny_sd.unet and variant.vae is tiny_sd.vae and variant.text_encoder is tiny_sd.text_encoder
    assert (variant.timestep, variant.prompt) == (0, "")
    assert (tiny_sd.timestep, tiny_sd.prompt) == (100, "a photo of {category}")  # the base is untouched
    layered = tiny_sd.variant(layers=[5])
    assert layered.layers == [5] and tiny_sd.layers == [2, 5, 8] and layered.unet is tiny_sd.unet


def test_a_variant_of_an_extra_model_shares_its_weights(tiny_sd, samples) -> None:
    """``of:`` varies one of ``sd_models`` (DIFT's settings on SD 2-1 in beyond_refinements.yaml)."""
    from lightning_modules.components import SDFeaturizer

    other = SDFeaturizer(model_id=None, random_init={"seed": 7, "architecture": "sd2"}, image_size=128,
                         sliding_window=False)
    settings = {"timestep": 261, "layers": [6], "ensemble_size": 2, "prompt": "a photo of a {category}"}
    ablation = AblationCorrespondence(
        [AblationRow("dift-like", sd="late", dino=None, pca_dims=None)], sd=tiny_sd, sd_models={"other": other},
        sd_variants={"late": {"of": "other", **settings}},
    )
    late = ablation.variants["late"]
    assert late.unet is other.unet and (late.timestep, late.layers, late.ensemble_size) == (261, [6], 2)
    assert other.timestep == 100 and other.layers == [2, 5, 8]  # the model itself is untouched
    expected = FusedCorrespondence(other.variant(**settings), None, alpha=1.0, pca_dims=None).predict_pairs(samples)
    _assert_same(ablation.predict_pairs(samples)["dift-like"], expected, "variant of an extra model")
    with pytest.raises(ValueError, match=r"sd_variants\['late'\] varies 'nope'.*\['default', 'other'\]"):
        AblationCorrespondence([AblationRow("a", dino=None)], sd=tiny_sd, sd_models={"other": other},
                               sd_variants={"late": {"of": "nope"}})


# ------------------------------------------------------------------------------------------------ errors


def test_duplicate_row_names(tiny_sd, tiny_dino) -> None:
    with pytest.raises(ValueError, match="row names must be unique"):
        AblationCorrespondence([AblationRow("a"), AblationRow("a", fusion="concat")], sd=tiny_sd, dino=tiny_dino)


def test_unknown_sd_variant(tiny_sd, tiny_dino) -> None:
    with pytest.raises(ValueError, match=r"row 'x' uses SD variant 't50'.*\['default', 't0'\]"):
        AblationCorrespondence(
            [AblationRow("x", sd="t50")], sd=tiny_sd, dino=tiny_dino, sd_variants={"t0": {"timestep": 0}}
        )


def test_dino_row_without_dino_featurizer(tiny_sd) -> None:
    with pytest.raises(ValueError, match=r"row 'fused' uses DINO"):
        AblationCorrespondence([AblationRow("fused")], sd=tiny_sd, dino=None)


def test_sd_row_without_sd_featurizer(tiny_dino) -> None:
    with pytest.raises(ValueError, match=r"row 'fused' uses SD"):
        AblationCorrespondence([AblationRow("fused")], sd=None, dino=tiny_dino)


def test_unknown_variant_field(tiny_sd) -> None:
    with pytest.raises(ValueError, match=r"cannot vary \['model_id'\]"):
        tiny_sd.variant(model_id="other/model")
    with pytest.raises(ValueError, match=r"cannot vary \['unet'\]"):
        AblationCorrespondence([AblationRow("a", dino=None)], sd=tiny_sd, sd_variants={"v": {"unet": None}})


def test_variant_timestep_out_of_range(tiny_sd) -> None:
    with pytest.raises(ValueError, match="timestep 5000 outside"):
        tiny_sd.variant(timestep=5000)


def test_row_layers_not_extracted_fail_at_start_up(tiny_sd, tiny_dino) -> None:
    with pytest.raises(ValueError, match=r"SD layers \[11\] were not extracted"):
        AblationCorrespondence([AblationRow("x", sd_layers=[11])], sd=tiny_sd, dino=tiny_dino)


def test_no_rows(tiny_sd) -> None:
    with pytest.raises(ValueError, match="at least one row"):
        AblationCorrespondence([], sd=tiny_sd)


# ------------------------------------------------------------------------------------- ablation_table


def _results(names: list[str]) -> dict:
    table = {name: {"0.01": 1.0 + i, "0.05": 12.345 + i, "0.1": 50.0 / 3 + i} for i, name in enumerate(names)}
    return {"title": "T", "average": "category_mean", "table": table,
            "extraction_passes": {"sd:default": 7, "dino:default": 7}}


def test_ablation_table_escapes_pipes_and_quotes_csv_names() -> None:
    names = ["a | b", "(F_SD, F_DINO)", "||F_SD||_2 + ||F_DINO||_2"]
    markdown, text = ablation_table(_results(names))
    lines = markdown.splitlines()
    assert lines[0] == "**T** (category_mean, percent)"
    assert lines[2] == "| setting | PCK@0.01 | PCK@0.05 | PCK@0.1 |"
    body = [line for line in lines if line.startswith("| ") and "PCK@" not in line]
    assert len(body) == 3
    for line, name, i in zip(body, names, range(3)):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]  # split on unescaped pipes only
        assert cells == [name.replace("|", "\\|"), f"{1.0 + i:.2f}", f"{12.345 + i:.2f}", f"{50 / 3 + i:.2f}"]
    assert "extraction passes: sd:default: 7, dino:default: 7" in markdown
    parsed = list(csv.reader(io.StringIO(text)))
    assert parsed[0] == ["setting", "PCK@0.01", "PCK@0.05", "PCK@0.1"]
    assert [row[0] for row in parsed[1:]] == names  # commas and pipes survive: names are quoted
    assert all(len(row) == 4 for row in parsed)
    assert text.splitlines()[2].startswith('"(F_SD, F_DINO)",')


def test_ablation_csv_round_trips_names_with_quotes() -> None:
    names = ['5" crop', "plain"]
    _, text = ablation_table(_results(names))
    assert [row[0] for row in list(csv.reader(io.StringIO(text)))[1:]] == names


# ------------------------------------------------------------------------------------------ end to end


def _category_mean(predictions: list[dict], alpha: float) -> float:
    """SPair's headline average from the predictions (strict error < alpha * threshold)."""
    per_cat: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for rec in predictions:
        per_cat[rec["category"]][0] += sum(
            math.dist(p, g) < alpha * rec["threshold"] for p, g in zip(rec["pred_kps"], rec["trg_kps"])
        )
        per_cat[rec["category"]][1] += len(rec["trg_kps"])
    return sum(100 * h / n for h, n in per_cat.values()) / len(per_cat)


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    return write_synthetic_spair(tmp_path_factory.mktemp("ablation_spair") / "spair", categories=("cat", "dog"),
                                 pairs_per_category=3)


def test_there_is_a_table_config() -> None:
    assert TINY.is_file() and TABLES, "configs/ablations/ must hold table configs besides tiny.yaml"
    named = {path for table in TABLES for path in _tiny_configs(table)}
    assert all(path.is_file() for path in named), sorted(named)
    for extra in ABLATIONS.glob("tiny_*.yaml"):  # every per-table tiny override is named by its table
        assert extra in named, f"{extra.name} is not named in any table config's smoke-run comment"


@pytest.mark.parametrize("table", TABLES, ids=lambda p: p.stem)
def test_every_ablation_config_runs_end_to_end(table, spair_root, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative paths in configs must not write into the repository
    out = tmp_path / "out"
    tiny = [arg for path in _tiny_configs(table) for arg in ("--config", str(path))]
    # 3 pairs per category (of the config's draw) instead of 20 keep the smoke run short
    cli = evaluate.main(["test", "--config", str(table), *tiny, "--data.root", str(spair_root),
                         "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--data.pairs_per_category", "3",
                         "--trainer.default_root_dir", str(out)])
    config = OmegaConf.to_container(OmegaConf.load(table), resolve=False)
    rows = config["model"]["init_args"]["rows"]
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names)) > 0

    # the evaluated pairs, independently of the datamodule
    data = config.get("data", {})
    if isinstance(data, str):  # the shared node, configs/data/spair_subset20.yaml
        data = OmegaConf.to_container(OmegaConf.load(table.parent / data))
    data_args = data.get("init_args", {})
    assert data_args.get("pairs_per_category") == 20 and data_args.get("seed") == 42
    assert data_args.get("subset_draw") == "reference"  # the paper's pairs: the reference's --SAMPLE draw
    dataset = SPairDataset(spair_root, pairs_per_category=3, seed=42, subset_draw="reference",
                           categories=data_args.get("categories"))
    assert [r.pair_id for r in dataset.records] == [r.pair_id for r in cli.datamodule.test_dataset.records]
    assert len(dataset) == 6
    # the run's feature cache extracts every distinct image once per variant, whatever the batching
    per_variant = len(dataset.image_paths)
    assert per_variant < 2 * len(dataset)  # the generated root shares images between pairs

    results = json.loads((out / "results.json").read_text())
    used_sd = {row.get("sd", "default") for row in rows} - {None}
    used_dino = {row.get("dino", "default") for row in rows} - {None, False}
    expected_passes = {**{f"sd:{v}": per_variant for v in used_sd}, **{f"dino:{v}": per_variant for v in used_dino}}
    # pose-aligned rows also extract each distinct source image's mirror with their variants
    sources = len({r.src_image_path for r in dataset.records})
    for row in rows:
        if row.get("pose_alignment"):
            for key in (f"sd:{row.get('sd', 'default')}", f"dino:{row.get('dino', 'default')}"):
                if key in expected_passes:
                    expected_passes[key] = per_variant + sources
    assert results["extraction_passes"] == expected_passes

    # ablation.csv: one line per row, in the config's order, 3 PCK columns
    assert (out / "ablation.md").is_file() and (out / "ablation.csv").is_file()
    parsed = list(csv.reader(io.StringIO((out / "ablation.csv").read_text())))
    assert parsed[0] == ["setting", "PCK@0.01", "PCK@0.05", "PCK@0.1"]
    assert [line[0] for line in parsed[1:]] == names
    assert results["average"] == "category_mean"
    assert list(results["table"]) == names
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == len(names) * len(dataset)
    assert sorted((p["row"], p["pair_id"]) for p in predictions) == sorted(
        (name, pair_id) for name in names for pair_id in dataset.pair_ids
    )
    markdown = (out / "ablation.md").read_text()
    for line in parsed[1:]:
        name, values = line[0], line[1:]
        assert len(values) == 3
        table_row = results["table"][name]
        assert list(table_row) == ["0.01", "0.05", "0.1"]
        assert values == [f"{table_row[a]:.2f}" for a in table_row]
        assert f"| {name.replace('|', chr(92) + '|')} | " + " | ".join(values) + " |" in markdown
        row_preds = [p for p in predictions if p["row"] == name]
        for alpha, value in table_row.items():
            assert results["rows"][name]["pck"][alpha]["category_mean"] == value
            assert value == pytest.approx(_category_mean(row_preds, float(alpha)), abs=1e-6)


def test_learned_projection_row_replaces_co_pca(tiny_sd, tiny_dino, samples, tmp_path) -> None:
    """Table 3's projection row: a saved per-layer linear map instead of co-PCA, checked by hand."""
    from lightning_modules.components.descriptors import DescriptorSpec, describe_pair
    from lightning_modules.components.features import extract_features

    torch.manual_seed(0)
    weights = {"2.weight": torch.randn(4, 32), "2.bias": torch.randn(4), "5.weight": torch.randn(4, 32),
               "8.weight": torch.randn(4, 16)}
    torch.save(weights, tmp_path / "proj.pt")
    (src, trg), _ = extract_features(tiny_sd, None, [samples[0]["src_image"], samples[0]["trg_image"]],
                                     ["cat"] * 2, torch.device("cpu"))
    spec = DescriptorSpec(alpha=1.0, pca_dims=None, layer_projection=str(tmp_path / "proj.pt"), sd_layers=(2,))
    got = describe_pair(src, trg, spec, tiny_sd.layers)
    raw = torch.stack([src.sd[0], trg.sd[0]])
    expected = torch.einsum("dc,nchw->ndhw", weights["2.weight"], raw) + weights["2.bias"].view(1, -1, 1, 1)
    assert torch.allclose(got, expected / expected.norm(dim=1, keepdim=True), atol=1e-5)
    row = AblationRow("proj", dino=None, pca_dims=None, layer_projection=str(tmp_path / "proj.pt"))
    ablation = AblationCorrespondence([row], sd=tiny_sd)
    assert len(ablation.predict_pairs(samples)["proj"]) == len(samples)
    torch.save({"2.weight": torch.randn(4, 7)}, tmp_path / "bad.pt")
    bad = DescriptorSpec(alpha=1.0, pca_dims=None, layer_projection=str(tmp_path / "bad.pt"), sd_layers=(2,))
    with pytest.raises(ValueError, match=r"bad.pt.*'2.weight' must be \[d, 32\]"):
        describe_pair(src, trg, bad, tiny_sd.layers)


def test_rows_batch_and_take_the_configured_matcher_like_the_pipeline(tiny_sd, tiny_dino, ablation_run,
                                                                       samples) -> None:
    """An ablation predicts through the pipeline's own prediction path (:mod:`.components.prediction`): its
    rows' co-PCA runs batched over the pairs and equals one pair at a time bit for bit, and a configured
    matcher reaches every row (before: each row described one pair at a time and always matched by nearest
    neighbours)."""
    from lightning_modules.components.features import feature_cache

    from test_pipeline_api import ShiftedNeighbours

    _, batched, _, _ = ablation_run  # the three pairs in one batch
    alone = AblationCorrespondence(ROWS, sd=tiny_sd, dino=tiny_dino, cache=feature_cache(1.0, None))
    singles = [alone.predict_pairs([s]) for s in samples]
    for row in ROWS:
        _assert_same([single[row.name][0] for single in singles], batched[row.name], f"{row.name}, one at a time")
    shifted = AblationCorrespondence(ROWS, sd=tiny_sd, dino=tiny_dino, cache=alone.cache,
                                     matcher=ShiftedNeighbours(dx=5.0)).predict_pairs(samples)
    for row in ROWS:
        if row.sd_layers is not None:
            continue  # a layer subset is a pipeline of another featurizer (test_layer_subset_row_...)
        pipeline = FusedCorrespondence(
            tiny_sd if row.sd else None, tiny_dino if row.dino else None, alpha=row.spec([2, 5, 8]).alpha,
            pca_dims=None if row.pca_dims is None else (row.pca_dims,) * 3,
            fusion=row.fusion, matcher=ShiftedNeighbours(dx=5.0), feature_cache_gb=0,
            # an SD-only row maps keypoints at the DINO size, as the reference
            annotation_size=alone.row_annotation_size(row),
        )
        _assert_same(shifted[row.name], pipeline.predict_pairs(samples), f"{row.name} with the matcher")
        moved = torch.stack([o["pred_kps"] for o in shifted[row.name]]) - torch.stack(
            [o["pred_kps"] for o in batched[row.name]])
        assert (moved[..., 0] > 0).all() and torch.allclose(moved[..., 1], torch.zeros_like(moved[..., 1]))


def test_the_ablation_takes_its_featurizers_from_the_pipeline_and_the_old_names_still_work(
        tiny_sd, tiny_dino, samples, ablation_run) -> None:
    """``model.pipeline`` holds an ablation's featurizers, cache, keypoint square and matcher, as for every other
    model (so ``configs/overlays/tiny.yaml`` serves the tables); ``model.sd`` / ``model.dino`` / ... still work
    for a while with a one-line notice and give the same table; a pipeline with a head or pose alignment, or
    both spellings at once, is refused."""
    from lightning_modules import ZeroShotAblation

    rows = [r for r in ROWS if r.sd_layers is None]
    pipeline = FusedCorrespondence(tiny_sd, tiny_dino, feature_cache_gb=1.0, annotation_size=224)
    new = ZeroShotAblation(rows, pipeline=pipeline)
    assert new.ablation.sd is tiny_sd and new.ablation.dino is tiny_dino and new.ablation.cache is pipeline.cache
    assert new.ablation.annotation_size == 224 and new.ablation.matcher is pipeline.matcher
    with pytest.warns(UserWarning, match=r"model\.sd, model\.dino, model\.eval_size of ZeroShotAblation moved "
                                         r"into its pipeline: write model\.pipeline\.sd, model\.pipeline\.dino, "
                                         r"model\.pipeline\.annotation_size"):
        old = ZeroShotAblation(rows, sd=tiny_sd, dino=tiny_dino, eval_size=224)
    got_old, got_new = old.ablation.predict_pairs(samples), new.ablation.predict_pairs(samples)
    for row in rows:
        _assert_same(got_old[row.name], got_new[row.name], f"{row.name}, old names")
    with pytest.raises(ValueError, match=r"model\.sd: give these as model\.pipeline\.sd only"):
        ZeroShotAblation(rows, pipeline=pipeline, sd=tiny_sd)
    with pytest.raises(ValueError, match="pose_alignment are not used there"):
        ZeroShotAblation(rows, pipeline=FusedCorrespondence(tiny_sd, tiny_dino, pose_alignment=True,
                                                            flip_pairs="spair"))


def test_the_kept_ablations_tiny_yaml_is_the_common_overlay() -> None:
    """``configs/ablations/tiny.yaml`` (the old smoke-run overlay users type) stays for a while, as the same
    overlay as ``configs/overlays/tiny.yaml``."""
    from omegaconf import OmegaConf as conf

    old, common = conf.load(ABLATIONS / "tiny.yaml"), conf.load(TINY)
    assert conf.to_container(old) == conf.to_container(common) == {
        "model": {"pipeline": {"sd": "../featurizers/tiny_sd.yaml", "dino": "../featurizers/tiny_dino.yaml"}}}


def test_a_row_names_its_co_pca_dims_as_the_pipeline_does_and_the_old_name_still_works() -> None:
    """``pca_dims`` (the pipeline's name): one number for every used layer or one per used layer; ``pca_dim``,
    the old name, keeps working for a while with a one-line notice (and its null still means no reduction)."""
    assert AblationRow("a", pca_dims=[64, 32, 16]).spec([2, 5, 8]).pca_dims == (64, 32, 16)
    with pytest.raises(ValueError, match=r"pca_dims \[64, 32\] must have one entry per used SD layer"):
        AblationRow("b", pca_dims=[64, 32]).spec([2, 5, 8]).layer_positions([2, 5, 8])
    with pytest.warns(FutureWarning, match="ablation row 'old': pca_dim is now pca_dims"):
        old = AblationRow("old", pca_dim=128)
    assert old.pca_dims == 128 and old.spec([2, 5, 8]).pca_dims == (128, 128, 128)
    with pytest.warns(FutureWarning):
        assert AblationRow("raw", pca_dim=None).spec([2, 5, 8]).pca_dims is None


def test_a_rows_renamed_annotation_size_and_layer_projection_keep_their_old_names_for_a_while() -> None:
    """``eval_size`` is now ``annotation_size`` (the paper's "annotation resolution", the pipeline's name) and
    ``projection`` is ``layer_projection`` (a fixed per-layer map, not the trained projection head): the old
    names still set the new fields, with a one-line notice each; unset, they say nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plain = AblationRow("plain", annotation_size=256, layer_projection="maps.pt")
    with pytest.warns(FutureWarning, match="ablation row 'old': eval_size is now annotation_size"):
        old_size = AblationRow("old", eval_size="original")
    with pytest.warns(FutureWarning, match="ablation row 'old': projection is now layer_projection"):
        old_map = AblationRow("old", projection="maps.pt", pca_dims=None)
    assert (plain.annotation_size, old_size.annotation_size) == (256, "original")
    assert old_map.spec([2, 5, 8]).layer_projection == plain.spec([2, 5, 8]).layer_projection == "maps.pt"
    assert AblationRow("none").spec([2, 5, 8]).layer_projection is None
