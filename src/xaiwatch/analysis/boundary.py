"""Decision boundaries: the smallest L-inf perturbation that removes a detection or flips its class.

The attacked scalar is the object's class score at the candidate that currently best matches it (a
:class:`~xaiwatch.targets.MatchedBoxTarget`, re-chosen at every step), pushed *down*:

- ``fgsm``: one step ``x' = clip(x - eps * sign(grad), 0, 1)`` (Goodfellow et al.; identical to
  ``captum.robust.FGSM`` with the score as a targeted loss, which the tests check);
- ``pgd``: the FGSM step, then ``steps - 1`` steps of size ``step_ratio * eps``, each projected back onto the
  L-inf ball of radius ``eps`` around the image and onto ``[0, 1]`` (Madry et al., no random start).

The object counts as *flipped* as soon as one iterate's detections (the adapter's own post-processing) hold no
box of its class with IoU >= ``iou_threshold`` with it. Because PGD's first iterate is FGSM and a flip at any
iterate counts, a PGD with more steps flips at least whenever a PGD with fewer steps (or FGSM) does, for every
``eps``; :func:`min_epsilon`'s bisection then returns a minimal epsilon that is monotone in the attack's
strength (where two bisections first differ, the stronger attack flipped and the weaker did not, so the
stronger one's answer is at most that midpoint and the weaker one's at least).

Captum's ``PGD`` returns only its last iterate, so it cannot tell that an earlier iterate flipped the
detection without one more forward per step; the loop is ours (one forward and one ``autograd.grad`` per
step: the floor), and Captum's ``FGSM`` is its reference in the tests.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torchvision.ops import box_iou

from xaiwatch.adapters.base import DetectorAdapter
from xaiwatch.core.context import explaining
from xaiwatch.core.errors import ConfigurationError, check_shape
from xaiwatch.core.types import Detections, RawOutput
from xaiwatch.core.validation import in_range, positive_int
from xaiwatch.targets import MatchedBoxTarget

__all__ = ["ATTACKS", "AttackResult", "BoundaryResult", "attack_object", "min_epsilon", "validate_attack"]

ATTACKS = ("fgsm", "pgd")


def validate_attack(attack: str, steps: int = 1, step_ratio: float = 0.25, max_eps: float = 1.0) -> None:
    """Check attack arguments.

    Raises:
        ConfigurationError: for an unknown attack, ``steps < 1``, ``step_ratio`` outside ``(0, 1]`` or
            ``max_eps`` outside ``(0, 1]``.
    """
    if attack not in ATTACKS:
        raise ConfigurationError(f"Unknown attack {attack!r}: `attack` can be {' or '.join(ATTACKS)}.")
    positive_int("steps", steps)
    in_range("step_ratio", step_ratio, 0.0, 1.0, low_open=True)
    in_range("max_eps", max_eps, 0.0, 1.0, low_open=True)  # images are in [0, 1]


@dataclass
class AttackResult:
    """One attack at one epsilon.

    Attributes:
        eps: the L-inf radius.
        flipped: True when the detection was removed or changed class.
        score: the object's class score on ``image`` (at its best-matching candidate).
        image: :math:`(1, 3, H, W)` the first iterate that flipped the object, else the last one.
        detections: the adapter's detections on ``image``.
        steps: gradient steps taken (forward + backward each).
    """

    eps: float
    flipped: bool
    score: float
    image: torch.Tensor
    detections: Detections
    steps: int


def survives(detections: Detections, box: torch.Tensor, label: int, iou_threshold: float) -> bool:
    """True when ``detections`` hold a box of class ``label`` with IoU >= ``iou_threshold`` with ``box``."""
    same = detections.labels == label
    if not bool(same.any()):
        return False
    ious = box_iou(box.to(detections.boxes)[None], detections.boxes[same])[0]
    return bool((ious >= iou_threshold).any())


def attack_object(
    adapter: DetectorAdapter,
    image: torch.Tensor,
    box: Sequence[float] | torch.Tensor,
    label: int,
    eps: float,
    attack: str = "pgd",
    steps: int = 10,
    step_ratio: float = 0.25,
    iou_threshold: float = 0.5,
) -> AttackResult:
    """Attack the detection of one object at one epsilon (see the module docstring).

    Args:
        adapter: the model adapter; the model's state is never changed.
        image: :math:`(1, 3, H, W)` image in ``[0, 1]``.
        box, label: the object (a ground-truth box or a detection), ``xyxy`` pixels, and its class.
        eps: L-inf radius in image units.
        attack: ``"fgsm"`` or ``"pgd"``.
        steps: PGD steps (FGSM takes one).
        step_ratio: PGD step size as a fraction of ``eps`` after the first (FGSM) step.
        iou_threshold: IoU at which a detection is still the object.

    Returns:
        the attack's outcome.

    Raises:
        ConfigurationError: for an unknown attack or bad arguments.
        ShapeError: for an image that is not :math:`(1, 3, H, W)`.
    """
    validate_attack(attack, steps, step_ratio)
    check_shape(image, [1, 3, "H", "W"], "image")
    if float(eps) < 0:
        raise ConfigurationError(f"`eps` must be >= 0, got {eps}.")
    target = MatchedBoxTarget(box, label, iou_threshold=iou_threshold, conf=adapter.conf)
    n = 1 if attack == "fgsm" else int(steps)
    with explaining(adapter.model) as prepare:
        x0 = prepare(image)
        x = x0.clone()
        for k in range(n):
            xk = x.detach().requires_grad_()
            raw = adapter.raw(xk)
            score = target(raw)
            if k and _flipped(adapter, raw, target, iou_threshold):
                return _result(eps, True, score, xk, adapter, raw, k)
            (grad,) = torch.autograd.grad(score.sum(), xk)
            x = xk.detach() - (eps if k == 0 else step_ratio * eps) * grad.sign()
            x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
        with torch.no_grad():
            raw = adapter.raw(x)
            return _result(eps, _flipped(adapter, raw, target, iou_threshold), target(raw), x, adapter, raw, n)


def _detached(raw: RawOutput) -> RawOutput:
    return RawOutput(raw.boxes.detach(), raw.scores.detach(), raw.levels)


def _flipped(adapter: DetectorAdapter, raw: RawOutput, target: MatchedBoxTarget, iou_threshold: float) -> bool:
    return not survives(adapter.postprocess(_detached(raw))[0], target.box, target.label, iou_threshold)


def _result(eps, flipped, score, x, adapter, raw, steps) -> AttackResult:
    dets = adapter.postprocess(_detached(raw))[0].detach()
    return AttackResult(float(eps), bool(flipped), float(score.detach()[0]), x.detach(), dets, int(steps))


@dataclass
class BoundaryResult:
    """The decision boundary of one object along the attack's direction.

    Attributes:
        min_eps: the smallest epsilon found that flips the object (``0`` when it is not detected at all), or
            ``None`` when even ``max_eps`` does not flip it.
        lower: the largest epsilon tried that did not flip it (the boundary lies in ``(lower, min_eps]``).
        clean_score: the object's score on the unperturbed image.
        curve: ``(eps, score)`` of every attack run, sorted by epsilon (the score after the attack).
        adversarial: the attack at ``min_eps`` (or at ``max_eps`` when nothing flipped), ``None`` when the
            object was not detected to begin with.
        clean_detections: the detections on the unperturbed image.
        steps: gradient steps spent.
    """

    min_eps: float | None
    lower: float
    clean_score: float
    curve: list[tuple[float, float]] = field(default_factory=list)
    adversarial: AttackResult | None = None
    clean_detections: Detections | None = None
    steps: int = 0


def min_epsilon(
    adapter: DetectorAdapter,
    image: torch.Tensor,
    box: Sequence[float] | torch.Tensor,
    label: int,
    attack: str = "pgd",
    max_eps: float = 0.1,
    steps: int = 5,
    step_ratio: float = 0.25,
    bisection_steps: int = 5,
    max_steps: int | None = None,
    iou_threshold: float = 0.5,
) -> BoundaryResult:
    """Bisect for the smallest epsilon at which the attack removes the object's detection or flips its class.

    First the clean image: an object the model does not detect has ``min_eps = 0``. Then the attack at
    ``max_eps``; if that does not flip it, ``min_eps`` is ``None``. Otherwise ``bisection_steps`` halvings of
    ``(lower, min_eps]``, stopping early when the next attack would exceed ``max_steps`` gradient steps.

    Args:
        adapter, image, box, label, attack, steps, step_ratio, iou_threshold: see :func:`attack_object`.
        max_eps: the largest radius tried.
        bisection_steps: halvings of the bracket (its final width is ``max_eps / 2**bisection_steps``).
        max_steps: budget of gradient steps for this object (``None``: no limit).

    Returns:
        the boundary; at most ``(1 + bisection_steps) * steps`` gradient steps were spent (fewer when an
        iterate flips the object early), plus one forward per attack and one on the clean image.

    Raises:
        ConfigurationError: for bad arguments.
    """
    validate_attack(attack, steps, step_ratio, max_eps)
    if int(bisection_steps) < 0 or (max_steps is not None and int(max_steps) < 1):
        raise ConfigurationError(
            f"`bisection_steps` must be >= 0 and `max_steps` >= 1, got {bisection_steps}, {max_steps}."
        )
    box_t = torch.as_tensor(box, dtype=torch.float32).flatten()
    kwargs = {"attack": attack, "steps": steps, "step_ratio": step_ratio, "iou_threshold": iou_threshold}
    target = MatchedBoxTarget(box_t, label, iou_threshold=iou_threshold, conf=adapter.conf)
    with explaining(adapter.model) as prepare, torch.no_grad():
        raw = adapter.raw(prepare(image))
        clean_score, clean_dets = float(target(raw)[0]), adapter.postprocess(_detached(raw))[0].detach()
    result = BoundaryResult(None, 0.0, clean_score, [(0.0, clean_score)], None, clean_dets, 0)
    if not survives(clean_dets, box_t, label, iou_threshold):
        result.min_eps = 0.0
        return result
    lo, hi = 0.0, float(max_eps)
    run = attack_object(adapter, image, box_t, label, hi, **kwargs)
    result.steps, result.adversarial = run.steps, run
    result.curve.append((hi, run.score))
    if not run.flipped:
        result.lower = hi
        return result
    result.min_eps = hi
    per_attack = 1 if attack == "fgsm" else int(steps)
    for _ in range(int(bisection_steps)):
        if max_steps is not None and result.steps + per_attack > int(max_steps):
            break
        eps = (lo + hi) / 2
        run = attack_object(adapter, image, box_t, label, eps, **kwargs)
        result.steps += run.steps
        result.curve.append((eps, run.score))
        if run.flipped:
            hi, result.min_eps, result.adversarial = eps, eps, run
        else:
            lo = eps
    result.lower = lo
    result.curve.sort()
    return result
