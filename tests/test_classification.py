"""Classification: the whole-image adapter against the model called by hand, Captum and autograd; the generated
folder data set; a short real training; ExplainCallback on a YOLOv8 classifier; bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import tiny_cfg
from xaiwatch.adapters.classifier import ClassifierAdapter, is_ultralytics_classification_model
from xaiwatch.core.errors import ConfigurationError, DatasetFormatError, UnsupportedModelError
from xaiwatch.data import read_specs, render
from xaiwatch.data.classification import (
    ClassificationDataModule,
    ClassificationDataset,
    collate_classification,
    generate_classification,
)
from xaiwatch.explain import get_engine
from xaiwatch.models.yolov8 import build_detection_model
from xaiwatch.models.yolov8_cls import YOLOv8ClsModule, _build_classification_model
from xaiwatch.targets import BoxTarget, ClassTarget, MatchedBoxTarget


def tiny_cls_cfg(width: float = 0.0625) -> dict:
    """yolov8n-cls.yaml with its width scaled (as ``tiny_cfg`` does for detection)."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = dict(yaml_model_load("yolov8n-cls.yaml"))
    cfg["scales"] = {"t": [0.33, width, 1024]}
    cfg["scale"] = "t"
    return cfg


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine this is several times faster than oversubscribing."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cls_net():
    torch.manual_seed(0)
    return _build_classification_model(tiny_cls_cfg(), 3)


def _hand_probs(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    net.eval()
    probs, logits = net(x)
    assert torch.allclose(probs, logits.softmax(1))  # ultralytics' Classify head: (softmax, logits) in eval
    return probs


# ------------------------------------------------------------------------------------------------- adapter
def test_scores_are_the_softmax_of_the_model(cls_net, images):
    adapter = ClassifierAdapter(cls_net)
    probs = _hand_probs(cls_net, images)  # eval mode, as inside every engine
    raw = adapter.raw(images)
    assert raw.scores.shape == (2, 1, 3) and torch.equal(raw.scores[:, 0], probs)
    assert raw.boxes.tolist() == [[[0.0, 0.0, 64.0, 64.0]]] * 2
    whole = [0, 0, 64, 64]
    for target in (ClassTarget(1), BoxTarget(0, 1), MatchedBoxTarget(whole, 1)):
        assert torch.equal(adapter.score(images, target), probs[:, 1]), target
    assert adapter.names == ["0", "1", "2"] and adapter.num_classes == 3
    assert is_ultralytics_classification_model(cls_net)
    assert not is_ultralytics_classification_model(build_detection_model(tiny_cfg(), 3))
    assert not is_ultralytics_classification_model(nn.Linear(2, 2))


def _plain_classifier(softmax: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [
        nn.Conv2d(3, 4, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=4, padding=1), nn.ReLU()),  # stride 8
        nn.Conv2d(8, 8, 3, stride=2, padding=1),  # stride 16
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    ]
    return nn.Sequential(*layers, *([nn.Softmax(dim=1)] if softmax else []))


def test_plain_module_logits_or_probs(images):
    logits_model = _plain_classifier()
    adapter = ClassifierAdapter(logits_model)
    assert torch.allclose(adapter.score(images, ClassTarget(2)), logits_model(images).softmax(1)[:, 2])
    assert adapter.names == ["0", "1", "2"]  # class count found by the probe forward
    assert adapter.layer_names() == {"backbone.p3": "2", "backbone.p4": "3", "head.input": "3"}
    probs_model = _plain_classifier(softmax=True)
    adapter = ClassifierAdapter(probs_model, names=["a", "b", "c"], output="probs")
    assert torch.allclose(adapter.score(images, ClassTarget(0)), probs_model(images)[:, 0])
    assert adapter.names == ["a", "b", "c"]


def test_layers_by_stride(cls_net):
    adapter = ClassifierAdapter(cls_net)
    names = adapter.layer_names()
    sizes = {}
    hooks = [
        m.register_forward_hook(lambda _m, _i, o, i=i: sizes.__setitem__(i, o.shape[-1]))
        for i, m in enumerate(cls_net.model[:-1])
    ]
    cls_net.eval()(torch.zeros(1, 3, 64, 64))
    for h in hooks:
        h.remove()
    for alias, stride in (("backbone.p3", 8), ("backbone.p4", 16), ("backbone.p5", 32)):
        i = max(k for k, s in sizes.items() if s == 64 // stride)  # the last layer at that stride
        assert names[alias] == f"model.{i}"
    assert names["head.input"] == "model.8" and adapter.layer("head.input") is cls_net.model[8]
    assert adapter.layer("head.conv") is cls_net.model[9].conv and adapter.default_cam_layer == "head.input"


def test_saliency_equals_hand_autograd(cls_net, images):
    adapter = ClassifierAdapter(cls_net)
    maps = get_engine("saliency", adapter).attribute(images, ClassTarget(2))
    x = images.clone().requires_grad_()
    (g,) = torch.autograd.grad(_hand_probs(cls_net, x)[:, 2].sum(), x)
    assert maps.shape == (2, 1, 64, 64) and maps.sum() > 0
    assert torch.allclose(maps, g.abs().amax(dim=1, keepdim=True))


def test_grad_cam_on_default_layer_equals_captum(cls_net, images):
    from captum.attr import LayerGradCam

    adapter = ClassifierAdapter(cls_net)
    engine = get_engine("grad_cam", adapter)
    assert engine.layer is cls_net.model[8]
    labels = torch.tensor([0, 2])
    maps = engine.attribute(images, [ClassTarget(0), ClassTarget(2)])
    ref = LayerGradCam(lambda x: _hand_probs(cls_net, x).gather(1, labels[:, None])[:, 0], cls_net.model[8])
    ref = ref.attribute(images.clone().requires_grad_(), relu_attributions=True)
    ref = F.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False).detach()
    assert maps.shape == (2, 1, 64, 64) and ref.abs().sum() > 0
    assert torch.allclose(maps, ref, atol=1e-7)


def test_detect_returns_the_top_class(cls_net, images):
    with torch.no_grad():
        probs = _hand_probs(cls_net, images)
    dets = ClassifierAdapter(cls_net, conf=0.0).detect(images)
    for d, p in zip(dets, probs):
        assert d.labels.tolist() == [int(p.argmax())] and torch.allclose(d.scores, p.max()[None])
        assert d.boxes.tolist() == [[0.0, 0.0, 64.0, 64.0]] and d.candidates.tolist() == [0]
    assert all(len(d) == 0 for d in ClassifierAdapter(cls_net, conf=float(probs.max())).detect(images))


@pytest.mark.parametrize("method", ["saliency", "grad_cam"])
def test_no_side_effects_in_inference_mode(cls_net, images, method):
    cls_net.train()
    state = {k: v.clone() for k, v in cls_net.state_dict().items()}
    with torch.inference_mode():
        maps = get_engine(method, ClassifierAdapter(cls_net)).attribute(images * 1, ClassTarget(1))
    assert maps.shape == (2, 1, 64, 64) and not maps.is_inference()
    assert all(m.training for m in cls_net.modules())
    assert all(torch.equal(v, cls_net.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in cls_net.parameters())
    assert not any(m._forward_hooks or m._backward_hooks or m._forward_pre_hooks for m in cls_net.modules())


def test_adapter_bad_input(cls_net):
    with pytest.raises(UnsupportedModelError, match="YOLOv8Adapter"):
        ClassifierAdapter(build_detection_model(tiny_cfg(), 3))
    with pytest.raises(ConfigurationError, match="Leave `output` unset"):
        ClassifierAdapter(cls_net, output="logits")
    with pytest.raises(ConfigurationError, match="`output` must be one of"):
        ClassifierAdapter(_plain_classifier(), output="scores")
    mlp = ClassifierAdapter(nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2)))  # gradients yes, CAM no
    assert mlp.names == ["0", "1"] and mlp.layer_names() == {}
    assert get_engine("saliency", mlp).attribute(torch.rand(1, 3, 64, 64), ClassTarget(1)).shape == (1, 1, 64, 64)
    with pytest.raises(UnsupportedModelError, match="no module with a spatial"):
        get_engine("grad_cam", mlp)
    with pytest.raises(ConfigurationError, match="out of range"):
        ClassifierAdapter(cls_net).score(torch.rand(1, 3, 64, 64), ClassTarget(3))


# ------------------------------------------------------------------------------------------------- data
def test_generated_folders_and_items(tmp_path):
    root = generate_classification(tmp_path / "d", num_train=9, num_val=6, classes=("triangle", "circle", "square"))
    assert sorted(p.name for p in (root / "train").iterdir()) == ["circle", "square", "triangle"]
    dm = ClassificationDataModule(root, batch_size=4, augment=False)
    dm.setup()
    assert dm.names == ["circle", "square", "triangle"] and len(dm.train_dataset) == 9 and len(dm.val_dataset) == 6
    specs = {s["file"]: s for s in read_specs(root, "val")}
    for i in range(len(dm.val_dataset)):
        item = dm.val_dataset[i]
        spec = specs[str(item["path"])[len(str(root)) + 1 :]]
        assert item["label"] == spec["objects"][0]["cls"] and len(spec["objects"]) == 1
        assert dm.names[item["label"]] == spec["objects"][0]["shape"]
        expected = torch.from_numpy(render(spec, 64).transpose(2, 0, 1).astype(np.float32) / 255)
        assert torch.equal(item["image"], expected)
        assert item["boxes"].tolist() == [[0.0, 0.0, 64.0, 64.0]] and item["labels"].tolist() == [item["label"]]
    batch = collate_classification([dm.val_dataset[i] for i in range(3)])
    assert batch["images"].shape == (3, 3, 64, 64) and batch["labels"].shape == (3,)
    assert batch["boxes"].shape == (3, 1, 4) and batch["indices"].tolist() == [0, 1, 2] and len(batch["paths"]) == 3
    again = generate_classification(tmp_path / "e", num_train=9, num_val=6)
    assert (root / "val" / specs[next(iter(specs))]["file"][4:]).read_bytes() == (
        again / "val" / specs[next(iter(specs))]["file"][4:]
    ).read_bytes()  # same seed, same bytes
    info = json.loads((root / "meta" / "info.json").read_text())
    assert info["names"] == dm.names and info["object_size"] == [24, 32]


def test_data_bad_input(tmp_path):
    root = generate_classification(tmp_path / "d", num_train=4, num_val=3)
    with pytest.raises(ConfigurationError, match="overwrite=True"):
        generate_classification(root, num_train=4, num_val=3)
    with pytest.raises(ConfigurationError, match="at least 2 shapes"):
        generate_classification(tmp_path / "one", classes=("circle",))
    (root / "val" / "square").rename(root / "val" / "squares")
    with pytest.raises(DatasetFormatError, match=r"class folders differ.*only in train \['square'\].*\['squares'\]"):
        ClassificationDataModule(root)
    with pytest.raises(DatasetFormatError, match="does not exist"):
        ClassificationDataModule(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    for split in ("train", "val"):
        (empty / split / "circle").mkdir(parents=True)
    with pytest.raises(DatasetFormatError, match="holds no image"):
        ClassificationDataModule(empty)
    (empty / "val" / "circle").rmdir()
    with pytest.raises(DatasetFormatError, match="no class sub-folder"):
        ClassificationDataset(empty / "val")
    with pytest.raises(ConfigurationError, match="batch_size"):
        ClassificationDataModule(root, batch_size=0)
    with pytest.raises(ConfigurationError, match=r"`num_classes` must be an integer >= 2.*got 1"):
        YOLOv8ClsModule(tiny_cls_cfg(), num_classes=1)
    with pytest.raises(ConfigurationError, match="names"):
        YOLOv8ClsModule(tiny_cls_cfg(), num_classes=3, names=["a"])


# ------------------------------------------------------------------------------------------------- training
def _trainer(epochs: int, **kw) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=epochs,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        accelerator="cpu",
        **kw,
    )


def test_short_training_learns_the_shapes(tmp_path):
    root = generate_classification(tmp_path / "d", num_train=500, num_val=90, object_size=(28, 32))
    dm = ClassificationDataModule(root, batch_size=32)
    pl.seed_everything(0)
    module = YOLOv8ClsModule(tiny_cls_cfg(0.125), num_classes=3, names=dm.names, lr=6e-3, warmup_steps=5)
    trainer = _trainer(10, logger=False, check_val_every_n_epoch=10)
    trainer.fit(module, dm)
    acc = float(trainer.callback_metrics["val/acc"])
    print(f"val/acc after 10 epochs: {acc:.3f}")
    assert acc > 0.6, acc  # chance is 1/3
    assert float(trainer.callback_metrics["val/loss"]) < 1.0


def test_explain_callback_on_the_classifier(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from xaiwatch.callbacks import ExplainCallback

    root = generate_classification(tmp_path / "d", num_train=8, num_val=4)
    pl.seed_everything(0)
    module = YOLOv8ClsModule(tiny_cls_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)
    cb = ExplainCallback(methods=["saliency", "grad_cam"], num_probe=2, on_error="raise")
    trainer = _trainer(1, logger=TensorBoardLogger(str(tmp_path), name="tb"), callbacks=[cb], log_every_n_steps=1)
    trainer.fit(module, ClassificationDataModule(root, batch_size=4))
    acc = EventAccumulator(str(trainer.logger.log_dir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = {t for t in acc.Tags()["images"] if t.startswith("explain/")}
    expected = {f"explain/{m}/probe_{i:02d}" for m in ("saliency", "grad_cam") for i in range(2)}
    assert tags == expected
    for tag in expected:
        events = acc.Images(tag)
        assert [e.step for e in events] == [0, 2]  # global steps: 8 images, batch 4
        assert np.asarray(Image.open(io.BytesIO(events[-1].encoded_image_string)).convert("RGB")).std() > 10
    assert cb.state_dict()["tracked"][0][0][:4] == [0.0, 0.0, 64.0, 64.0]  # the whole image is the tracked box
    assert len(acc.Scalars("explain_tracked/detected_probe_00")) == 2
    assert "val/acc" in trainer.callback_metrics


def test_classifier_adapter_is_inferred():
    from torch import nn

    from xaiwatch.adapters import ClassifierAdapter, resolve_adapter
    from xaiwatch.models import YOLOv8ClsModule

    module = YOLOv8ClsModule(num_classes=3)

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = module.net

    adapter = resolve_adapter(Holder())
    assert isinstance(adapter, ClassifierAdapter) and adapter.model is module.net
