"""Post-hoc ``explain_images`` / ``xaiwatch explain`` on DAMO-YOLO: a Lightning ``.ckpt`` of ``DamoYoloModule`` saved
by a real ``Trainer``, and an official-style model directory (literal ``damoyolo.py``, TinyNAS structure file, ``.pth``);
the JSON equals ``adapter.detect``, every map is finite and not constant, the pictures are PNGs, the user's files are
untouched, and bad checkpoints / directories end with a clear message (no traceback, nothing written)."""

from __future__ import annotations

import hashlib
import json
import pprint
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn

from conftest import tiny_damo_module
from xaiwatch.cli import main
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.data import YoloDataModule, YoloDataset, generate, read_dataset_yaml
from xaiwatch.posthoc import MARKER, explain_images

NAMES = ["circle", "square", "triangle"]
METHODS = ["saliency", "layer_cam"]
MAX_OBJECTS = 2  # explained per image by the Python runs (the command explains 1 with saliency: panels are slow)
CONF = 0.4  # scores of the fixture's model spread around 0.4: about 15 detections an image (each drawn on the panels)
PNG = b"\x89PNG\r\n\x1a\n"


def _trainer(**kw) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **kw,
    )


@pytest.fixture(scope="module")
def dataset_yaml(tmp_path_factory):
    """4 training and 2 validation images of the shapes generator, 64 px."""
    return generate(tmp_path_factory.mktemp("shapes") / "data", num_train=4, num_val=2, imgsz=64, seed=3)


@pytest.fixture(scope="module")
def trained(dataset_yaml, tmp_path_factory):
    """A tiny DamoYoloModule after one real training step (``bn_momentum=1``: BatchNorm statistics of that batch),
    its class biases then set to 0 so that scores spread around 0.5 (detections above the default ``conf``), and the
    Lightning checkpoint ``Trainer.save_checkpoint`` writes of it (optimizer and loop states included)."""
    module = tiny_damo_module(names=NAMES, bn_momentum=1.0)
    trainer = _trainer(max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=YoloDataModule(dataset_yaml, imgsz=64, batch_size=4, augment=False))
    with torch.no_grad():
        for conv in module.net.head.gfl_cls:
            conv.bias.zero_()
    folder = tmp_path_factory.mktemp("work")
    ckpt = folder / "damo.ckpt"
    trainer.save_checkpoint(ckpt)
    return module.eval(), ckpt


def write_damo_directory(
    root: Path, module: pl.LightningModule, class_names: bool = True, state: dict | None = None
) -> Path:
    """A modelscope-style DAMO-YOLO directory of ``module``'s network: ``damoyolo.py`` (a Python config whose first
    statement would create a file if it were executed), the TinyNAS structure file it names, the weights
    ``{"model": state_dict}`` it names, ``configuration.json`` (with ``class_names`` when asked)."""
    root.mkdir(parents=True)
    arch = module.net.config
    structure = [{**b, "nbitsA": 8, "nbitsW": 8} for b in arch["backbone"]["structure"]]
    (root / "tinynas_tiny.txt").write_text(pprint.pformat(structure, indent=2))
    backbone = {k: v for k, v in arch["backbone"].items() if k != "structure"}
    (root / "damoyolo.py").write_text(
        "#!/usr/bin/env python3\nimport pathlib\n"
        f"pathlib.Path({str(root / 'EXECUTED')!r}).touch()  # runs only if the config is executed\n"
        f"TinyNAS = {dict(backbone, structure_file='tinynas_tiny.txt')!r}\n"
        f"GiraffeNeckV2 = {arch['neck']!r}\n"
        f"ZeroHead = {dict(arch['head'], nms_conf_thre=0.05, nms_iou_thre=0.7)!r}\n"
        'model = {"backbone": TinyNAS, "neck": GiraffeNeckV2, "head": ZeroHead, "name": "damoyolo_tiny.pth"}\n'
        "dataset = dict(size_divisibility=32, input_pixel_mean=[0.0, 0.0, 0.0], input_pixel_std=[1.0, 1.0, 1.0],"
        " input_to_bgr255=False)\n"
    )
    torch.save({"model": module.net.state_dict() if state is None else state, "epoch": 300}, root / "damoyolo_tiny.pth")
    configuration = {"framework": "pytorch", "task": "image-object-detection", "model": {"type": "tinynas-damoyolo"}}
    if class_names:
        configuration["model"]["class_names"] = NAMES
    (root / "configuration.json").write_text(json.dumps(configuration))
    return root


def _digest(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path) to the SHA-256 of its bytes."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _is_png(path: Path) -> tuple[int, int]:
    """The size of a valid PNG file (fails on anything else)."""
    assert path.read_bytes()[:8] == PNG, path
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def _check_output(
    out: Path, module: pl.LightningModule, dataset_yaml: Path, imgsz: int, methods: list[str], max_objects: int
) -> dict:
    """The written JSON equals ``detect`` of the original module on the same letterboxed images; the highest-scoring
    ``max_objects`` detections of each image are explained by every method, each with a PNG panel; the contact sheet
    is a PNG grid of exactly those panels; nothing else is in ``panels/``."""
    data = json.loads((out / "explanations.json").read_text())
    _, split = read_dataset_yaml(dataset_yaml)
    images = YoloDataset(split["val"], names=NAMES, imgsz=imgsz)  # the yaml's val split, letterboxed as explain does
    assert [im["path"] for im in data["images"]] == [str(p) for p in images.image_paths] and len(images) == 2
    assert data["methods"] == methods and data["names"] == NAMES
    assert data["conf"] == CONF
    adapter = module.xai_adapter()
    adapter.conf = CONF
    panels, sizes = set(), []
    for i, im in enumerate(data["images"]):
        dets = adapter.detect(images[i]["image"][None])[0]
        assert len(im["detections"]) == len(dets) > max_objects
        assert im["input_size"] == [imgsz, imgsz]
        kw = {"atol": 1e-5, "rtol": 0}
        torch.testing.assert_close(torch.tensor([d["box"] for d in im["detections"]]), dets.boxes, **kw)
        torch.testing.assert_close(torch.tensor([d["score"] for d in im["detections"]]), dets.scores, **kw)
        assert [d["label"] for d in im["detections"]] == dets.labels.tolist()
        assert [d["candidate"] for d in im["detections"]] == dets.candidates.tolist()
        assert [d["name"] for d in im["detections"]] == [NAMES[k] for k in dets.labels.tolist()]
        top = torch.argsort(dets.scores, descending=True, stable=True)[:max_objects].tolist()
        assert [j for j, d in enumerate(im["detections"]) if d["explained"]] == sorted(top)
        for j in top:
            d = im["detections"][j]
            assert set(d["panels"]) == set(d["checks"]) == set(methods)
            for method in methods:
                assert 0.0 <= d["checks"][method]["energy_in_box"] <= 1.0
                assert d["panels"][method] == f"panels/{method}/{i:04d}_{Path(im['path']).stem}_det{j:02d}.png"
                panels.add(d["panels"][method])
                sizes.append(_is_png(out / d["panels"][method]))
    assert len(panels) == len(data["images"]) * max_objects * len(methods)
    assert {str(p.relative_to(out)) for p in (out / "panels").rglob("*.png")} == panels
    cols = min(4, len(sizes))
    rows = -(-len(sizes) // cols)
    pw, ph = max(w for w, _ in sizes), max(h for _, h in sizes)
    assert _is_png(out / "contact_sheet.png") == (cols * pw, rows * ph)
    assert set(json.loads((out / MARKER).read_text())["files"]) == {*panels, "contact_sheet.png", "explanations.json"}
    return data


def _boxes(data: dict) -> list:
    return [[(d["box"], d["score"], d["label"], d["candidate"]) for d in im["detections"]] for im in data["images"]]


def _check_maps(result, data: dict) -> None:
    """``explain_images``' in-memory maps: one per explained detection and method, finite, not constant, and the
    JSON's energy in box is that of this map."""
    from xaiwatch.checks import energy_in_box

    expected = {
        (i, j, m)
        for i, im in enumerate(data["images"])
        for j, d in enumerate(im["detections"])
        if d["explained"]
        for m in METHODS
    }
    assert set(result.maps) == expected
    for (i, j, method), m in result.maps.items():
        assert torch.isfinite(m).all() and float(m.amax()) > float(m.amin()), (i, j, method)
        det = data["images"][i]["detections"][j]
        energy = float(energy_in_box(m[None].abs(), torch.tensor([det["box"]]))[0])
        assert det["checks"][method]["energy_in_box"] == pytest.approx(energy, abs=1e-6)


def _cli(weights: Path, dataset_yaml: Path, out: Path, imgsz: int, *extra: str) -> None:
    """``xaiwatch explain`` in-process: saliency of the best detection of each image."""
    argv = ["explain", "--weights", str(weights), str(dataset_yaml), "--out", str(out), "--imgsz", str(imgsz)]
    assert main([*argv, "--methods", "saliency", "--max-objects", "1", "--conf", str(CONF), *extra]) == 0


def _explain_both(weights: Path, dataset_yaml: Path, work: Path, imgsz: int, module, capsys):
    """The command into ``work/explained/cli`` and the function into ``work/explained/python``, each output checked,
    the two finding the same detections; returns the function's result and its JSON."""
    _cli(weights, dataset_yaml, work / "explained" / "cli", imgsz)
    assert "detections on 2 images" in capsys.readouterr().out
    cli = _check_output(work / "explained" / "cli", module, dataset_yaml, imgsz, ["saliency"], 1)
    out = work / "explained" / "python"
    result = explain_images(weights, dataset_yaml, METHODS, out, MAX_OBJECTS, imgsz, conf=CONF, progress=False)
    data = _check_output(out, module, dataset_yaml, imgsz, METHODS, MAX_OBJECTS)
    assert _boxes(cli) == _boxes(data)  # the command and the function find the same detections
    _check_maps(result, data)
    return result, data


# --------------------------------------------------------------------------------------------------- .ckpt
def test_explain_lightning_checkpoint_of_damo_module(trained, dataset_yaml, capsys):
    module, ckpt = trained
    work = ckpt.parent
    (work / "notes.txt").write_bytes(b"\x00my notes\xff")
    before = _digest(work)
    _explain_both(ckpt, dataset_yaml, work, 64, module, capsys)
    after = _digest(work)
    assert {k: v for k, v in after.items() if not k.startswith("explained/")} == before  # .ckpt and notes untouched


# ------------------------------------------------------------------------------------------------ directory
def test_explain_damo_directory(trained, dataset_yaml, tmp_path, capsys):
    """Read without executing ``damoyolo.py``; 80 px is not a multiple of 32: DAMO pads, the maps stay 80 px."""
    module, _ = trained
    root = write_damo_directory(tmp_path / "damo_model", module)
    (tmp_path / "mine.bin").write_bytes(b"\x01\x02\x03")
    before = _digest(tmp_path)
    result, data = _explain_both(root, dataset_yaml, tmp_path, 80, module, capsys)
    assert all(m.shape == (1, 80, 80) for m in result.maps.values())
    assert not (root / "EXECUTED").exists()
    assert {k: v for k, v in _digest(tmp_path).items() if not k.startswith("explained/")} == before
    # the names given on the command line when the directory carries none
    bare = write_damo_directory(tmp_path / "no_names", module, class_names=False)
    _cli(bare, dataset_yaml, tmp_path / "named", 80, "--names", ",".join(NAMES))
    assert _boxes(_check_output(tmp_path / "named", module, dataset_yaml, 80, ["saliency"], 1)) == _boxes(data)


def test_explain_damo_directory_of_a_newer_head(trained, dataset_yaml, tmp_path, image, capsys):
    """A head without the background channel: refused with the flag to pass; with it, the module's detections."""
    module, _ = trained
    state = {k: (v[:3] if k.startswith("head.gfl_cls") else v) for k, v in module.net.state_dict().items()}
    root = write_damo_directory(tmp_path / "newer", module, state=state)
    _refused(
        root, tmp_path, r"without the extra background channel.*`xaiwatch explain --pad-background`", capsys=capsys
    )
    _cli(root, dataset_yaml, tmp_path / "padded", 64, "--pad-background")
    _check_output(tmp_path / "padded", module, dataset_yaml, 64, ["saliency"], 1)


# ------------------------------------------------------------------------------------------------ bad input
class _Other(pl.LightningModule):
    """Not a detector; ``size`` is also a hyper-parameter of DamoYoloModule."""

    def __init__(self, size: int = 3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Linear(2, size)


class _Bare(pl.LightningModule):
    """No hyper-parameters saved."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)


def _save(module: pl.LightningModule, path: Path) -> Path:
    trainer = _trainer(max_steps=1)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(path)
    return path


def _refused(weights: Path, tmp_path: Path, match: str, *extra: str, capsys) -> None:
    out = tmp_path / "refused"
    argv = ["explain", "--weights", str(weights), str(tmp_path / "img.png"), "--out", str(out), "--imgsz", "64"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("xaiwatch explain: error: ")
    assert re.search(match, err, re.S), err
    assert not out.exists()  # refused before anything was written


@pytest.fixture
def image(tmp_path):
    Image.new("RGB", (64, 48), (90, 120, 30)).save(tmp_path / "img.png")
    return tmp_path / "img.png"


@pytest.mark.parametrize("kind", ["other", "bare"])
def test_bad_input_lightning_checkpoint_of_another_module(tmp_path, image, kind, capsys):
    path = _save(_Other(size=4) if kind == "other" else _Bare(), tmp_path / f"{kind}.ckpt")
    hp = "hyper-parameters \\['size'\\]" if kind == "other" else "hyper-parameters \\[\\]"
    _refused(
        path, tmp_path, rf"is a Lightning checkpoint but not of YOLOv8Module or DamoYoloModule.*{hp}", capsys=capsys
    )


def test_bad_input_damo_checkpoint_of_another_class_count(trained, tmp_path, image, capsys):
    """Hyper-parameters saying 5 classes, tensors of 3: a message naming the layer, not torch's RuntimeError."""
    _, ckpt = trained
    with torch.serialization.safe_globals([type(Path())]):  # the data module's dataset_yaml
        data = torch.load(ckpt, map_location="cpu", weights_only=True)
    data["hyper_parameters"].update(num_classes=5, names=[*NAMES, "d", "e"])
    torch.save(data, tmp_path / "edited.ckpt")
    match = r"does not match the DamoYoloModule\(num_classes=5\).*size mismatch for net.head.gfl_cls.0.weight"
    _refused(tmp_path / "edited.ckpt", tmp_path, match, capsys=capsys)
    with pytest.raises(ConfigurationError, match="only for a DAMO-YOLO model directory"):
        explain_images(ckpt, image, out=tmp_path / "o", names=NAMES)
    with pytest.raises(ConfigurationError, match="`weights` is an adapter already built: set `adapter.names`"):
        explain_images(trained[0].xai_adapter(), image, out=tmp_path / "o", names=NAMES)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("change", "match", "extra"),
    [
        ("no_weights", r"Weights file missing.*'damoyolo_tiny.pth' \(model.name in damoyolo.py\)", ()),
        ("config_classes", r"3 class names for a model with 5 classes \(model.head.num_classes in damoyolo.py\)", ()),
        (
            "checkpoint_classes",
            r"Class-count mismatch: the checkpoint's `head.gfl_cls.0.weight` has 4 output channels.*num_classes=5",
            ("--names", "a,b,c,d,e"),
        ),
        ("no_names", r"does not unpickle.*`xaiwatch explain --names a,b,...`", ()),
        ("names_count", r"2 class names for a model with 3 classes", ("--names", "a,b")),
        (
            "weights_file",
            r"holds the tensors of a DAMO-YOLO network, not its architecture. Pass its model directory",
            (),
        ),
    ],
)
def test_bad_input_damo_directory(trained, tmp_path, image, change, match, extra, capsys):
    module, _ = trained
    root = write_damo_directory(tmp_path / "m", module, class_names=change in ("no_weights", "config_classes"))
    config = root / "damoyolo.py"
    if change == "no_weights":
        (root / "damoyolo_tiny.pth").unlink()
    if change in ("config_classes", "checkpoint_classes"):
        assert "'num_classes': 3" in config.read_text()
        config.write_text(config.read_text().replace("'num_classes': 3", "'num_classes': 5"))
    before = _digest(root)
    weights = root / "damoyolo_tiny.pth" if change == "weights_file" else root
    _refused(weights, tmp_path, match, *extra, capsys=capsys)
    assert _digest(root) == before and not (root / "EXECUTED").exists()


def test_the_datamodule_saves_its_path_as_text(tmp_path):
    """A Path in the hyper-parameters would make every Trainer checkpoint need weights_only=False to load."""
    import pickle

    from xaiwatch.data import YoloDataModule, generate

    data = generate(tmp_path / "d", num_train=2, num_val=2, imgsz=64)  # the dataset.yaml, a Path
    dm = YoloDataModule(data, imgsz=64, check_images=False)
    assert dm.hparams["dataset_yaml"] == str(data) and dm.dataset_yaml == data
    assert b"pathlib" not in pickle.dumps(dict(dm.hparams))
