"""Production guards: one checkpoint folder per gate, no network, no ultralytics wrapper, clear bad-input errors."""

from __future__ import annotations

import socket
import tempfile
import urllib.request
from pathlib import Path

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import TensorBoardLogger
from torch import nn

from conftest import tiny_cfg
from xaiwatch.callbacks import ExplainCallback, GatedModelCheckpoint, SaliencyGate, load_callbacks
from xaiwatch.cli import main, merge_config_callbacks, xaiwatch_cli_class
from xaiwatch.core.errors import ConfigurationError, DatasetFormatError, UnsupportedModelError
from xaiwatch.data import YoloDataModule, generate
from xaiwatch.models import YOLOv8Module

FIVE = ("circle", "square", "triangle", "ring", "star")


def _trainer(tmp_path: Path, callbacks: list, **kw: object) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=1,
        limit_train_batches=1,
        logger=TensorBoardLogger(str(tmp_path), name="tb"),
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        accelerator="cpu",
        **kw,
    )


def _module() -> YOLOv8Module:
    pl.seed_everything(0)
    return YOLOv8Module(tiny_cfg(), num_classes=3, lr=5e-3, warmup_steps=1)


# ------------------------------------------------------------------------------------------ checkpoint guarantee
@pytest.mark.parametrize(
    "gated_dir, plain_dir",
    [(None, None), ("ckpt", "x/../ckpt")],
    ids=["both-on-the-default-folder", "same-folder-spelled-differently"],
)
def test_another_checkpoint_in_the_gated_folder_stops_at_setup(tmp_path, square_loaders, gated_dir, plain_dir):
    gated = GatedModelCheckpoint(dirpath=gated_dir and tmp_path / gated_dir, save_last=True)
    plain = ModelCheckpoint(dirpath=plain_dir and str(tmp_path / plain_dir), save_last=True)
    model = _module()
    with pytest.raises(ConfigurationError, match=r"ModelCheckpoint\(monitor=None, save_last=True\) writes into the"):
        _trainer(tmp_path, [SaliencyGate(num_probe=2), gated, plain]).fit(model, *square_loaders)
    assert model.global_step == 0  # stopped before the first step
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_checkpoint_in_its_own_folder_is_fine(tmp_path, square_loaders):
    gated = GatedModelCheckpoint(dirpath=tmp_path / "gated", save_last=True)
    plain = ModelCheckpoint(dirpath=tmp_path / "resume", save_last=True)
    trainer = _trainer(tmp_path, [SaliencyGate(num_probe=2, on_error="raise"), gated, plain])
    trainer.fit(_module(), *square_loaders)
    assert (tmp_path / "resume" / "last.ckpt").is_file()  # the resume copy is written where it was asked


# ------------------------------------------------------------------------------------------------- no network
@pytest.mark.parametrize(
    "attempt",
    [
        lambda: socket.create_connection(("example.com", 443), timeout=1),
        lambda: socket.getaddrinfo("pypi.org", 443),
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(("93.184.216.34", 80)),
        lambda: urllib.request.urlopen("https://github.com/ultralytics/assets/releases/download/v0.0.0/coco8.zip"),
    ],
    ids=["create_connection", "getaddrinfo", "connect", "urlopen"],
)
def test_network_attempts_fail_the_test(attempt, _no_network):
    with pytest.raises(
        pytest.fail.Exception, match=r"network access blocked in tests: .* to (example\.com|pypi|93\.|github)"
    ):
        try:
            attempt()
        except Exception:  # noqa: BLE001 - a library swallowing errors does not hide the attempt
            pass
    assert _no_network  # recorded, so the teardown would fail the test too
    _no_network.clear()


def test_loopback_and_unix_sockets_stay_allowed():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    with socket.create_connection(("localhost", port), timeout=5) as client:
        conn, _ = server.accept()
        client.sendall(b"ok")
        assert conn.recv(2) == b"ok"
        conn.close()
    server.close()
    assert socket.getaddrinfo("127.0.0.1", port)
    with tempfile.TemporaryDirectory() as d:
        path = str(Path(d) / "s")
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(path)
        unix.listen(1)
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        peer.connect(path)
        peer.close()
        unix.close()


def test_ultralytics_wrapper_is_refused_at_setup(tmp_path, square_loaders, monkeypatch):
    from ultralytics import YOLO

    wrapper = YOLO("yolov8n.yaml")
    started = []
    monkeypatch.setattr(type(wrapper), "train", lambda self, *a, **k: started.append(a) or self)

    class HoldsWrapper(YOLOv8Module):
        def __init__(self) -> None:
            super().__init__(tiny_cfg(), num_classes=3)
            self.yolo = wrapper

    with pytest.raises(
        UnsupportedModelError, match=r"HoldsWrapper.yolo` is an ultralytics YOLO wrapper.*YOLO\('yolov8n.pt'\).model"
    ):
        _trainer(tmp_path, [ExplainCallback(num_probe=2, on_error="raise")]).fit(HoldsWrapper(), *square_loaders)
    assert not started  # the wrapper's training run never started


# ------------------------------------------------------------------------------------------------- bad input
def _preset(tmp_path: Path, init_args: str) -> Path:
    path = tmp_path / "preset.yaml"
    path.write_text(
        f"trainer:\n  callbacks:\n    - class_path: xaiwatch.callbacks.ExplainCallback\n      init_args: {init_args}\n"
    )
    return path


def test_preset_with_an_unknown_argument(tmp_path, capsys):
    path = _preset(tmp_path, "{num_probes: 4}")
    with pytest.raises(
        ConfigurationError,
        match=r"preset.yaml'?: callbacks\[0\] \(ExplainCallback\): unknown argument num_probes\. Valid arguments of ExplainCallback: .*num_probe",
    ):
        load_callbacks(path)
    out = tmp_path / "demo"
    assert main(["demo", "--callbacks", str(path), "--out", str(out)]) == 2
    assert "unknown argument num_probes" in capsys.readouterr().err
    assert not out.exists()  # the preset is read before anything is written


def test_preset_errors_name_the_file_and_the_callback(tmp_path):
    with pytest.raises(ConfigurationError, match=r"callbacks\[0\] \(ExplainCallback\): .*Valid methods"):
        load_callbacks(_preset(tmp_path, "{methods: [nope]}"))
    with pytest.raises(ConfigurationError, match="is a folder"):
        load_callbacks(tmp_path)
    gated = tmp_path / "gated.yaml"
    gated.write_text(
        "trainer:\n  callbacks:\n    - class_path: xaiwatch.callbacks.GatedModelCheckpoint\n"
        "      init_args: {monitr: val/map50}\n"
    )
    with pytest.raises(ConfigurationError, match=r"unknown argument monitr\. Valid arguments .*monitor"):
        load_callbacks(gated)  # a **kwargs subclass: the arguments of ModelCheckpoint are found


def test_method_options_with_an_unknown_key(tiny_net):
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine

    adapter = YOLOv8Adapter(tiny_net)
    with pytest.raises(
        ConfigurationError,
        match=r"'integrated_gradients' has no option 'n_step'.*Valid options of 'integrated_gradients': .*n_steps",
    ):
        get_engine("integrated_gradients", adapter, n_step=4)
    assert get_engine("integrated_gradients", adapter, n_steps=4).n_steps == 4


def test_dataset_yaml_that_is_a_folder(tmp_path):
    data = generate(tmp_path / "d", num_train=1, num_val=1, imgsz=64)
    with pytest.raises(
        DatasetFormatError, match=r"is a folder; pass the dataset's yaml file \(it holds dataset.yaml\)"
    ):
        YoloDataModule(data.parent)


def test_demo_rejects_bad_numbers_with_a_parser_error(capsys):
    for argv, fragment in (
        (["--imgsz", "-5"], "argument --imgsz: must be an integer >= 32, got -5"),
        (["--epochs", "0"], "argument --epochs: must be an integer >= 1, got 0"),
        (["--batch-size", "two"], "argument --batch-size: must be an integer >= 1, got 'two'"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(["demo", *argv])
        assert exit_info.value.code == 2
        assert fragment in capsys.readouterr().err


def test_version(capsys):
    from xaiwatch import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"xaiwatch {__version__}"


def test_python_dash_m_runs_the_same_command_line():
    import subprocess
    import sys

    from xaiwatch import __version__

    done = subprocess.run([sys.executable, "-m", "xaiwatch", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"xaiwatch {__version__}"


def test_fit_takes_classes_and_names_from_the_dataset_yaml(tmp_path, capsys):
    data = generate(tmp_path / "d", num_train=2, num_val=2, imgsz=64, classes=FIVE)
    base = [
        "--data.dataset_yaml",
        str(data),
        "--trainer.accelerator",
        "cpu",
        "--trainer.default_root_dir",
        str(tmp_path),
    ]
    cli = xaiwatch_cli_class()(YOLOv8Module, YoloDataModule, run=False, args=base)
    assert cli.model.hparams.num_classes == 5 and cli.model.names == list(FIVE)
    assert cli.model.net.model[-1].nc == 5
    with pytest.raises(ConfigurationError, match="`--model.num_classes` is 3 but .* names 5 classes"):
        xaiwatch_cli_class()(YOLOv8Module, YoloDataModule, run=False, args=[*base, "--model.num_classes", "3"])
    # end to end through the command: one training and one validation step of YOLOv8n, no IndexError at validation
    fit = ["fit", *base, "--data.imgsz", "64", "--data.batch_size", "2", "--trainer.fast_dev_run", "1"]
    assert main(fit) == 0


def test_two_config_files_merge_their_callbacks(tmp_path, capsys):
    root = Path(__file__).parents[1] / "callbacks"
    explain, gate = str(root / "explain-default.yaml"), str(root / "gate.yaml")
    args, notes = merge_config_callbacks(["fit", "--config", explain, f"--config={gate}"])
    assert args[2] == explain and args[3].startswith("--config=") and "callbacks+" in args[3]
    assert len(notes) == 1 and notes[0].startswith(gate)
    data = generate(tmp_path / "d", num_train=2, num_val=2, imgsz=64)
    cli = xaiwatch_cli_class()(
        YOLOv8Module,
        YoloDataModule,
        run=False,
        args=[*args[1:], "--data.dataset_yaml", str(data), "--trainer.default_root_dir", str(tmp_path)],
    )
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert {"ExplainCallback", "SaliencyGate", "GatedModelCheckpoint"} <= set(names)


def test_corrupt_training_image_is_found_at_setup(tmp_path):
    data = generate(tmp_path / "d", num_train=6, num_val=2, imgsz=64)
    image = tmp_path / "d" / "images" / "train" / "000004.png"
    image.write_bytes(image.read_bytes()[:200])  # truncated: the header parses, the data does not
    dm = YoloDataModule(data, imgsz=64, batch_size=2)
    with pytest.raises(DatasetFormatError, match=r"1 unreadable image .*000004\.png"):
        dm.setup("fit")
    YoloDataModule(data, imgsz=64, batch_size=2, check_images=False).setup("fit")  # the opt-out


def test_truncated_jpeg_and_non_images_are_found(tmp_path):
    import numpy as np
    from PIL import Image

    from xaiwatch.data.yolo import verify_images

    good, cut, junk = tmp_path / "good.jpg", tmp_path / "cut.jpg", tmp_path / "junk.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good, quality=90)
    cut.write_bytes(good.read_bytes()[:-500])  # PIL's verify() alone accepts it
    junk.write_bytes(b"<html>not an image</html>")
    verify_images([good])
    with pytest.raises(DatasetFormatError, match=r"2 unreadable images .*cut\.jpg .*end-of-image marker.*junk\.png"):
        verify_images([good, cut, junk])


def test_no_adapter_for_a_plain_module_still_explains_what_to_do():
    from xaiwatch.adapters import resolve_adapter

    with pytest.raises(UnsupportedModelError, match="no adapter"):
        resolve_adapter(nn.Sequential(nn.Linear(2, 2)))
