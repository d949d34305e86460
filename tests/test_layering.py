"""Layering: below the callbacks nothing imports Lightning; Captum and pyplot load only when needed."""

from __future__ import annotations

import subprocess
import sys

LIB = [
    "xaiwatch",
    "xaiwatch.core",
    "xaiwatch.adapters",
    "xaiwatch.targets",
    "xaiwatch.explain",
    "xaiwatch.render",
    "xaiwatch.logging",
    "xaiwatch.features",
    "xaiwatch.analysis",
    "xaiwatch.checks",
]


def test_imports_without_lightning():
    code = (
        "import sys; sys.modules['pytorch_lightning'] = None; sys.modules['lightning'] = None\n"
        f"import {', '.join(LIB)}\n"
        "assert 'captum' not in sys.modules, 'captum imported eagerly'\n"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported'\n"
        "assert 'ultralytics' not in sys.modules, 'ultralytics imported eagerly'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_rendering_does_not_load_pyplot():
    """Rendering uses Figure + Agg only. (Running a Captum engine does load pyplot: ``captum.attr`` imports its
    visualisation module eagerly; that is why Captum is imported only when an engine runs.)"""
    code = (
        "import sys, torch\n"
        "sys.path.insert(0, 'tests')\n"
        "from conftest import tiny_cfg\n"
        "from ultralytics.nn.tasks import DetectionModel\n"
        "from xaiwatch.adapters import YOLOv8Adapter\n"
        "from xaiwatch.targets import ClassTarget\n"
        "from xaiwatch.render import explanation_panel\n"
        "a = YOLOv8Adapter(DetectionModel(tiny_cfg(), nc=3, verbose=False).eval())\n"
        "x = torch.rand(1, 3, 64, 64)\n"
        "m = torch.autograd.grad(a.score(x.requires_grad_(), ClassTarget(0)).sum(), x)[0].abs().amax(1)\n"
        "dets = a.detect(x.detach())\n"
        "pic = explanation_panel(x[0].detach(), m, detections=dets[0], tracked_box=[1, 1, 9, 9])\n"
        "assert pic.ndim == 3 and pic.shape[2] == 3 and pic.dtype.name == 'uint8'\n"
        "assert 'matplotlib.pyplot' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_top_level_lazy_exports():
    import xaiwatch
    from xaiwatch.callbacks import ExplainCallback

    assert xaiwatch.ExplainCallback is ExplainCallback
    assert set(xaiwatch.__all__) <= set(dir(xaiwatch))
    try:
        xaiwatch.NoSuchThing  # noqa: B018
    except AttributeError as err:
        assert "NoSuchThing" in str(err)
    else:
        raise AssertionError("unknown attribute did not raise")
