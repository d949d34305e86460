"""All K boxes of one image: our one-forward + one-batched-backward vs pytorch-grad-cam once per box vs the floor.

YOLOv8n (3 classes, from the yaml), batch 1, 320 px, CPU. The floor is one forward + one backward to the input.
Run: python benchmarks/bench_allboxes.py
"""

from __future__ import annotations

import copy
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from run import smoke, timeit, yolov8n  # noqa: E402


def bench_allboxes(repeat: int = 3, ks: tuple[int, ...] | None = None) -> dict:
    """Seconds and x-floor of all-box saliency and Grad-CAM (ours) and Grad-CAM per box (pytorch-grad-cam)."""
    from pytorch_grad_cam import GradCAM

    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import BoxTarget

    net = yolov8n()
    adapter = YOLOv8Adapter(net)
    torch.manual_seed(0)
    ks = ks or ((1, 4) if smoke() else (1, 4, 16))
    size = 160 if smoke() else 320
    x = torch.rand(1, 3, size, size)

    def floor():
        xi = x.clone().requires_grad_()
        torch.autograd.grad(adapter.score(xi, BoxTarget(0, 0)).sum(), xi)

    class RawScores(torch.nn.Module):
        """The raw class scores (N, C) of the model, the output pytorch-grad-cam's targets index."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net
            self.adapter = YOLOv8Adapter(net)

        def forward(self, images):
            return self.adapter.raw(images).scores

    peer_model = RawScores(copy.deepcopy(net))  # pytorch-grad-cam keeps hooks on its model: give it a copy
    peer = GradCAM(model=peer_model, target_layers=[peer_model.net.model[15]])
    saliency, grad_cam = get_engine("saliency", adapter), get_engine("grad_cam", adapter, layer="neck.p3")
    # the same engine without the level-head shortcut: one batched backward through the whole head and neck
    full = YOLOv8Adapter(net)
    full.level_head = lambda layer: None
    grad_cam_full = get_engine("grad_cam", full, layer="neck.p3")

    def input_gradients(targets):  # plain torch: one forward, one batched backward of K input gradients
        xi = x.clone().requires_grad_()
        raw = adapter.raw(xi)
        scores = torch.cat([t(raw) for t in targets])
        torch.autograd.grad(scores, xi, torch.eye(len(targets)), is_grads_batched=True)

    floor_s = timeit(floor, repeat)
    results: dict = {"floor_seconds": floor_s}
    for k in ks:
        targets = [BoxTarget(97 * i + 5, i % 3) for i in range(k)]  # P3 candidates, explained at neck.p3
        rows = {
            "saliency, all boxes (ours)": lambda targets=targets: saliency.attribute_boxes(x, targets),
            "K input gradients, one batched backward (plain torch)": lambda targets=targets: input_gradients(targets),
            "grad_cam, all boxes (ours)": lambda targets=targets: grad_cam.attribute_boxes(x, targets),
            "grad_cam, all boxes, whole-head backward (ours without the level shortcut)": lambda targets=targets: (
                grad_cam_full.attribute_boxes(x, targets)
            ),
            "grad_cam, once per box (pytorch-grad-cam 1.5.7)": lambda targets=targets: [
                peer(input_tensor=x, targets=[lambda out, c=t.candidate, lab=t.label: out[c, lab]]) for t in targets
            ],
        }
        results[f"K={k}"] = {name: timeit(fn, repeat) / floor_s for name, fn in rows.items()}
    return results


if __name__ == "__main__":
    print(json.dumps(bench_allboxes(), indent=1))
