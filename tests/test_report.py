"""`xaiwatch report`: one HTML page built from a real short run's event files, checked against the scalars."""

from __future__ import annotations

import base64
import html
import io
import re

import pytest
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from conftest import SquaresDataset, collate, tiny_cfg
from xaiwatch.cli import main
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.report import MARKER, build_report, load_run, parse_thresholds, write_report

EPOCHS = 2


def short_run(root, epochs=EPOCHS, explain_kw=None):
    """Train the tiny YOLO for ``epochs`` epochs with ExplainCallback, SaliencyGate and ProjectionCallback."""
    from xaiwatch.callbacks import ExplainCallback, ProjectionCallback, SaliencyGate
    from xaiwatch.models import YOLOv8Module

    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)
    callbacks = [
        ExplainCallback(methods=["saliency"], num_probe=2, on_error="raise", **(explain_kw or {})),
        SaliencyGate(num_probe=2, mode="warn", on_error="raise"),
        ProjectionCallback(layers=["neck.p3"], method="pca", on_error="raise"),
    ]
    trainer = pl.Trainer(
        max_epochs=epochs,
        limit_train_batches=1,
        logger=TensorBoardLogger(str(root), name="tb"),
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        log_every_n_steps=1,
        accelerator="cpu",
    )
    train = DataLoader(SquaresDataset(8, 0), batch_size=8, collate_fn=collate)
    val = DataLoader(SquaresDataset(4, 1), batch_size=4, collate_fn=collate)
    trainer.fit(module, train, val)
    return trainer.logger.log_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return short_run(tmp_path_factory.mktemp("report"))


def _images(text):
    return re.findall(
        r'<img alt="[^"]*"((?: data-[a-z]+="[^"]*")*) src="data:image/(?:png|jpeg);base64,([^"]+)">', text
    )


def test_report_holds_every_picture_curve_and_gate_value(run_dir, tmp_path):
    out = write_report(run_dir, tmp_path / "report.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>\n" + MARKER)
    run = load_run(run_dir)
    images = _images(text)
    assert len(images) == text.count("<img ")
    for _, data in images:  # every inlined picture decodes
        assert Image.open(io.BytesIO(base64.b64decode(data))).size[0] > 100
    tagged = [dict(re.findall(r'data-([a-z]+)="([^"]*)"', attrs)) for attrs, _ in images]
    pictures = [(t["tag"], int(t["step"])) for t in tagged if "tag" in t]
    expected = []
    for tag, events in run.images.items():
        keep = events if not tag.startswith("explain/") or len(events) <= 2 else [events[0], events[-1]]
        keep = keep[-1:] if tag.startswith("explain_filmstrip/") else keep
        expected += [(tag, e[0]) for e in keep]
    assert sorted(pictures) == sorted(expected)
    assert {t for t, _ in pictures} == set(run.images)  # every image tag is in the report
    assert any(t.startswith("projection/") for t, _ in pictures)
    plots = [t["plot"] for t in tagged if "plot" in t]
    subjects = {t.split("/")[-1] for t in run.images if t.startswith("explain/")}
    assert sorted(plots) == sorted(["curves"] + [f"score_{s}" for s in subjects])
    assert len(images) == len(expected) + len(plots)
    # the gate table: one row per decided epoch, each cell the logged scalar
    verdicts = run.scalar("saliency/gate_pass")
    assert [run.epoch(s) for s, _ in verdicts] == list(range(1, EPOCHS + 1))  # on the global-step axis
    for key in ("saliency/energy_in_box/saliency", "saliency/context_reliance"):
        for _, value in run.scalar(key):
            assert f">{value:.4g}</td>" in text
    thresholds = parse_thresholds(run.texts["saliency/gate_reason"])
    if thresholds:  # the header names each gated check's threshold as it was logged
        for key, condition in thresholds.items():
            assert html.escape(f"{key} ({condition})") in text
    unsure = {s for s, v in run.scalar("saliency/gate_inconclusive") if v >= 0.5}
    for step, ok in verdicts:  # an inconclusive epoch (no detected object) is said so, not "FAILED"
        assert ("passed" if ok else "inconclusive" if step in unsure else "FAILED") in text
    last_step, last_ok = verdicts[-1]  # the banner's colour: green, amber (inconclusive) or red
    banner = "ok" if last_ok else "unsure" if last_step in unsure else "bad"
    assert f'<div class="verdict {banner}">' in text
    from xaiwatch.report.build import verdict_groups

    groups = verdict_groups(run)  # the curve's markers: each decided epoch in exactly one group
    assert sorted(groups["passed"] + groups["inconclusive"] + groups["failed"]) == list(range(1, EPOCHS + 1))
    assert set(groups["inconclusive"]) == {run.epoch(s) for s in unsure}
    assert set(groups["passed"]) == {run.epoch(s) for s, ok in verdicts if ok}
    # hparams and the cost of each callback
    assert "lr" in run.hparams and '<td class="l">lr</td>' in text
    for tag in ("xaiwatch/explain_seconds", "xaiwatch/projection_seconds", "saliency/seconds"):
        assert f'<td class="l">{tag}</td>' in text


def test_never_replaces_a_file_of_the_user(run_dir, tmp_path):
    mine = tmp_path / "report.html"
    mine.write_text("<html>my own notes</html>")
    with pytest.raises(ConfigurationError, match="is not an xaiwatch report"):
        write_report(run_dir, mine)
    assert mine.read_text() == "<html>my own notes</html>"
    ours = tmp_path / "ours.html"
    assert main(["report", str(run_dir), "-o", str(ours)]) == 0
    first = ours.read_text()
    assert main(["report", str(run_dir), "-o", str(ours)]) == 0  # a report of ours may be replaced
    assert ours.read_text().count("<img ") == first.count("<img ")
    with pytest.raises(ConfigurationError, match="No TensorBoard event file"):
        build_report(tmp_path)


def test_thresholds_from_both_reason_formats():
    texts = [
        (1, "epoch 1: failed:\n\n- energy_in_box/saliency = 0.300 (needs >= 0.45)"),
        (
            2,
            "epoch 2: passed\n\n| check | value | threshold | result |\n|---|---|---|---|\n"
            "| context_reliance | 0.010 | <= 0.05 | pass |\n| pointing_game/saliency | 0.5 | - | logged |",
        ),
    ]
    assert parse_thresholds(texts) == {"energy_in_box/saliency": ">= 0.45", "context_reliance": "<= 0.05"}
