"""Shared fixtures: a tiny YOLO-shaped detector built from config and a tiny in-memory detection dataset."""

from __future__ import annotations

import os

os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

TINY_SIZE = 64


def tiny_cfg() -> dict:
    """yolov8.yaml at width 1/16 (about 0.35 M parameters, most of them in the fixed-width box branch)."""
    from ultralytics.nn.tasks import yaml_model_load

    cfg = dict(yaml_model_load("yolov8n.yaml"))
    cfg["scales"] = {"t": [0.33, 0.0625, 1024]}
    cfg["scale"] = "t"
    return cfg


@pytest.fixture
def tiny_net():
    """A freshly initialised tiny ultralytics DetectionModel with 3 classes (seeded)."""
    from xaiwatch.models.yolov8 import build_detection_model

    torch.manual_seed(0)
    return build_detection_model(tiny_cfg(), 3)


def tiny_damo_arch() -> dict:
    """A DAMO-YOLO of the official kind (TinyNAS_res with Focus, SPP and RepConv, GiraffeNeckV2, ZeroHead) at 1/8
    width and one block per stage: about 0.15 M parameters, 84 candidates at 64 px like the tiny YOLOv8."""

    def res(cin: int, cout: int, btn: int, s: int) -> dict:
        return {"class": "SuperResConvK1KX", "in": cin, "out": cout, "btn": btn, "k": 3, "s": s, "L": 1}

    structure = [{"class": "ConvKXBNRELU", "in": 3, "out": 8, "k": 3, "s": 1}]
    structure += [res(8, 16, 8, 2), res(16, 24, 16, 2), res(24, 32, 16, 2), res(32, 32, 16, 1), res(32, 48, 24, 2)]
    return {
        "backbone": {
            "name": "TinyNAS_res",
            "structure": structure,
            "out_indices": (2, 4, 5),
            "with_spp": True,
            "use_focus": True,
            "act": "relu",
            "reparam": True,
        },
        "neck": {
            "name": "GiraffeNeckV2",
            "depth": 0.33,
            "hidden_ratio": 0.5,
            "in_channels": [24, 32, 48],
            "out_channels": [16, 24, 32],
            "act": "relu",
            "spp": False,
            "block_name": "BasicBlock_3x3_Reverse",
        },
        "head": {"name": "ZeroHead", "in_channels": [16, 24, 32], "stacked_convs": 0, "reg_max": 16, "act": "silu"},
    }


def tiny_damo_module(**kwargs):
    """A seeded :class:`DamoYoloModule` of :func:`tiny_damo_arch` with 3 classes."""
    import pytorch_lightning as pl

    from xaiwatch.models import DamoYoloModule

    pl.seed_everything(0)
    return DamoYoloModule(num_classes=3, architecture=tiny_damo_arch(), **{"lr": 5e-3, "warmup_steps": 1, **kwargs})


@pytest.fixture
def tiny_damo_net():
    """A freshly initialised tiny DAMO-YOLO ``Detector`` with 3 classes (seeded), in eval mode."""
    return tiny_damo_module().net.eval()


class SquaresDataset(Dataset):
    """``n`` noisy 64 px images, each with one filled square whose colour channel is its class."""

    def __init__(self, n: int, seed: int, size: int = TINY_SIZE) -> None:
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for i in range(n):
            img = torch.rand(3, size, size, generator=g) * 0.3
            s = size // 3
            x, y = torch.randint(0, size - s, (2,), generator=g).tolist()
            c = i % 3
            img[c, y : y + s, x : x + s] = 1.0
            box = torch.tensor([[x, y, x + s, y + s]], dtype=torch.float32)
            self.items.append({"image": img, "boxes": box, "labels": torch.tensor([c]), "index": i, "path": f"#{i}"})

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate(items: list[dict]) -> dict:
    return {
        "images": torch.stack([i["image"] for i in items]),
        "boxes": [i["boxes"] for i in items],
        "labels": [i["labels"] for i in items],
        "indices": torch.tensor([i["index"] for i in items]),
    }


@pytest.fixture
def square_loaders():
    """(train, val) dataloaders of the squares dataset: 16 and 8 images, batch 8."""
    return (
        DataLoader(SquaresDataset(16, 0), batch_size=8, collate_fn=collate),
        DataLoader(SquaresDataset(8, 1), batch_size=8, collate_fn=collate),
    )


@pytest.fixture
def images():
    torch.manual_seed(1)
    return torch.rand(2, 3, TINY_SIZE, TINY_SIZE)


@pytest.fixture(autouse=True)
def _restore_global_torch_flags():
    """Trainer(deterministic=True) turns on torch.use_deterministic_algorithms globally and never turns it off."""
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    torch.set_num_threads(threads)


def tiny_rtdetr_cfg(width: int = 32, layers: int = 2) -> dict:
    """An RT-DETR of the official kind (conv backbone, AIFI encoder layer, CCFM fusion with RepC3, RTDETRDecoder with
    deformable cross-attention over 3 levels) at hidden width ``width``, 4 heads, ``layers`` decoder layers, 300
    queries: about 0.22 M parameters at width 32 (rtdetr-l: 32.8 M)."""
    c = width
    conv = [[-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "C2f", [16, True]]]
    conv += [
        [-1, 1, "Conv", [c, 3, 2]],
        [-1, 1, "C2f", [c, True]],
        [-1, 1, "Conv", [c, 3, 2]],
        [-1, 1, "C2f", [c, True]],
    ]
    conv += [[-1, 1, "Conv", [2 * c, 3, 2]], [-1, 1, "C2f", [2 * c, True]]]  # 8: P5
    head = [[-1, 1, "Conv", [c, 1, 1, None, 1, 1, False]], [-1, 1, "AIFI", [2 * c, 4]], [-1, 1, "Conv", [c, 1, 1]]]
    head += [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [6, 1, "Conv", [c, 1, 1, None, 1, 1, False]]]
    head += [[[-2, -1], 1, "Concat", [1]], [-1, 1, "RepC3", [c]], [-1, 1, "Conv", [c, 1, 1]]]  # 16: Y4
    head += [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [4, 1, "Conv", [c, 1, 1, None, 1, 1, False]]]
    head += [[[-2, -1], 1, "Concat", [1]], [-1, 1, "RepC3", [c]]]  # 20: X3
    head += [[-1, 1, "Conv", [c, 3, 2]], [[-1, 16], 1, "Concat", [1]], [-1, 1, "RepC3", [c]]]  # 23: F4
    head += [[-1, 1, "Conv", [c, 3, 2]], [[-1, 11], 1, "Concat", [1]], [-1, 1, "RepC3", [c]]]  # 26: F5
    head += [[[20, 23, 26], 1, "RTDETRDecoder", ["nc", c, 300, 4, 4, layers, 2 * c]]]
    return {"nc": 3, "scales": {"t": [1.0, 1.0, 1024]}, "scale": "t", "backbone": conv, "head": head}


@pytest.fixture
def tiny_rtdetr_net():
    """A freshly initialised tiny ultralytics RTDETRDetectionModel (:func:`tiny_rtdetr_cfg`), 3 classes, eval mode."""
    from ultralytics.nn.tasks import RTDETRDetectionModel

    torch.manual_seed(0)
    return RTDETRDetectionModel(tiny_rtdetr_cfg(), nc=3, verbose=False).eval()


# --------------------------------------------------------------------------------------------------- no network
_LOOPBACK_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback", ""}


def _is_local_host(host: object) -> bool:
    """Loopback names and addresses (127.0.0.0/8, ::1) and the wildcard address: the only hosts tests may reach."""
    import ipaddress

    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    text = str(host).strip("[]").split("%")[0].lower()
    if text in _LOOPBACK_NAMES:
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _host_port(address: object) -> tuple[object, object]:
    if isinstance(address, tuple) and address:
        return address[0], address[1] if len(address) > 1 else None
    return address, None


class _NetworkGuard:
    """Wrappers of the socket entry points that refuse hosts which are not local (see :func:`_no_network`)."""

    def __init__(self) -> None:
        import socket

        self.attempts: list[str] = []
        self.real = {
            "connect": socket.socket.connect,
            "connect_ex": socket.socket.connect_ex,
            "getaddrinfo": socket.getaddrinfo,
            "create_connection": socket.create_connection,
        }

    def refuse(self, what: str, address: object) -> None:
        host, port = _host_port(address)
        target = f"{host}:{port}" if port is not None else str(host)
        self.attempts.append(target)
        pytest.fail(
            f"network access blocked in tests: {what} to {target}. Tests are offline: build models from their "
            "config, generate data, and never download (set YOLO_OFFLINE=1; pass local weight files)."
        )

    def check_socket(self, sock: object, what: str, address: object) -> None:
        import socket

        if getattr(sock, "family", None) in (socket.AF_INET, socket.AF_INET6) and not _is_local_host(
            _host_port(address)[0]
        ):
            self.refuse(what, address)

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import socket

        real = self.real

        def connect(sock: socket.socket, address: object) -> None:
            self.check_socket(sock, "socket.connect", address)
            return real["connect"](sock, address)

        def connect_ex(sock: socket.socket, address: object) -> int:
            self.check_socket(sock, "socket.connect_ex", address)
            return real["connect_ex"](sock, address)

        def getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> list:
            if not _is_local_host(host):
                self.refuse("socket.getaddrinfo (name lookup)", (host, port))
            return real["getaddrinfo"](host, port, *args, **kwargs)

        def create_connection(address: object, *args: object, **kwargs: object) -> socket.socket:
            if not _is_local_host(_host_port(address)[0]):
                self.refuse("socket.create_connection", address)
            return real["create_connection"](address, *args, **kwargs)

        monkeypatch.setattr(socket.socket, "connect", connect)
        monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
        monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
        monkeypatch.setattr(socket, "create_connection", create_connection)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch):
    """Fail any test that tries to reach the network (a download anywhere); loopback and AF_UNIX stay allowed.

    Connections go through ``socket.socket.connect`` / ``connect_ex``, ``socket.create_connection`` and name
    resolution through ``socket.getaddrinfo``; each refuses a host that is not local. The attempt raises
    ``pytest.fail``'s exception (a ``BaseException``, which a library's ``except Exception`` cannot swallow) and is
    also recorded, so the test fails at teardown even if something caught it. Yields the recorded attempts.
    Subprocesses (e.g. the proof's example runs) are not covered.
    """
    guard = _NetworkGuard()
    guard.install(monkeypatch)
    yield guard.attempts
    if guard.attempts:
        pytest.fail(f"the test tried to reach the network ({', '.join(guard.attempts)}), even if the error was caught")
