"""YOLO11, YOLOv10 and YOLO12 through YOLOv8Adapter: detections equal ultralytics' own post-processing."""

from __future__ import annotations

import pytest
import torch

from xaiwatch.adapters import YOLOv8Adapter
from xaiwatch.targets import BoxTarget

FAMILIES = ["yolo11n.yaml", "yolov10n.yaml", "yolo12n.yaml"]


def build(cfg: str):
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    net = build_detection_model(cfg, 3)
    # a fresh head predicts ~0 everywhere; spread the class biases so that thresholds keep some boxes
    for branch in [*net.model[-1].cv3, *(getattr(net.model[-1], "one2one_cv3", None) or [])]:
        torch.nn.init.normal_(branch[-1].bias, -3.0, 1.0)
    return net.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_net(request):
    return build(request.param)


@pytest.fixture(scope="module")
def family_images():
    torch.manual_seed(3)
    return torch.rand(2, 3, 64, 64)


@pytest.mark.parametrize("conf", [0.01, 0.1])
def test_detect_equals_ultralytics_nms(family_net, family_images, conf):
    from ultralytics.utils.nms import non_max_suppression

    adapter = YOLOv8Adapter(family_net, conf=conf, iou=0.7)
    dets = adapter.detect(family_images)
    with torch.no_grad():
        y = family_net(family_images)
    ref, keep = non_max_suppression(y, conf, 0.7, max_det=300, return_idxs=True)
    assert sum(len(d) for d in dets) > 0
    for d, r, k in zip(dets, ref, keep):
        assert torch.equal(d.boxes, r[:, :4]) and torch.equal(d.scores, r[:, 4])
        assert torch.equal(d.labels, r[:, 5].long()) and torch.equal(d.candidates, k.flatten().long())
    with torch.no_grad():
        raw = adapter.raw(family_images)
    assert torch.equal(dets[0].boxes, raw.boxes[0, dets[0].candidates])
    assert raw.levels is not None and raw.levels.shape == (raw.boxes.shape[1],)


@pytest.mark.parametrize("conf", [0.01, 0.05])
def test_yolov10_end_to_end_equals_ultralytics(family_images, conf):
    """With ``end2end = True`` v10 predicts from its one-to-one branch, NMS-free (ultralytics' top-k, then conf)."""
    from ultralytics.utils.nms import non_max_suppression

    net = build("yolov10n.yaml")
    net.end2end = True
    head = net.model[-1]
    adapter = YOLOv8Adapter(net, conf=conf)
    dets = adapter.detect(family_images)
    with torch.no_grad():
        y, preds = net(family_images)
    assert y.shape == (2, 84, 6)  # top-k rows (84 anchors at 64 px < max_det)
    ref, keep = non_max_suppression(y, conf, 0.7, end2end=True, return_idxs=True)
    # the anchor of each top-k row, by ultralytics' own index computation
    scores = preds["one2one"]["scores"].sigmoid().transpose(1, 2)
    _, _, anchor = head.get_topk_index(scores, head.max_det)
    assert sum(len(d) for d in dets) > 0
    for i, (d, r, k) in enumerate(zip(dets, ref, keep)):
        assert torch.allclose(d.boxes, r[:, :4], atol=1e-5) and torch.equal(d.scores, r[:, 4])
        assert torch.equal(d.labels, r[:, 5].long()) and torch.equal(d.candidates, anchor[i, k])
    # the one-to-one candidates are what the target differentiates
    x = family_images[:1].clone().requires_grad_()
    with torch.enable_grad():
        score = adapter.score(x, BoxTarget(int(dets[0].candidates[0]), int(dets[0].labels[0])))
    assert torch.allclose(score.detach(), dets[0].scores[:1])


def test_layer_names_per_family():
    expected = {"yolo11n.yaml": ("model.16", "model.10"), "yolov10n.yaml": ("model.16", "model.10"),
                "yolo12n.yaml": ("model.14", "model.8")}  # fmt: skip
    for cfg, (p3, p5) in expected.items():
        adapter = YOLOv8Adapter(build(cfg))
        names = adapter.layer_names()
        assert names["neck.p3"] == p3 and names["backbone.p5"] == p5, (cfg, names)
        assert adapter.level_head("neck.p3") is not None


def test_yolov8_module_trains_yolov10_with_its_end_to_end_loss():
    """YOLOv10's dual head trains with ultralytics' E2ELoss, whose one-to-many gain decays once per epoch."""
    from ultralytics.utils.loss import E2ELoss

    from conftest import SquaresDataset, collate
    from xaiwatch.models import YOLOv8Module

    module = YOLOv8Module("yolov10n.yaml", num_classes=3)
    batch = collate([SquaresDataset(2, 0)[i] for i in range(2)])
    module.net.train()
    loss = module.training_step(batch, 0)
    assert isinstance(module.criterion, E2ELoss) and torch.isfinite(loss)
    before = module.criterion.o2m
    module.on_train_epoch_end()  # no trainer: one epoch in the schedule
    assert module.criterion.o2m < before
