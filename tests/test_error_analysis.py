"""ErrorAnalysisCallback end to end: logged counts equal an independent recount, confusion and explanations in
TensorBoard, MissedTarget explains the right candidate, no side effects on training, bad input, the preset."""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.ops import box_iou

from conftest import SquaresDataset, collate, tiny_cfg
from helpers import make_trainer as _trainer
from helpers import read_events as _events
from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.analysis import COUNT_TYPES, ErrorCounts
from xaiwatch.callbacks import DecisionBoundaryCallback, ErrorAnalysisCallback, load_callbacks
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.core.types import RawOutput
from xaiwatch.explain import get_engine
from xaiwatch.models import YOLOv8Module
from xaiwatch.targets import BoxTarget, MissedTarget

PRESET = Path(__file__).parents[1] / "callbacks" / "error-analysis.yaml"


def make_responsive(net: torch.nn.Module) -> torch.nn.Module:
    """Make a random tiny YOLOv8 behave like a (random) detector whose scores and boxes depend on the image.

    Freshly initialised, its activations vanish (~1e-7 at the head): every class score is sigmoid(bias) and every
    box is huge. Re-estimating the BatchNorm statistics on random images brings them to unit scale; class biases
    at 0 put scores around 0.5, so there are detections to match and to attack.
    """
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    with torch.no_grad():
        net.train()(torch.rand(8, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
    for m in bns:
        m.momentum = 0.03
    for seq in net.model[-1].cv3:
        seq[-1].bias.data.fill_(0.0)
    return net


def _module(confident: bool = False) -> YOLOv8Module:
    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)
    if confident:  # many detections, so every error type occurs
        make_responsive(module.net)
    return module


def test_logged_counts_equal_a_recount(tmp_path, square_loaders):
    cb = ErrorAnalysisCallback(max_images=6, batch_size=4, conf=0.3, explain_top_k=1, on_error="raise", per_class=True)
    module = _module(confident=True)
    trainer = _trainer(tmp_path, [cb], epochs=1)
    trainer.fit(module, *square_loaders)
    acc = _events(trainer.logger.log_dir)
    # recount on the trained model, directly: detections of the same subset at the same threshold
    val = square_loaders[1].dataset
    adapter = YOLOv8Adapter(module.net, names=module.names, conf=0.3)
    counts = ErrorCounts(3)
    module.eval()
    for i in cb.state_dict()["probe_indices"]:
        item = val[i]
        counts.update(adapter.detect(item["image"][None])[0], item["boxes"], item["labels"])
    assert len(cb.state_dict()["probe_indices"]) == 6
    for kind in COUNT_TYPES:
        assert acc.Scalars(f"errors/{kind}/all")[-1].value == counts.totals()[kind], kind
        for c, name in enumerate(module.names):
            assert acc.Scalars(f"errors/{kind}/{name}")[-1].value == int(counts.counts[kind][c])
    totals_only = ErrorAnalysisCallback(max_images=6, explain_top_k=0, on_error="raise")  # the default: totals
    other = _trainer(tmp_path / "totals", [totals_only], epochs=1)
    other.fit(_module(confident=True), *square_loaders)
    errors = {t for t in _events(other.logger.log_dir).Tags()["scalars"] if t.startswith("errors/")}
    assert errors == {f"errors/{k}/all" for k in COUNT_TYPES} | {"errors/seconds"}
    totals = counts.totals()
    assert totals["fp"] > 0 and totals["fp"] == sum(totals[k] for k in ("cls", "loc", "both", "dupe", "bkg"))
    assert totals["tp"] + totals["fn"] == 6  # one object per image
    images = acc.Tags()["images"]
    assert "errors/confusion" in images and "errors/explain/saliency/fp_00" in images
    assert [e.step for e in acc.Images("errors/confusion")] == [2]  # the global step after one epoch of 2 batches
    for tag in ("errors/confusion", "errors/explain/saliency/fp_00"):
        picture = np.asarray(Image.open(io.BytesIO(acc.Images(tag)[-1].encoded_image_string)).convert("RGB"))
        assert picture.std() > 10  # a real picture, not a blank canvas
    assert acc.Scalars("errors/seconds")[-1].value > 0


def test_missed_target_explains_the_right_candidate(tiny_net, images):
    # hand-built raw output: candidate 2 overlaps the object at IoU 0.9 with the highest class-1 score
    boxes = torch.tensor([[[0.0, 0, 10, 10], [30, 30, 40, 40], [0, 0, 10, 9], [0, 0, 4, 4]]])
    scores = torch.tensor([[[0.0, 0.05], [0.0, 0.9], [0.0, 0.1], [0.0, 0.2]]])
    target = MissedTarget([0, 0, 10, 10], label=1)
    assert torch.allclose(target(RawOutput(boxes, scores)), torch.tensor([0.1]))
    match = target.match(RawOutput(boxes, scores))[0]
    assert match.candidate == 2 and not match.detected
    # on the tiny YOLOv8: the candidate the test picks from the raw output, and the map equals BoxTarget's
    adapter = YOLOv8Adapter(tiny_net.eval())
    engine = get_engine("saliency", adapter)
    with torch.no_grad():
        raw = adapter.raw(images[:1])
    scores = raw.scores[0, :, 2]
    near_candidate = raw.boxes[0, 10] + torch.tensor([1.0, -1.0, 2.0, 0.0])  # overlapped by real candidates
    small = torch.tensor([8.0, 8.0, 40.0, 36.0])  # the untrained model's boxes are huge: no IoU >= 0.5 here
    for gt in (near_candidate, small):
        ious = box_iou(gt[None], raw.boxes[0])[0]
        on_object = ious >= 0.5
        if bool(on_object.any()):
            expected = int(torch.where(on_object, scores, torch.full_like(scores, -1)).argmax())
        else:
            expected = int((ious * scores).argmax())
        missed = MissedTarget(gt, label=2)
        found = engine.explain_boxes(images[:1], [missed])
        got = found.maps
        assert found.matches[0].candidate == expected
        assert found.matches[0].iou == pytest.approx(float(ious[expected]))
        assert torch.allclose(got, engine.attribute_boxes(images[:1], [BoxTarget(expected, 2)]))
        assert float(got.abs().sum()) > 0
    assert "MissedTarget" in repr(missed)


def _weights_after_fit(tmp_path, square_loaders, callbacks):
    module = _module(confident=True)
    _trainer(tmp_path, callbacks).fit(module, *square_loaders)
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_training_bit_identical_with_and_without_callbacks(tmp_path, square_loaders):
    plain = _weights_after_fit(tmp_path / "a", square_loaders, [])
    # the random detector finds the objects of validation images 3 and 6 at IoU 0.1: attacks run there
    boundary = DecisionBoundaryCallback(
        probe_indices=[3, 6], steps=2, bisection_steps=1, iou_threshold=0.1, on_error="raise"
    )
    errors = ErrorAnalysisCallback(conf=0.3, max_images=4, explain_top_k=1, on_error="raise", analyze_at_start=True)
    analysed = _weights_after_fit(tmp_path / "b", square_loaders, [errors, boundary])
    acc = _events(tmp_path / "b" / "tb" / "version_0")
    at_start = [acc.Scalars(f"boundary/min_eps/probe_{i:02d}")[0] for i in range(2)]
    assert all(e.step == 0 for e in at_start) and any(e.value > 0 for e in at_start)  # gradient attacks ran
    assert errors.last_counts.totals()["fp"] > 0  # false positives were explained
    assert plain.keys() == analysed.keys() and any("running_mean" in k for k in plain)
    for k in plain:
        assert torch.equal(plain[k], analysed[k]), k


def test_bad_input(tmp_path, square_loaders):
    with pytest.raises(ConfigurationError, match=r"`iou_threshold` must be in \(0, 1\], got 0"):
        ErrorAnalysisCallback(iou_threshold=0)
    with pytest.raises(ConfigurationError, match=r"`iou_threshold` must be in \(0, 1\], got 1.2"):
        ErrorAnalysisCallback(iou_threshold=1.2)
    with pytest.raises(ConfigurationError, match="background_iou"):
        ErrorAnalysisCallback(iou_threshold=0.3, background_iou=0.3)
    with pytest.raises(ConfigurationError, match="Valid methods"):
        ErrorAnalysisCallback(explain_method="lime2")
    with pytest.raises(ConfigurationError, match="max_images"):
        ErrorAnalysisCallback(max_images=0)
    with pytest.raises(ConfigurationError, match="on_error"):
        ErrorAnalysisCallback(on_error="ignore")
    train, _ = square_loaders
    empty = SquaresDataset(4, 3)
    for item in empty.items:
        item["boxes"], item["labels"] = torch.zeros(0, 4), torch.zeros(0, dtype=torch.long)
    with pytest.raises(ConfigurationError, match="needs ground truth"):
        _trainer(tmp_path, [ErrorAnalysisCallback()]).fit(_module(), train, DataLoader(empty, 4, collate_fn=collate))
    with pytest.raises(ConfigurationError, match="not a heat map"):  # refused at construction, before any fit
        ErrorAnalysisCallback(explain_method="feature_maps")
    with pytest.raises(ConfigurationError, match="no validation dataloader"):
        _trainer(tmp_path, [ErrorAnalysisCallback()]).fit(_module(), train)


def test_resume_keeps_the_subset(tmp_path, square_loaders):
    cb = ErrorAnalysisCallback(max_images=3, seed=1, explain_top_k=0, on_error="raise")
    _trainer(tmp_path, [cb], epochs=1).fit(_module(), *square_loaders)
    state = cb.state_dict()
    restored = ErrorAnalysisCallback(max_images=3, seed=2, explain_top_k=0, on_error="raise")
    restored.load_state_dict(state)
    _trainer(tmp_path, [restored], epochs=1).fit(_module(), *square_loaders)
    assert restored.state_dict()["probe_indices"] == state["probe_indices"] and len(state["probe_indices"]) == 3
    assert ErrorAnalysisCallback(iou_threshold=0.5).state_key != ErrorAnalysisCallback(iou_threshold=0.7).state_key


def test_preset_loads_and_runs(tmp_path, square_loaders):
    callbacks = load_callbacks(PRESET)
    assert [type(c) for c in callbacks] == [ErrorAnalysisCallback, DecisionBoundaryCallback]
    for cb in callbacks:
        cb.on_error = "raise"
    trainer = _trainer(
        tmp_path, callbacks, epochs=1, inference_mode=False
    )  # the other tests validate in inference mode
    trainer.fit(_module(), *square_loaders)
    acc = _events(trainer.logger.log_dir)
    assert "errors/confusion" in acc.Tags()["images"] and "boundary/picture/probe_00" in acc.Tags()["images"]
    assert "errors/miss/all" in acc.Tags()["scalars"] and "boundary/min_eps/probe_00" in acc.Tags()["scalars"]


def test_errors_during_training_are_isolated_and_other_ranks_write_nothing(tmp_path, square_loaders):
    boom = RuntimeError("matching exploded")
    for cls, target in (
        (ErrorAnalysisCallback, "xaiwatch.callbacks.error_analysis.ErrorCounts.update"),
        (DecisionBoundaryCallback, "xaiwatch.callbacks.boundary.min_epsilon"),
    ):
        with patch(target, side_effect=boom), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = _trainer(tmp_path, [cls()])  # on_error="warn" by default
            trainer.fit(_module(confident=True), *square_loaders)
        assert trainer.current_epoch == 2  # training went on
        assert any("matching exploded" in str(w.message) and cls.__name__ in str(w.message) for w in caught)
        with patch(target, side_effect=boom), pytest.raises(RuntimeError, match="matching exploded"):
            _trainer(tmp_path, [cls(on_error="raise")]).fit(_module(confident=True), *square_loaders)
    cb = ErrorAnalysisCallback(max_images=6, on_error="raise")
    trainer = _trainer(tmp_path, [cb], epochs=1)
    module = _module()
    trainer.fit(module, *square_loaders)
    cb._writer = None  # what setup() gives a non-zero rank
    rank1 = SimpleNamespace(global_step=5, global_rank=1, world_size=2, current_epoch=3)
    with patch.object(cb, "_run", wraps=cb._run) as run, patch.object(cb, "_write") as write:
        cb._scheduled(rank1, module, epoch=3)
    assert run.call_args[0][0] == [1, 3, 5]  # its share of the analysed images
    write.assert_not_called()
    assert cb.last_counts.images == 3  # without a process group it only knows its own share
