"""Peak memory (RSS) and time to read one large user photo, the way own images read it (issue 26).

Writes a generated JPEG (default 10,000 x 10,000: 100 megapixels, a smooth picture saved at quality 90), then
runs each way of reading it in a FRESH process (its own peak RSS, measured with ``resource.getrusage``; the
process's RSS after the imports is reported apart):

- ``check_whole`` / ``check_draft``: the up-front check of a pairs file or folder (every byte decoded, which
  finds a truncated file): before issue 26 the whole image was decoded, now a JPEG is decoded at 1/8 scale;
- ``load_whole``: :func:`lightning_modules.components.image_prep.load_rgb_image` with ``upright=True``, the
  whole image as an RGB tensor (how every user image was read before);
- ``load_downscaled``: :func:`~lightning_modules.components.image_prep.load_user_image` with a long side of
  1920 px (twice the largest input of the paper's featurizers, SD at 960 px): ``Image.draft`` decodes the JPEG
  at 1/4 scale, then a LANCZOS resize to 1920 px;
- ``command_pair``: what the own-images command does with a pair of this photo (source and target the same
  file): :func:`datamodules.own_images.read_image_pairs` (the up-front check) and one item of
  :class:`datamodules.own_images.ImagePairsDataset` (``--data.max_side``, both images read downscaled).

Usage::

    python benchmarks/user_photo_load.py [--megapixels 100] [--max-side 1920] [--repeats 3]

Prints one line per way (median time of ``--repeats`` fresh processes, the largest peak RSS) and, with
``--out``, writes them as JSON. See ``benchmarks/README.md`` for the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WAYS = ("imports", "check_whole", "check_draft", "load_whole", "load_downscaled", "command_pair")


def _write_photo(path: Path, megapixels: float) -> tuple[int, int]:
    import numpy as np
    from PIL import Image

    side = int(round((megapixels * 1e6) ** 0.5))
    rng = np.random.default_rng(0)
    coarse = Image.fromarray(rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8))
    Image.MAX_IMAGE_PIXELS = None
    coarse.resize((side, side), Image.Resampling.BILINEAR).save(path, quality=90)
    return side, side


def _child(way: str, path: str, max_side: int) -> None:
    """One way of reading the photo; prints ``{"seconds", "rss_after_imports_mb", "peak_rss_mb"}``."""
    import resource
    import warnings

    sys.path.insert(0, str(REPO))
    from PIL import Image

    from datamodules.own_images import ImagePairsDataset, read_image_pairs
    from lightning_modules.components.image_prep import load_rgb_image, load_user_image, open_user_image

    def rss_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux

    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    base = rss_mb()
    start = time.perf_counter()
    if way == "check_whole":
        with open_user_image(path) as image:
            image.load()
    elif way == "check_draft":
        with open_user_image(path) as image:
            image.draft("RGB", (image.width // 8, image.height // 8))
            image.load()
    elif way == "load_whole":
        load_rgb_image(path, upright=True)
    elif way == "load_downscaled":
        load_user_image(path, max_side)
    elif way == "command_pair":
        pairs = Path(path).with_suffix(".json")
        pairs.write_text(json.dumps([{"source": Path(path).name, "target": Path(path).name}]))
        ImagePairsDataset(read_image_pairs(pairs=str(pairs)), max_side=max_side)[0]
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "rss_after_imports_mb": base, "peak_rss_mb": rss_mb()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megapixels", type=float, default=100.0)
    parser.add_argument("--max-side", type=int, default=1920)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", nargs=2, metavar=("WAY", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.max_side)
        return
    results = {"machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        photo = Path(tmp) / "photo.jpg"
        start = time.perf_counter()
        size = _write_photo(photo, args.megapixels)
        results["photo"] = {"size": size, "megapixels": size[0] * size[1] / 1e6,
                            "file_mb": photo.stat().st_size / 2**20, "write_seconds": time.perf_counter() - start}
        print(f"photo: {size[0]}x{size[1]} ({size[0] * size[1] / 1e6:.1f} MP), "
              f"{results['photo']['file_mb']:.1f} MiB JPEG")
        for way in WAYS:
            runs = [json.loads(subprocess.run(
                [sys.executable, __file__, "--max-side", str(args.max_side), "--child", way, str(photo)],
                check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
                for _ in range(args.repeats)]
            row = {"seconds": statistics.median(r["seconds"] for r in runs),
                   "rss_after_imports_mb": max(r["rss_after_imports_mb"] for r in runs),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}
            results[way] = row
            print(f"{way:16s} {row['seconds']:7.2f} s   peak RSS {row['peak_rss_mb']:7.0f} MiB "
                  f"(after imports {row['rss_after_imports_mb']:.0f} MiB, "
                  f"+{row['peak_rss_mb'] - row['rss_after_imports_mb']:.0f} MiB)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
