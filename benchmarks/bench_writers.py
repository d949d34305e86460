"""What writing to TensorBoard costs: event-record checksums and PROJECTOR files, ours against tensorboard's own.

- Event records: the demo's explanation pictures (1160 x 630 px PNGs) written through a ``SummaryWriter``, with
  tensorboard's pure-Python CRC-32C (its stub without TensorFlow) and with :func:`xaiwatch.logging.
  fast_event_checksums` (google-crc32c, byte-identical files); floor: the same records with no checksum.
- PROJECTOR: one layer's embedding of the demo (600 boxes x 256 dims, 32 px thumbnails) with
  ``SummaryWriter.add_embedding`` and with :func:`xaiwatch.logging.projector.write_embedding` (the same files).

Run: python benchmarks/bench_writers.py [--quick] (or through benchmarks/run.py).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import smoke  # noqa: E402


def _best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _pictures(n: int) -> list[bytes]:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:400, 0:400] / 400.0
    out = []
    for i in range(n):  # a white panel, an image and a smooth heat map with a little noise: ~0.2 MB, as the demo's
        picture = np.full((630, 1160, 3), 255, np.uint8)
        heat = np.stack([xx, yy, (xx + yy + i / n) % 1.0], axis=-1) * 255
        picture[100:500, 600:1000] = (heat + rng.normal(0, 3, heat.shape)).clip(0, 255).astype(np.uint8)
        picture[100:500, 100:500] = (rng.random((400, 400, 1)) * 8 + 120).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(picture).save(buffer, format="PNG", compress_level=1)
        out.append(buffer.getvalue())
    return out


def _write_events(folder: Path, pngs: list[bytes]) -> None:
    from tensorboard.compat.proto.summary_pb2 import Summary
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(folder)) as sw:
        for step, png in enumerate(pngs):
            image = Summary.Image(height=630, width=1160, colorspace=3, encoded_image_string=png)
            sw._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="explain/x", image=image)]), step)


def bench_writers(quick: bool = False) -> dict:
    import torch
    from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
    from tensorboard.summary.writer import record_writer
    from torch.utils.tensorboard import SummaryWriter

    from xaiwatch.logging import fast_event_checksums
    from xaiwatch.logging.projector import write_embedding

    repeat = 1 if quick else 3
    pngs = _pictures(4 if quick else 16)
    megabytes = sum(len(p) for p in pngs) / 1e6
    rows: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        counter = iter(range(10**6))

        def events() -> None:
            _write_events(root / f"ev{next(counter)}", pngs)

        def with_crc(crc) -> float:
            kept = record_writer.masked_crc32c
            record_writer.masked_crc32c = crc
            try:
                return _best(events, repeat)
            finally:
                record_writer.masked_crc32c = kept

        python_crc = with_crc(pywrap_tensorflow.masked_crc32c)
        raw = with_crc(lambda data: 0)  # the floor: the same records without a checksum
        fast_event_checksums()
        c_crc = _best(events, repeat)
        label = f"{len(pngs)} pictures of 1160 x 630 px ({megabytes:.1f} MB of PNG)"
        rows[f"event records, {label}"] = {
            "tensorboard's Python CRC s": python_crc,
            "ours (C CRC) s": c_crc,
            "floor (no checksum) s": raw,
            "ours x floor": c_crc / raw,
            "tensorboard x ours": python_crc / c_crc,
        }

        n, dims, side = (60, 32, 16) if quick else (600, 256, 32)
        gen = torch.Generator().manual_seed(0)
        features, thumbnails = torch.randn(n, dims, generator=gen), torch.rand(n, 3, side, side, generator=gen)
        metadata = [[f"class {i % 3}", "gt", "GT detected", "0.9", str(i), "3"] for i in range(n)]
        header = ["class", "source", "outcome", "score", "image", "epoch"]

        def theirs() -> None:
            with SummaryWriter(str(root / f"emb{next(counter)}")) as sw:
                sw.add_embedding(
                    features, metadata=metadata, label_img=thumbnails, global_step=3, tag="p", metadata_header=header
                )

        def ours() -> None:
            write_embedding(root / f"emb{next(counter)}", "p", 3, features, metadata, header, thumbnails)

        t_theirs, t_ours = _best(theirs, repeat), _best(ours, repeat)
        rows[f"PROJECTOR, {n} points x {dims} dims, {side} px thumbnails"] = {
            "add_embedding s": t_theirs,
            "ours s": t_ours,
            "add_embedding x ours": t_theirs / t_ours,
        }
    return rows


if __name__ == "__main__":
    print(json.dumps(bench_writers(smoke()), indent=1))
