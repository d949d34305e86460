"""RTDETRModule: ultralytics' RT-DETR loss with denoising queries, validation mAP on its post-processing."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from conftest import SquaresDataset, collate, tiny_rtdetr_cfg
from xaiwatch.adapters import RTDETRAdapter
from xaiwatch.core.errors import ConfigurationError
from xaiwatch.models import RTDETRModule


def _module(**kw) -> RTDETRModule:
    pl.seed_everything(0)
    return RTDETRModule(tiny_rtdetr_cfg(), num_classes=3, **kw)


def test_training_step_uses_denoising_and_reaches_every_parameter():
    module = _module()
    batch = collate([SquaresDataset(4, 0)[i] for i in range(4)])
    module.net.train()
    seen = {}
    head = module.net.model[-1]
    hook = head.register_forward_hook(lambda _m, _i, out: seen.__setitem__("dn_meta", out[-1]))
    try:
        loss = module.training_step(batch, 0)
    finally:
        hook.remove()
    assert seen["dn_meta"] is not None and seen["dn_meta"]["dn_num_split"][0] > 0  # denoising queries were added
    assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
    grads = torch.autograd.grad(loss, [p for p in module.net.parameters()], allow_unused=True)
    unused = [n for (n, _), g in zip(module.net.named_parameters(), grads) if g is None]
    assert not unused, unused[:5]
    # the same loss as ultralytics' own call on its batch layout
    pl.seed_everything(1)
    ours = module.training_step(batch, 0)
    pl.seed_everything(1)
    ref, _ = module.net.loss(module._batch(batch))
    assert torch.allclose(ours, ref)


def test_validation_logs_map_from_rtdetr_postprocessing():
    module = _module(val_conf=0.0)
    batch = collate([SquaresDataset(4, 1)[i] for i in range(4)])
    module.net.eval()
    with torch.no_grad():
        module.validation_step(batch, 0)
    result = module.map_metric.compute()
    assert 0.0 <= float(result["map_50"]) <= 1.0
    # mAP saw the adapter's detections: 300 queries x 3 classes at conf 0, capped by max_det=300
    assert isinstance(module.xai_adapter(), RTDETRAdapter)


def test_bad_arguments():
    with pytest.raises(ConfigurationError, match="RTDETRDecoder"):
        RTDETRModule("yolov8n.yaml", num_classes=3)
    with pytest.raises(ConfigurationError, match="num_classes"):
        RTDETRModule(tiny_rtdetr_cfg(), num_classes=0)
    with pytest.raises(ConfigurationError, match="val_conf"):
        RTDETRModule(tiny_rtdetr_cfg(), num_classes=3, val_conf=2.0)
