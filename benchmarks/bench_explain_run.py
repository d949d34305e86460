"""Cost of one ExplainCallback run in the demo configuration, split into compute and drawing, with a profile.

The demo's ExplainCallback (callbacks/demo.yaml: saliency + LayerCAM at neck.p3, 8 probes, YOLOv8n at 160 px) is
set up by a one-epoch demo fit (32 train / 100 val shapes images, batch 16); then its two halves are timed on
their own, each the median of ``repeat`` runs:

- ``compute``: ``_run`` on the training thread (detections and both methods' maps of every probe);
- ``drawing and writing``: ``_write`` on rank zero's writer thread (every panel drawn, PNG-encoded and written);
- ``explaining() entry``: one ``with explaining(model)`` on the demo model, outermost and nested, and how many
  entries one run makes;
- both halves also in CPU seconds of the process (``time.process_time``), steadier when other work shares the cores.

``--profile`` adds the top functions (cumulative seconds) of one compute and one writing run (cProfile).
Run: python benchmarks/bench_explain_run.py [--quick] [--profile] [--out DIR] (writes DIR/explain_run.json).
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from run import smoke, timeit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _demo_explain_callback(tmp: Path):
    """The demo's ExplainCallback after a one-epoch demo fit, and the trainer (its writer stays usable)."""
    from bench_damo import timed_demo_fit

    from xaiwatch.callbacks import ExplainCallback, load_callbacks
    from xaiwatch.data import generate

    data = generate(tmp / "data", num_train=32, num_val=100, imgsz=160, seed=0)
    (cb,) = [c for c in load_callbacks(ROOT / "callbacks" / "demo.yaml") if isinstance(c, ExplainCallback)]
    cb.filmstrip = False
    if smoke():
        cb.num_probe = 2
    _, trainer = timed_demo_fit(data, "yolov8n.yaml", [cb], 1, tmp, "explain_run")
    return cb, trainer


def _entries(fn) -> int:
    """How many times ``fn()`` enters the explaining context (outermost or nested)."""
    from xaiwatch.core import context

    count = [0]
    original = context.fork_rng

    def counting(*args, **kwargs):
        count[0] += 1
        return original(*args, **kwargs)

    context.fork_rng = counting
    try:
        fn()
    finally:
        context.fork_rng = original
    return count[0]


def _profile(fn, top: int = 25) -> str:
    prof = cProfile.Profile()
    prof.enable()
    fn()
    prof.disable()
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def bench_explain_run(repeat: int = 5, profile: bool = False) -> dict:
    """Seconds of one run's compute and drawing (medians), the explaining() entry cost and the entries per run.

    Args:
        repeat: runs per median (1 in the smoke run).
        profile: also return the cProfile top functions of one compute and one writing run.

    Returns:
        A dict of the figures (and ``"profile"`` text when asked).
    """
    from xaiwatch.callbacks.base import RunContext
    from xaiwatch.core.context import explaining

    with tempfile.TemporaryDirectory() as tmp:
        cb, trainer = _demo_explain_callback(Path(tmp))
        model = cb._adapter.model
        ctx = RunContext(step=int(trainer.global_step), epoch=1, stage="fit", device=torch.device("cpu"))
        share = list(range(len(cb.indices)))
        record = cb._run(share, ctx)
        pictures = sum(1 for p in record.items for _ in cb._pictures(p[0], p[1], p[2], p[3], ctx))

        def outermost() -> None:
            with explaining(model):
                pass

        def nested() -> None:
            with explaining(model):
                for _ in range(10):
                    with explaining(model):
                        pass

        def cpu(fn) -> float:
            """Median CPU seconds of ``fn`` (this process, every thread): steadier than wall time on a busy machine."""
            times = []
            for _ in range(1 if smoke() else repeat):
                start = time.process_time()
                fn()
                times.append(time.process_time() - start)
            return sorted(times)[len(times) // 2]

        rows = {
            "probes": len(share),
            "compute CPU seconds per run": cpu(lambda: cb._run(share, ctx)),
            "drawing and writing CPU seconds per run": cpu(lambda: cb._write(record, ctx)),
            "pictures per run": pictures,
            "compute seconds per run": timeit(lambda: cb._run(share, ctx), repeat),
            "drawing and writing seconds per run": timeit(lambda: cb._write(record, ctx), repeat),
            "explaining() entries per run": _entries(lambda: cb._run(share, ctx)),
            "explaining() outermost entry ms": 1000 * timeit(outermost, 3 * repeat),
            "explaining() nested entry ms": 100 * (timeit(nested, 3 * repeat) - timeit(outermost, 3 * repeat)),
        }
        start = time.perf_counter()
        cb._write(record, ctx)
        rows["drawing seconds per picture"] = (time.perf_counter() - start) / max(1, pictures)
        if profile:
            rows["profile"] = {
                "compute": _profile(lambda: cb._run(share, ctx)),
                "drawing and writing": _profile(lambda: cb._write(record, ctx)),
            }
        cb._writer.flush()
    return rows


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 probes, one repeat")
    parser.add_argument("--profile", action="store_true", help="print the cProfile top functions")
    parser.add_argument("--out", default="bench_output", help="folder of explain_run.json")
    args = parser.parse_args()
    if args.quick:
        os.environ["XAIWATCH_BENCH_SMOKE"] = "1"
    torch.set_num_threads(1)
    result = bench_explain_run(profile=args.profile)
    for name, text in result.pop("profile", {}).items():
        print(f"==== {name}\n{text}")
    for name, value in result.items():
        print(f"{name}: {value:.4g}" if isinstance(value, float) else f"{name}: {value}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "explain_run.json").write_text(json.dumps(result, indent=1))
