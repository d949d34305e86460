"""SaliencyGate shares its probes across ranks: a probe's values are the same in any share, the merge puts them
back in probe order, and the verdict on the merged values equals the one-process verdict (in one process here;
the 2-rank run is in test_distributed.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import SquaresDataset
from helpers import make_trainer, square_sized, tiny_module
from xaiwatch import checks as C
from xaiwatch.callbacks import SaliencyGate
from xaiwatch.callbacks.base import RunContext
from xaiwatch.callbacks.gate import DEFAULT_CHECKS, GateShare, merge_shares
from xaiwatch.core.errors import ConfigurationError

N = 6
#: the gate's defaults (relative_context_reliance, swap_class_drop, context_swap, context_swap_drop), the presets' map
#: checks, a map check that draws noise for the whole probe set and one that re-initialises a seeded copy of the model
CHECKS = {
    **DEFAULT_CHECKS,
    "energy_concentration": None,
    "pointing_game": None,
    "stability": None,
    "randomization_spearman": None,
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Bit-for-bit equality holds with one thread (a DDP rank's usual setting on CPU): with several, a convolution's
    reduction order depends on the batch size, so a share of 3 probes and a batch of 6 differ in the last bits."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()  # the module-scoped fit's Trainer sets it globally
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal value for value, ``nan`` where the other is ``nan`` too."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return a.shape == b.shape and bool(((a == b) | (a.isnan() & b.isnan())).all())


@pytest.fixture(scope="module")
def probes():
    """``N`` squares images (64 px) with one box each, the tiny YOLOv8 adapter and a saliency engine."""
    from xaiwatch.adapters import YOLOv8Adapter
    from xaiwatch.explain import get_engine
    from xaiwatch.targets import MatchedBoxTarget

    data = SquaresDataset(N, 3)
    images = torch.stack([data[i]["image"] for i in range(N)])
    gt_boxes = [data[i]["boxes"] for i in range(N)]
    gt_labels = [data[i]["labels"] for i in range(N)]
    boxes = torch.cat(gt_boxes)
    labels = torch.cat(gt_labels)
    adapter = YOLOv8Adapter(square_sized(tiny_module()).net.eval())
    targets = [MatchedBoxTarget(b, int(c), conf=adapter.conf) for b, c in zip(boxes, labels)]
    engines = {"saliency": get_engine("saliency", adapter)}
    options = C.CheckOptions(min_score=0.0, batch_size=4)  # every probe defined, batches that differ by share
    return adapter, engines, images, targets, boxes, labels, gt_boxes, gt_labels, options


def _evaluate(probes, positions=None):
    adapter, engines, images, targets, boxes, labels, gt_boxes, gt_labels, options = probes
    checks = C.parse_rules(CHECKS, list(engines))[1]
    values, _ = C.evaluate_probes(
        adapter,
        engines,
        images,
        targets,
        boxes,
        gt_boxes,
        checks,
        options,
        labels=labels,
        gt_labels=gt_labels,
        positions=positions,
    )
    return values


def test_two_interleaved_shares_give_the_full_evaluation_exactly(probes):
    full = _evaluate(probes)
    even, odd = [p for p in range(N) if p % 2 == 0], [p for p in range(N) if p % 2 == 1]
    shares = [GateShare([(p,) for p in share], values=_evaluate(probes, share)) for share in (even, odd)]
    merged = merge_shares(shares)
    assert list(merged) == list(full)  # the same checks, in the same order
    assert {"context_swap", "relative_context_reliance", "energy_concentration/saliency"} <= set(full)
    for key in full:
        assert _same(merged[key], full[key]), key
    assert not full["context_swap"].isnan().all() and not full["relative_context_reliance"].isnan().any()
    rules = C.parse_rules(CHECKS, ["saliency"])[0]
    one, split = C.judge(full, rules, min_defined=2, seed=3), C.judge(merged, rules, min_defined=2, seed=3)
    assert split.to_dict() == one.to_dict()  # means, defined counts and bootstrap intervals alike


def test_a_share_in_another_order_gives_each_probe_its_own_values(probes):
    full = _evaluate(probes)
    order = [4, 1, 5]  # the donors of context_swap come from the whole set, not from the share
    part = _evaluate(probes, order)
    for key in full:
        assert _same(part[key], full[key][order]), key


def test_positions_must_be_a_share_of_the_probe_set(probes):
    for bad in ([], [0, 0], [N], [-1], [1.5], "01"):
        with pytest.raises(ConfigurationError, match="positions"):
            _evaluate(probes, bad)
    adapter, _, images, _, boxes, labels, gt_boxes, _, _ = probes
    with pytest.raises(ConfigurationError, match="positions"):
        C.context_swap(adapter, images, boxes, labels, gt_boxes, positions=[0, N])


def test_merge_scatters_per_probe_values_and_keeps_model_level_numbers():
    a = GateShare([(0,), (2,)], values={"x": torch.tensor([0.0, 2.0]), "model": 0.5})
    b = GateShare([(1,)], values={"x": torch.tensor([1.0]), "model": 0.5})
    merged = merge_shares([a, b])
    assert merged["x"].tolist() == [0.0, 1.0, 2.0] and merged["model"] == 0.5
    with pytest.raises(ValueError, match="do not split"):
        merge_shares([a, a])
    with pytest.raises(ValueError, match="2 values for the 1 probes"):
        merge_shares([a, GateShare([(1,)], values={"x": torch.tensor([1.0, 3.0])})])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A gate with the default checks, set up by a one-epoch fit of the tiny YOLOv8 on the squares data."""
    from torch.utils.data import DataLoader

    from conftest import collate

    gate = SaliencyGate(num_probe=N, options={"min_score": 0.0, "batch_size": 4}, on_error="raise")
    train = DataLoader(SquaresDataset(8, 0), batch_size=4, collate_fn=collate)
    val = DataLoader(SquaresDataset(N, 3), batch_size=N, collate_fn=collate)  # probes with donors
    make_trainer(tmp_path_factory.mktemp("gate_shares"), [gate], epochs=1).fit(square_sized(tiny_module()), train, val)
    return gate


def _ctx(rank: int, world: int) -> RunContext:
    return RunContext(step=2, epoch=1, stage="fit", device=torch.device("cpu"), rank=rank, world_size=world)


def _decision(record: dict) -> str:
    """A gate record without its wall time, as text (``NaN`` compares equal)."""
    return json.dumps({k: v for k, v in record.items() if k != "seconds"}, sort_keys=True)


def test_gate_shares_merge_to_the_one_process_record(fitted):
    gate = fitted
    one = gate._judged(gate._merge([gate._run(list(range(N)), _ctx(0, 1))]), 1, 2)
    records = [gate._run(list(range(r, N, 2)), _ctx(r, 2)) for r in range(2)]
    assert [[p for (p,) in r.items] for r in records] == [[0, 2, 4], [1, 3, 5]]
    assert all(len(v) == 3 for r in records for v in r.values.values())  # each share evaluated its 3 probes only
    two = gate._judged(gate._merge(records), 1, 2)
    assert _decision(two) == _decision(one)  # values, defined counts, bootstrap intervals, status, reasons
    assert set(one["values"]) >= {"context_swap", "relative_context_reliance", "swap_class_drop"}
    assert min(one["defined"].values()) >= N - 1  # defined almost everywhere (one probe has no swap donor)
    assert _decision(gate.history[-1]) == _decision(one)  # the fit's own decision on the same weights


def test_a_failing_share_fails_the_gate_with_its_reason(fitted):
    gate = fitted
    ok = gate._run([0, 2, 4], _ctx(0, 2))
    failed = GateShare([(1,), (3,), (5,)], error="RuntimeError: probe exploded")
    gate.on_error = "warn"
    try:
        with pytest.warns(UserWarning, match="rank 1: RuntimeError: probe exploded"):
            record = gate._judged(gate._merge([ok, failed]), 1, 2)
    finally:
        gate.on_error = "raise"
    assert record["status"] == "fail" and not record["passed"]
    assert "rank 1: RuntimeError: probe exploded" in record["reasons"][0]
