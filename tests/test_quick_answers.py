"""A wrong input path is answered before the heavy imports (issue 26, "answer fast").

``cli.run_script`` checks the files and folders that the command line's own-images data names before it imports
torch and Lightning (which import torchmetrics, which imports transformers); the featurizers import diffusers and
transformers only when a model is built. No timing here: the tests check what was imported when the error came,
in a fresh interpreter, and that the message is the one the full check (as the CLI loads) gives.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli import check_inputs_early
from datamodules.own_images import ImagePairsDataModule, write_example_photos

from conftest import CONFIGS, REPO

HEAVY = ("diffusers", "transformers", "torch", "lightning")

#: Runs evaluate.py as ``python evaluate.py ARGS`` would, then prints which heavy modules had been imported.
_RUN = """
import json, runpy, sys
sys.argv = ["evaluate.py", *json.loads(sys.argv[1])]
try:
    runpy.run_path("evaluate.py", run_name="__main__")
except SystemExit as stop:
    code = stop.code
else:
    code = 0
print(json.dumps({"code": code, "imported": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _run(*args: str) -> tuple[dict, str]:
    done = subprocess.run([sys.executable, "-c", _RUN, json.dumps(list(args))], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr


def test_a_missing_source_is_reported_before_diffusers_transformers_torch_or_lightning_load(tmp_path) -> None:
    (tmp_path / "targets").mkdir()
    outcome, err = _run("predict", "--config", str(CONFIGS / "match.yaml"), "--data.source", str(tmp_path / "missing.jpg"),
                        "--data.targets", str(tmp_path / "targets"))
    assert outcome["code"] == 1
    assert f"error: data.source: no such image file {tmp_path / 'missing.jpg'}" in err
    assert outcome["imported"] == []  # diffusers and transformers above all; torch and Lightning neither


def test_a_missing_targets_folder_or_pairs_file_is_reported_as_early(tmp_path) -> None:
    photos = write_example_photos(tmp_path / "photos")
    outcome, err = _run("predict", "--config", str(CONFIGS / "match.yaml"), "--data.source",
                        str(photos.parent / "source.png"), "--data.targets=" + str(tmp_path / "nope"))
    assert outcome == {"code": 1, "imported": []}
    assert f"data.targets: no such folder {tmp_path / 'nope'}" in err
    config = tmp_path / "mine.yaml"  # the path given in a config file rather than on the command line
    config.write_text(f"data:\n  init_args:\n    pairs: {tmp_path / 'typo.json'}\n")
    outcome, err = _run("predict", "--config", str(CONFIGS / "match.yaml"), "--config", str(config))
    assert outcome == {"code": 1, "imported": []}
    assert f"pairs file not found: {tmp_path / 'typo.json'}" in err


@pytest.mark.parametrize("init_args", [
    {"source": "missing.jpg", "targets": "."},
    {"source": "{photos}/source.png", "targets": "{photos}/nope"},
    {"pairs": "{photos}/typo.json"},
])
def test_the_early_message_is_the_one_the_full_check_gives(tmp_path, init_args) -> None:
    photos = write_example_photos(tmp_path / "photos").parent
    init_args = {k: v.format(photos=photos) for k, v in init_args.items()}
    with pytest.raises(FileNotFoundError) as full:
        ImagePairsDataModule.check_inputs(**init_args)
    args = ["predict", "--config", str(CONFIGS / "match.yaml")]
    for key, value in init_args.items():
        args += [f"--data.{key}", value]
    with pytest.raises(FileNotFoundError) as early:
        check_inputs_early(args)
    assert str(early.value) == str(full.value)


def test_what_the_early_check_cannot_read_simply_is_left_to_the_cli(tmp_path) -> None:
    match = str(CONFIGS / "match.yaml")
    check_inputs_early(["predict", "--config", match, "--data.source", "${oc.env:NOWHERE}", "--data.targets", "."])
    check_inputs_early(["predict", "--config", match, "--data", "{class_path: datamodules.ImagePairsDataModule}"])
    check_inputs_early(["predict", "--config", match, "--data.source", "missing.jpg", "--data.targets", ".", "--help"])
    check_inputs_early(["predict", "--config", str(tmp_path / "no_such_config.yaml")])  # jsonargparse names it
    # another datamodule's `source` is not a photo path
    check_inputs_early(["test", "--config", str(CONFIGS / "demo.yaml"), "--data.init_args.source", "missing.jpg"])


def test_the_lazy_names_of_cli_are_the_lightning_ones() -> None:
    import cli
    from callbacks import preemption
    from lightning.pytorch.cli import LightningCLI

    assert cli.SIGTERM_EXIT == preemption.SIGTERM_EXIT
    assert issubclass(cli.SDDinoCLI, LightningCLI) and cli.SDDinoCLI is cli.SDDinoCLI


def test_a_misspelt_data_field_is_reported_as_early_with_the_options(tmp_path) -> None:
    outcome, err = _run("predict", "--config", str(CONFIGS / "match.yaml"), "--data.sourc", "a.jpg", "--data.targets", ".")
    assert outcome == {"code": 2, "imported": []}  # a parse error, as jsonargparse's own
    assert "data.sourc: datamodules.ImagePairsDataModule has no option 'sourc'" in err and "source_keypoints" in err


def test_the_plain_torch_core_imports_neither_lightning_nor_diffusers_nor_transformers() -> None:
    code = ("import sys\nfrom lightning_modules.components import SDFeaturizer, DinoFeaturizer, CLIPImageEmbedder, "
            "FusedCorrespondence\n"
            "print([m for m in ('lightning', 'torchmetrics', 'diffusers', 'transformers') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.stdout.strip() == "[]", done.stderr
    # the LightningModules are still where they were (imported on first use)
    import lightning_modules
    from lightning_modules.zero_shot import ZeroShotCorrespondence

    assert lightning_modules.ZeroShotCorrespondence is ZeroShotCorrespondence
    assert set(lightning_modules.__all__) <= set(dir(lightning_modules))


def test_the_clip_constants_written_out_are_transformers_own() -> None:
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    from lightning_modules.components import clip_features

    assert list(clip_features.OPENAI_CLIP_MEAN) == list(OPENAI_CLIP_MEAN)
    assert list(clip_features.OPENAI_CLIP_STD) == list(OPENAI_CLIP_STD)
