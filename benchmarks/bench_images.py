"""Cost of YoloDataModule's image check at setup (``verify_images``) per 1000 files, against decoding them.

Two kinds of files: the shapes generator's 160 px PNGs and 640x480 JPEGs (noise, quality 90, the size of a typical
photograph). Run: python benchmarks/bench_images.py [--quick] (or through benchmarks/run.py).
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import smoke  # noqa: E402


def _folders(root: Path, n: int) -> dict[str, Path]:
    import numpy as np
    from PIL import Image

    from xaiwatch.data import generate

    generate(root / "shapes", num_train=min(n, 50), num_val=1, imgsz=160)
    sources = sorted((root / "shapes" / "images" / "train").glob("*.png"))
    png, jpg = root / "png", root / "jpg"
    png.mkdir()
    jpg.mkdir()
    for i in range(n):
        shutil.copyfile(sources[i % len(sources)], png / f"{i:05d}.png")
    noise = (np.random.default_rng(0).random((480, 640, 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(jpg / "00000.jpg", quality=90)
    for i in range(1, n):
        shutil.copyfile(jpg / "00000.jpg", jpg / f"{i:05d}.jpg")
    return {"PNG 160 px (shapes)": png, "JPEG 640x480, q90": jpg}


def bench_images(n: int | None = None) -> dict:
    """Seconds per 1000 files of ``verify_images`` (median of 3) and of a full decode (of a fifth of the files)."""
    import numpy as np
    from PIL import Image

    from xaiwatch.data.yolo import verify_images

    n = n or (100 if smoke() else 1000)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in _folders(Path(tmp), n).items():
            paths = sorted(folder.iterdir())
            runs = []
            for _ in range(1 if smoke() else 3):
                start = time.perf_counter()
                verify_images(paths)
                runs.append(time.perf_counter() - start)
            sample = paths[: max(1, n // 5)]
            start = time.perf_counter()
            for p in sample:
                with Image.open(p) as im:
                    np.asarray(im.convert("RGB"))
            decode = (time.perf_counter() - start) / len(sample) * 1000
            results[name] = {
                "KiB per file": sum(p.stat().st_size for p in paths) / len(paths) / 1024,
                "verify seconds per 1000 files": statistics.median(runs) / n * 1000,
                "decode seconds per 1000 files": decode,
            }
    return results


if __name__ == "__main__":
    if "--quick" in sys.argv:
        os.environ["XAIWATCH_BENCH_SMOKE"] = "1"
    print(json.dumps(bench_images(), indent=1))
