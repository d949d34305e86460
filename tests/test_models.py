"""YOLOv8Module: batch conversion, weight transfer, the loss really trains, validation mAP is logged."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from conftest import tiny_cfg
from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.models import YOLOv8Module, load_matching_weights, to_ultralytics_batch
from xaiwatch.models.yolov8 import build_detection_model


def test_to_ultralytics_batch_by_hand():
    boxes = [torch.tensor([[10.0, 20.0, 30.0, 60.0]]), torch.zeros(0, 4), torch.tensor([[0.0, 0.0, 64.0, 32.0]])]
    labels = [torch.tensor([2]), torch.zeros(0, dtype=torch.long), torch.tensor([1])]
    out = to_ultralytics_batch(boxes, labels, (64, 128))  # H=64, W=128
    assert out["batch_idx"].tolist() == [0.0, 2.0]
    assert out["cls"].tolist() == [[2.0], [1.0]]
    assert torch.allclose(out["bboxes"][0], torch.tensor([20 / 128, 40 / 64, 20 / 128, 40 / 64]))
    assert torch.allclose(out["bboxes"][1], torch.tensor([32 / 128, 16 / 64, 64 / 128, 32 / 64]))


def test_weights_transfer_reports_skipped(tmp_path):
    torch.manual_seed(1)
    src = build_detection_model(tiny_cfg(), 80)
    path = tmp_path / "w80.pt"
    torch.save(src.state_dict(), path)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, weights=str(path))
    report = module.weights_report
    assert report["skipped"] and all(k.startswith("model.22.cv3.") for k in report["skipped"])  # class branch only
    assert len(report["loaded"]) + len(report["skipped"]) == len(src.state_dict())
    assert torch.equal(module.net.model[0].conv.weight, src.model[0].conv.weight)
    assert module.net.model[-1].cv3[0][-1].weight.shape[0] == 3


def test_pickled_checkpoint_needs_trust(tmp_path):
    net = build_detection_model(tiny_cfg(), 3)
    path = tmp_path / "ultra.pt"
    torch.save({"model": net, "epoch": 3}, path)  # the layout of an ultralytics checkpoint
    fresh = build_detection_model(tiny_cfg(), 3)
    with pytest.raises(ConfigurationError, match="trust_pickle=True"):
        load_matching_weights(fresh, path)
    report = load_matching_weights(fresh, path, trust_pickle=True)
    assert not report["skipped"] and torch.equal(fresh.model[0].conv.weight, net.model[0].conv.weight)
    with pytest.raises(ConfigurationError, match="does not exist"):
        load_matching_weights(fresh, tmp_path / "missing.pt")
    torch.save({"unrelated.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ConfigurationError, match="No tensor"):
        load_matching_weights(fresh, tmp_path / "other.pt")


def test_bad_module_arguments():
    with pytest.raises(ConfigurationError, match="num_classes"):
        YOLOv8Module(tiny_cfg(), num_classes=0)
    with pytest.raises(ConfigurationError, match="names"):
        YOLOv8Module(tiny_cfg(), num_classes=3, names=["a"])
    with pytest.raises(ConfigurationError, match="architecture yaml"):
        YOLOv8Module("no-such-model.yaml", num_classes=3)


def test_training_learns_and_logs_map(tmp_path):
    """120 steps on 64 squares: mAP@50 rises from 0 and the validation loss is logged (about 8 s on 2 CPU cores).

    The validation loss is not a learning signal here: ultralytics' task-aligned assigner gives an untrained model
    almost no positive anchors, so its loss starts small (0.4-0.9 on most seeds) and rises once boxes are matched.
    "Loss halves" passed on one CPU and failed on another (0.57 -> 2.80 with mAP rising); mAP is the measure.
    """
    from torch.utils.data import DataLoader

    from conftest import SquaresDataset, collate

    history = []

    class Record(pl.Callback):
        def on_validation_end(self, trainer, pl_module):
            history.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")})

    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3, lr=1e-2, warmup_steps=5)
    trainer = pl.Trainer(
        max_epochs=15,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        callbacks=[Record()],
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        check_val_every_n_epoch=3,
    )
    train = DataLoader(SquaresDataset(64, 0), batch_size=8, collate_fn=collate, shuffle=True)
    trainer.fit(module, train, DataLoader(SquaresDataset(16, 1), batch_size=8, collate_fn=collate))
    assert len(history) == 5
    assert all(torch.isfinite(torch.tensor(h["val/loss"])) for h in history)
    assert history[0]["val/map50"] < 0.05 and history[-1]["val/map50"] > 0.1  # seeds 0-5 here: 0.16-1.0
    assert 0.0 <= history[-1]["val/map"] <= history[-1]["val/map50"] <= 1.0
    assert isinstance(module.xai_adapter(), YOLOv8Adapter) and module.xai_adapter().names == ["0", "1", "2"]


def test_validation_map_matches_torchmetrics_on_adapter_detections(square_loaders):
    from torchmetrics.detection import MeanAveragePrecision

    pl.seed_everything(0)
    module = YOLOv8Module(tiny_cfg(), num_classes=3)
    module.net.model[-1].cv3[0][-1].bias.data.fill_(3.0)  # confident detections everywhere
    module.eval()
    _, val = square_loaders
    batch = next(iter(val))
    with torch.no_grad():
        module.validation_step(batch, 0)
    ours = module.map_metric.compute()
    adapter = YOLOv8Adapter(module.net, conf=0.001, iou=0.7)
    dets = adapter.detect(batch["images"])
    ref = MeanAveragePrecision(box_format="xyxy")
    ref.update(
        [{"boxes": d.boxes, "scores": d.scores, "labels": d.labels} for d in dets],
        [{"boxes": b, "labels": lab} for b, lab in zip(batch["boxes"], batch["labels"])],
    )
    assert torch.equal(ours["map_50"], ref.compute()["map_50"])
