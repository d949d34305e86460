"""``xaiwatch demo --real`` hands its options to ``run_real_demo`` with the real demo's own defaults."""

from __future__ import annotations

import pytest

import xaiwatch.demo_real
from xaiwatch.cli import main
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.demo_real import real_module, run_real_demo


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    seen: list[dict] = []
    monkeypatch.setattr(xaiwatch.demo_real, "run_real_demo", lambda **kw: seen.append(kw))
    return seen


def test_real_flag_defaults(calls: list[dict]) -> None:
    assert main(["demo", "--real"]) == 0
    assert calls == [
        {
            "model": "yolov8n-abd",
            "preset": None,
            "out": "demo_real_output",
            "epochs": 8,
            "imgsz": 224,
            "batch_size": 8,
            "seed": 0,
            "accelerator": "auto",
        }
    ]


def test_real_flag_options(calls: list[dict]) -> None:
    main(["demo", "--real", "--real-model", "yolov8s-fall", "--epochs", "2", "--imgsz", "160", "--out", "x"])
    assert {k: calls[0][k] for k in ("model", "epochs", "imgsz", "out", "batch_size")} == {
        "model": "yolov8s-fall",
        "epochs": 2,
        "imgsz": 160,
        "out": "x",
        "batch_size": 8,
    }


def test_unknown_real_model(tmp_path) -> None:
    with pytest.raises(ConfigurationError, match=r"`model` must be one of \['yolov8n', 'yolov8n-abd'"):
        real_module("yolov8x-coco")
    with pytest.raises(ConfigurationError, match="`model` must be one of"):
        run_real_demo(tmp_path, model="nope")
    assert not any(tmp_path.iterdir())  # refused before writing anything
