"""Post-hoc ``explain_images`` / ``xaiwatch explain``: loading, output ownership, JSON equal to ``adapter.detect``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import tiny_cfg
from xaiwatch.cli import main
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.data.yolo import YoloDataset
from xaiwatch.posthoc import MARKER, explain_images, load_detector, prepare_output


@pytest.fixture
def tiny_module():
    from xaiwatch.models import YOLOv8Module

    torch.manual_seed(0)
    return YOLOv8Module(tiny_cfg(), num_classes=3, names=["a", "b", "c"])


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        arr = (rng.random((48, 64, 3)) * 80).astype(np.uint8)
        arr[10:30, 12 + 10 * i : 36 + 10 * i] = 255
        Image.fromarray(arr).save(folder / f"im{i}.png")
    return folder


def _lightning_ckpt(module, path):
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _same_detections(a, b, images):
    for da, db in zip(a.detect(images), b.detect(images)):
        torch.testing.assert_close(da.boxes, db.boxes)
        torch.testing.assert_close(da.scores, db.scores)
        assert torch.equal(da.labels, db.labels)


def test_load_lightning_and_pickled_checkpoints_match_the_model(tiny_module, tmp_path):
    images = torch.rand(2, 3, 64, 64)
    reference = tiny_module.xai_adapter()
    reference.conf = 0.0
    from_ckpt = load_detector(_lightning_ckpt(tiny_module, tmp_path / "m.ckpt"), conf=0.0)
    assert from_ckpt.names == ["a", "b", "c"]
    _same_detections(reference, from_ckpt, images)
    torch.save({"model": tiny_module.net}, tmp_path / "m.pt")
    with pytest.raises(ConfigurationError, match="trust_pickle=True"):
        load_detector(tmp_path / "m.pt")
    _same_detections(reference, load_detector(tmp_path / "m.pt", trust_pickle=True, conf=0.0), images)
    torch.save(tiny_module.net.state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ConfigurationError, match="Pass `model=`"):
        load_detector(tmp_path / "sd.pt")


def test_bad_input_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.pt").write_text("these are not weights")
    with pytest.raises(ConfigurationError, match="is not a checkpoint"):
        load_detector(tmp_path / "notes.pt", trust_pickle=True)
    good = tmp_path / "good.pt"
    torch.save({"w": torch.zeros(3)}, good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[:100])
    with pytest.raises(ConfigurationError, match="not a checkpoint: .* damaged or truncated"):
        load_detector(tmp_path / "cut.pt", trust_pickle=True)


def test_bad_input_weights_of_another_architecture(tiny_module, tmp_path):
    torch.save({"model": tiny_module.net}, tmp_path / "m.pt")
    state = dict(tiny_module.net.state_dict())
    state.pop("model.22.cv3.0.2.bias")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(ConfigurationError, match="does not match the architecture: .* of the model not in the file"):
        load_detector(tmp_path / "partial.pt", model=tiny_cfg())


def test_output_folder_ownership(tmp_path):
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.txt").write_text("do not touch")
    with pytest.raises(ConfigurationError, match="not created by xaiwatch"):
        prepare_output(user)
    with pytest.raises(ConfigurationError, match="is a file"):
        prepare_output(user / "thesis.txt")
    out, owned = prepare_output(tmp_path / "new" / "out")
    assert (out / MARKER).is_file() and owned == set()


def test_explain_images_tiny(tiny_module, image_folder, tmp_path):
    adapter = tiny_module.xai_adapter()
    adapter.conf = 0.0  # an untrained model: keep every candidate above 0 so there is something to explain
    adapter.max_det = 2
    out = tmp_path / "out"
    result = explain_images(adapter, image_folder, methods=["saliency", "layer_cam"], out=out, imgsz=64, progress=False)
    data = json.loads(result.json_path.read_text())
    dataset = YoloDataset(image_folder, names=adapter.names, imgsz=64)
    assert [im["path"] for im in data["images"]] == [str(p) for p in dataset.image_paths]
    for i, im in enumerate(data["images"]):
        dets = adapter.detect(dataset[i]["image"][None])[0]
        assert len(im["detections"]) == len(dets) == 2
        torch.testing.assert_close(torch.tensor([d["box"] for d in im["detections"]]), dets.boxes)
        torch.testing.assert_close(torch.tensor([d["score"] for d in im["detections"]]), dets.scores)
        assert [d["label"] for d in im["detections"]] == dets.labels.tolist()
        # box_original maps back through the letterbox (48x64 -> 64x64: pad 8 px on top)
        torch.testing.assert_close(
            torch.tensor([d["box_original"] for d in im["detections"]]), dets.boxes - torch.tensor([0.0, 8, 0, 8])
        )
        for j, d in enumerate(im["detections"]):
            assert set(d["checks"]) == {"saliency", "layer_cam"}
            for method, rel in d["panels"].items():
                assert (out / rel).is_file()
                m = result.maps[(i, j, method)]
                assert torch.isfinite(m).all() and float(m.max()) > float(m.min())
                from xaiwatch.checks import energy_in_box

                expected = float(energy_in_box(m[None], dets.boxes[j][None])[0])
                assert d["checks"][method]["energy_in_box"] == pytest.approx(expected)
    assert Image.open(result.contact_sheet).size[0] > 0
    # a second run into the same folder keeps a file the user put there, byte for byte, and refuses to overwrite it
    (out / "my_notes.txt").write_bytes(b"\x00notes\xff")
    explain_images(adapter, image_folder, methods=["saliency"], out=out, imgsz=64, max_objects=1, progress=False)
    assert (out / "my_notes.txt").read_bytes() == b"\x00notes\xff"
    second = json.loads(result.json_path.read_text())
    assert [sum(d["explained"] for d in im["detections"]) for im in second["images"]] == [1, 1]
    (out / "contact_sheet.png").unlink()
    (out / "contact_sheet.png").write_bytes(b"user's")
    marker = json.loads((out / MARKER).read_text())
    marker["files"].remove("contact_sheet.png")  # as if the user had put it there
    (out / MARKER).write_text(json.dumps(marker))
    with pytest.raises(ConfigurationError, match="was not written by xaiwatch"):
        explain_images(adapter, image_folder, methods=["saliency"], out=out, imgsz=64, max_objects=1, progress=False)
    assert (out / "contact_sheet.png").read_bytes() == b"user's"


def test_bad_input_explain_arguments(tiny_module, image_folder, tmp_path):
    adapter = tiny_module.xai_adapter()
    with pytest.raises(ConfigurationError, match="not a multiple of the model's stride 32"):
        explain_images(adapter, image_folder, out=tmp_path / "o", imgsz=70)
    with pytest.raises(ConfigurationError, match="does not draw a heat map"):
        explain_images(adapter, image_folder, methods=["feature_maps"], out=tmp_path / "o")
    with pytest.raises(ConfigurationError, match="does not exist"):
        explain_images(adapter, tmp_path / "nothing.png", out=tmp_path / "o")
    assert not (tmp_path / "o").exists()  # refused before writing anything


@pytest.mark.real
def test_explain_fall_detector_on_real_photos(tmp_path, capsys):
    from xaiwatch.data import real

    out = tmp_path / "explained"
    bus, zidane = real.ultralytics_asset("bus.jpg"), real.ultralytics_asset("zidane.jpg")
    weights = real.fall_detector_weights()
    argv = ["explain", "--weights", str(weights), "--trust-pickle", str(bus), str(zidane), "--out", str(out)]
    assert main([*argv, "--imgsz", "480", "--methods", "layer_cam,saliency", "--tensorboard"]) == 0
    assert "detections on 2 images" in capsys.readouterr().out
    data = json.loads((out / "explanations.json").read_text())
    adapter = load_detector(weights, trust_pickle=True)
    dataset = YoloDataset([bus, zidane], names=adapter.names, imgsz=480)
    people = []
    for i, im in enumerate(data["images"]):
        dets = adapter.detect(dataset[i]["image"][None])[0]
        torch.testing.assert_close(torch.tensor([d["box"] for d in im["detections"]]), dets.boxes)
        torch.testing.assert_close(torch.tensor([d["score"] for d in im["detections"]]), dets.scores)
        assert [d["label"] for d in im["detections"]] == dets.labels.tolist()
        people.append(sum(d["name"] == "Normal" for d in im["detections"]))
        for d in im["detections"]:
            assert d["explained"] and set(d["panels"]) == {"layer_cam", "saliency"}
            for c in d["checks"].values():
                assert 0.0 <= c["energy_in_box"] <= 1.0
    assert people[0] >= 4 and people[1] >= 1  # the 4 people of bus.jpg, the coach of zidane.jpg
    # the heat maps: finite and not constant, for every detection and method (re-run in Python to get them)
    (out / "user.bin").write_bytes(b"\x01\x02")
    result = explain_images(weights, [bus], methods=["layer_cam"], out=out, imgsz=480, trust_pickle=True)
    assert (out / "user.bin").read_bytes() == b"\x01\x02"
    assert len(result.maps) == people[0]
    for m in result.maps.values():
        assert torch.isfinite(m).all() and float(m.amax()) > float(m.amin())
    layer_cam_hits = [d.checks["layer_cam"]["pointing_game"] for d in result.images[0].detections]
    assert sum(layer_cam_hits) >= 3
    assert any(p.name.startswith("events.out.tfevents") for p in (out / "tensorboard").iterdir())
