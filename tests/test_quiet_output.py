"""A normal run prints the project's output alone (issue 26, "quiet output").

No Lightning "Tip" adverts (litlogger, litmodels), no torch ``_pytree`` FutureWarning raised from Lightning's
``_pytree``, no NumPy "not writable" warning, and ONE results table: the run's own (Lightning's metric table
after it is off, ``verbose: false`` in ``configs/defaults/test.yaml``), while a logger still gets every metric.
"""

from __future__ import annotations

import csv
import logging
import subprocess
import sys
import warnings

from cli import quiet_third_party

from conftest import CONFIGS, REPO

NOISE = ("💡 Tip", "litlogger", "litmodels", "LeafSpec", "_pytree", "is not writable", "Test metric", "┏")


def test_the_demo_prints_one_results_table_and_no_third_party_noise(tmp_path) -> None:
    run = tmp_path / "run"
    done = subprocess.run(
        [sys.executable, "evaluate.py", "test", "--config", str(CONFIGS / "demo.yaml"),
         "--trainer.default_root_dir", str(run),
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.init_args.save_dir", str(run / "csv")],
        cwd=REPO, capture_output=True, text=True, timeout=900,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-3000:]
    assert [text for text in NOISE if text in output] == []
    assert sum(line.startswith("SPair-71k ") and "@0.1" in line for line in output.splitlines()) == 1
    # the logger still receives the metrics the table no longer prints
    (metrics,) = run.joinpath("csv").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    assert any(row.get("pck@0.1/category_mean") for row in rows)


def test_only_those_messages_are_silenced(caplog) -> None:
    quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging ...")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_third_party()  # its filters go in front of "always"
        here = {"__name__": "lightning.pytorch.utilities._pytree"}
        exec("import warnings\nwarnings.warn('`isinstance(treespec, LeafSpec)` is deprecated, use ...', FutureWarning)", here)
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)  # elsewhere: shown
        warnings.warn("another FutureWarning", FutureWarning)
    assert [str(w.message) for w in caught] == ["`isinstance(treespec, LeafSpec)` is deprecated, use ...",
                                                "another FutureWarning"]


def test_a_pil_image_or_read_only_array_is_converted_without_the_numpy_not_writable_warning() -> None:
    # np.asarray(PIL image) is read-only; torch.from_numpy of it warned on every Python call (fixed in cac5319)
    import numpy as np
    from PIL import Image

    from lightning_modules.components.pipeline import as_image_tensor

    picture = Image.new("RGB", (8, 6), (10, 20, 30))
    read_only = np.asarray(picture)
    assert not read_only.flags.writeable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for image in (picture, read_only):
            tensor = as_image_tensor(image)
            assert tuple(tensor.shape) == (3, 6, 8) and tensor[:, 0, 0].tolist() == [10, 20, 30]
