"""The projection and the error analysis read the validation pass instead of a forward of their own — same results."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import make_trainer, tiny_module
from xaiwatch.callbacks import ErrorAnalysisCallback, ProjectionCallback
from xaiwatch.callbacks.capture import ValidationCapture
from xaiwatch.models import YOLOv8Module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from xaiwatch.data import generate

    return generate(tmp_path_factory.mktemp("capture") / "d", num_train=16, num_val=12, imgsz=64, seed=5)


class FlippedValidation(YOLOv8Module):
    """Validates on mirrored images: the model never sees the batch's own images."""

    def validation_step(self, batch, batch_idx):
        return super().validation_step({**batch, "images": batch["images"].flip(-1)}, batch_idx)


def _fit(tmp_path, data, reuse, module_cls=None, **trainer_options):
    from xaiwatch.data import YoloDataModule

    module = tiny_module(3) if module_cls is None else _seeded(module_cls)
    projection = ProjectionCallback(layers=["neck"], max_points=60, on_error="raise", reuse_validation=reuse)
    errors = ErrorAnalysisCallback(max_images=8, batch_size=4, explain_top_k=0, on_error="raise",
                                   reuse_validation=reuse)  # fmt: skip
    own = {"embedded": [], "detected": [], "points": []}
    embed, detect, project = projection._embed, errors._detect, projection._project
    projection._embed = lambda device, idx, epoch: (own["embedded"].append(len(idx)), embed(device, idx, epoch))[1]
    errors._detect = lambda images, device: (own["detected"].append(len(images)), detect(images, device))[1]
    projection._project = lambda points, step, epoch=None: (own["points"].append(points), project(points, step, epoch))[
        1
    ]
    dm = YoloDataModule(str(data), imgsz=64, batch_size=4, seed=0)
    trainer = make_trainer(tmp_path / f"r{reuse}", [projection, errors], epochs=2, **trainer_options)
    trainer.fit(module, datamodule=dm)
    counts = errors.last_counts
    own["analysed"] = errors.indices
    return module, projection, own, (counts.images, {k: v.tolist() for k, v in counts.counts.items()})


def _seeded(cls):
    import pytorch_lightning as pl

    from conftest import tiny_cfg

    pl.seed_everything(0)
    return cls(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)


def _same_history(a, b):
    for layer in a:
        for step in a[layer]:
            for k, v in a[layer][step].items():
                w = b[layer][step][k]
                assert (math.isnan(v) and math.isnan(w)) or v == w, (layer, step, k, v, w)
    assert a.keys() == b.keys() and all(a[k].keys() == b[k].keys() for k in a)


def test_validation_pass_gives_the_same_points_and_counts_without_a_forward(tmp_path, data):
    module_on, proj_on, own_on, counts_on = _fit(tmp_path, data, reuse=True)
    module_off, proj_off, own_off, counts_off = _fit(tmp_path, data, reuse=False)
    # without reuse: a forward at step 0 and after each epoch; with it: only at step 0 (before any validation)
    assert own_off["embedded"] == [12, 12, 12] and own_on["embedded"] == [12]
    assert own_off["detected"] == [4, 4, 4, 4] and own_on["detected"] == []  # 8 images, 2 epochs, no start run
    _same_history(proj_on.history, proj_off.history)
    assert counts_on == counts_off and counts_on[0] == 8
    for a, b in zip(own_on["points"], own_off["points"], strict=True):  # the very points, in the same order
        assert a.metadata == b.metadata and a.keys == b.keys
        assert all(torch.allclose(a.features[k], b.features[k], atol=1e-6) for k in a.features)
        assert torch.equal(a.thumbnails, b.thumbnails) and torch.equal(a.scores, b.scores)
    # training is untouched (bit for bit the weights and BN statistics of a fit without callbacks), no hook stays
    from xaiwatch.data import YoloDataModule

    plain = tiny_module(3)
    make_trainer(tmp_path / "plain", [], epochs=2).fit(
        plain, datamodule=YoloDataModule(str(data), imgsz=64, batch_size=4, seed=0)
    )
    for ours in (module_on, module_off):
        for p, q in zip(ours.state_dict().values(), plain.state_dict().values(), strict=True):
            assert torch.equal(p, q)
    assert not any(m._forward_hooks for m in module_on.net.modules())


def test_a_model_fed_other_images_is_not_read(tmp_path, data):
    _, proj, own, counts = _fit(tmp_path, data, reuse=True, module_cls=FlippedValidation)
    assert own["embedded"] == [12, 12, 12] and own["detected"] == [4, 4, 4, 4]  # every run embedded by itself
    _, reference, _, counts_off = _fit(tmp_path / "off", data, reuse=False, module_cls=FlippedValidation)
    _same_history(proj.history, reference.history)
    assert counts == counts_off


def test_images_the_validation_did_not_see_get_their_own_forward(tmp_path, data):
    _, proj, own, counts = _fit(tmp_path, data, reuse=True, limit_val_batches=1)  # 4 of the 12 images
    unseen = sum(i >= 4 for i in own["analysed"])  # the validation batch of 4 held images 0-3
    assert own["embedded"] == [12, 8, 8] and 0 < unseen < 8 and sum(own["detected"]) == 2 * unseen
    _, reference, _, counts_off = _fit(tmp_path / "off", data, reuse=False, limit_val_batches=1)
    _same_history(proj.history, reference.history)
    assert counts == counts_off


def test_capture_takes_only_wanted_rows_of_its_own_dataset(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter

    adapter = YOLOv8Adapter(tiny_net.eval())
    seen = []
    capture = ValidationCapture(
        adapter, {1, 3}, seen.append, {"p3": adapter.layer("neck.p3")}, paths=["a", "b", "c", "d"]
    )
    capture.start()
    images = torch.rand(3, 3, 64, 64)
    batch = {
        "images": images,
        "indices": torch.tensor([1, 2, 3]),
        "paths": ["b", "c", "other"],  # index 3 is another file here: not ours
        "boxes": [torch.tensor([[1.0, 2, 30, 40]]), torch.zeros(0, 4), torch.zeros(0, 4)],
        "labels": [torch.tensor([2]), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)],
    }
    with torch.no_grad():
        capture.batch_start(batch)
        tiny_net(images.flip(-1))  # not the batch's images: ignored
        assert seen == []
        out = tiny_net(images)
        tiny_net(images)  # a second call on the same batch: taken once
        capture.batch_end()
    assert len(seen) == 1 and seen[0].ids == [1] and torch.equal(seen[0].images, images[:1])
    assert torch.equal(seen[0].raw.scores, adapter.raw_from_output(out).scores[:1])
    assert seen[0].maps["p3"].shape[0] == 1 and torch.equal(seen[0].boxes[0], batch["boxes"][0])
    capture.stop()
    assert not any(m._forward_hooks for m in tiny_net.modules())
    capture.stop()  # idempotent
