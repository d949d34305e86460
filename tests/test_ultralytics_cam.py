"""Our per-box ``layer_cam`` on the Detect head's inputs equals ultralytics' own LayerCAM before its merge.

ultralytics 8.4's ``ultralytics.utils.plotting.class_activation_map`` (``predict(visualize=True)``) explains up to
``topk`` predictions, one backward each, at the three head inputs; for prediction ``k`` and level ``l`` it computes
``relu(sum_c relu(dL/dA) * A)`` (LayerCAM, of the best class logit), upsamples it bilinearly to the image, divides
it by its maximum, and max-merges levels and predictions into one picture. The per-box, per-level maps before the
merge are local variables (``levels``) of that function; this test reads them with a line tracer on its frame,
without changing ultralytics' code, and compares them with ours normalised the same way.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from xaiwatch.explain import get_engine
from xaiwatch.targets import BoxTarget


class _Backend(nn.Module):
    """The shape ultralytics' function expects: ``model.model`` is the DetectionModel (as AutoBackend)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.model = net

    def forward(self, x: torch.Tensor):
        return self.model(x)


def ultralytics_levels(net: nn.Module, image: torch.Tensor, topk: int, tmp_path) -> tuple[list, torch.Tensor]:
    """Run ultralytics' class_activation_map; return its per-prediction list of per-level maps and the order."""
    from ultralytics.utils import plotting

    code = plotting.class_activation_map.__code__
    seen: list[list[torch.Tensor]] = []
    state: dict = {}

    def local(frame, event, arg):
        if event == "line":
            levels, n_acts = frame.f_locals.get("levels"), len(frame.f_locals.get("acts", []))
            if isinstance(levels, list) and n_acts and len(levels) == n_acts:
                if not seen or seen[-1] is not levels:
                    seen.append(levels)
            if "order" in frame.f_locals:
                state["order"] = frame.f_locals["order"]
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is code else None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        plotting.class_activation_map(_Backend(net), image, ["probe.jpg"], tmp_path, conf=0.0, topk=topk)
    finally:
        sys.settrace(old)
    return [[m.detach().clone() for m in levels] for levels in seen], state["order"][0]


@pytest.mark.real
def test_layer_cam_matches_ultralytics_per_box_before_merge(tmp_path):
    from xaiwatch.data import real
    from xaiwatch.data.yolo import YoloDataset
    from xaiwatch.posthoc import load_detector

    adapter = load_detector(real.fall_detector_weights(), trust_pickle=True)
    net = adapter.model
    for p in net.parameters():
        p.requires_grad_(False)  # as ultralytics' AutoBackend leaves them; our engines do not need them
    image = YoloDataset([real.ultralytics_asset("bus.jpg")], names=adapter.names, imgsz=320)[0]["image"][None]
    k = 4
    theirs, order = ultralytics_levels(net, image, k, tmp_path)
    assert len(theirs) == k and all(len(levels) == 3 for levels in theirs)
    with torch.no_grad():
        scores = adapter.raw(image).scores[0]
    levels_of = adapter.raw(image).levels
    targets = [BoxTarget(int(c), int(scores[int(c)].argmax())) for c in order.tolist()]
    for level, layer in enumerate(("neck.p3", "neck.p4", "neck.p5")):
        ours = get_engine("layer_cam", adapter, layer=layer).attribute_boxes(image, targets)
        ours = ours / ours.amax(dim=(2, 3), keepdim=True).clamp(min=1e-7)
        for j in range(k):
            torch.testing.assert_close(ours[j], theirs[j][level][0], atol=1e-4, rtol=1e-3)
    # one engine over the group "neck": per box, the three levels normalised and max-merged as ultralytics does
    merged_ours = get_engine("layer_cam", adapter, layer="neck").attribute_boxes(image, targets)
    for j in range(k):
        torch.testing.assert_close(merged_ours[j], torch.stack(theirs[j]).amax(0)[0], atol=1e-4, rtol=1e-3)
    for j, c in enumerate(order.tolist()):  # not a trivial agreement: each box's own level is a real map
        own = theirs[j][int(levels_of[c])]
        assert float(own.max()) == pytest.approx(1.0) and float(own.mean()) < 0.5
    # their merged picture is the max over levels and predictions of exactly these maps
    merged = torch.stack([torch.stack(levels).amax(0) for levels in theirs]).amax(0)
    assert merged.shape == (1, 1, 320, 320) and float(merged.max()) == pytest.approx(1.0)
