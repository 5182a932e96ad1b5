"""What the handlers read of an evaluator's postprocessing: the activation MONAI applies to ``pred`` before
discretising it (else the output's channel count decides), and the post-transforms that move data off the network's
grid."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any

from ignite.engine import Engine
from monai.engines import IterationEvents
from monai.transforms import Activationsd, AsDiscreted, Compose
from monai.utils import CommonKeys

__all__ = [
    "ACTIVATIONS", "evaluator_postprocessing", "flat_transforms", "postprocessing_activation", "resampling_transforms",
    "resolve_activation",
]

RESAMPLING = ("Invertd", "Spacingd", "Orientationd", "Resized", "Zoomd", "SpatialResampled", "ResampleToMatchd",
              "Flipd", "Rotated", "Rotate90d", "Affined", "CropForegroundd", "SpatialPadd", "ResizeWithPadOrCropd")
"""Post-transforms that move data off the network's grid."""

ACTIVATIONS = ("auto", "sigmoid", "softmax", None)
"""The values of the handlers' ``activation`` option (``None``: the network outputs probabilities already)."""


def evaluator_postprocessing(engine: Engine) -> Callable | None:
    """The ``postprocessing`` a MONAI workflow (``SupervisedEvaluator``, ``SupervisedTrainer``...) was built with.

    MONAI keeps it only in the closure of the handler it registers on ``IterationEvents.MODEL_COMPLETED``.

    Args:
        engine: the engine.

    Returns:
        the postprocessing transform, or ``None`` when the engine has none (or is no MONAI workflow).
    """
    for handler, _, _ in engine._event_handlers.get(IterationEvents.MODEL_COMPLETED, []):
        if getattr(handler, "__name__", "") == "_run_postprocessing":
            return inspect.getclosurevars(handler).nonlocals.get("posttrans")
    return None


def postprocessing_activation(postprocessing: Any, pred_key: str = CommonKeys.PRED) -> tuple[str | None, str] | None:
    """The activation that ``postprocessing`` applies to ``pred`` before discretising it.

    The first of these on ``pred_key`` decides: ``Activationsd(softmax=True)`` or ``(sigmoid=True)``;
    ``AsDiscreted(argmax=True)`` (``"softmax"``: the argmax of logits is that of their softmax); ``AsDiscreted
    (threshold=t)`` with no activation before it: the network's output itself is thresholded, so ``t == 0`` means
    logits (``"sigmoid"``) and ``0 < t < 1`` probabilities (``None``).

    Args:
        postprocessing: a transform (``Compose``s are searched in order) or ``None``.
        pred_key: the key of the network's output.

    Returns:
        ``(activation, reason)``, or ``None`` when the postprocessing does not tell.

    Raises:
        ValueError: the postprocessing applies an activation the handlers cannot follow (``Activationsd(other=...)``,
            a threshold outside ``[0, 1)``).

    Example:
        >>> postprocessing_activation(Compose([Activationsd("pred", softmax=True), AsDiscreted("pred", argmax=True)]))
        ('softmax', "Activationsd(keys='pred', softmax=True) in the evaluator's postprocessing")
    """
    pred_key = str(pred_key)
    for transform in flat_transforms(postprocessing):
        if not isinstance(transform, (Activationsd, AsDiscreted)) or pred_key not in transform.keys:
            continue
        index = list(transform.keys).index(pred_key)
        name = f"{type(transform).__name__}(keys={pred_key!r}"
        if isinstance(transform, Activationsd):
            if transform.softmax[index]:
                return "softmax", f"{name}, softmax=True) in the evaluator's postprocessing"
            if transform.sigmoid[index]:
                return "sigmoid", f"{name}, sigmoid=True) in the evaluator's postprocessing"
            if transform.other[index] is not None:
                raise ValueError(
                    f"the evaluator's postprocessing applies {name}, other={transform.other[index]!r}), an activation "
                    f"the handlers cannot follow: set activation='sigmoid', 'softmax' or None explicitly."
                )
            continue
        if transform.argmax[index]:
            return "softmax", f"{name}, argmax=True) in the evaluator's postprocessing"
        threshold = transform.threshold[index]
        if threshold is not None:
            reason = f"{name}, threshold={threshold}) with no activation before it in the evaluator's postprocessing"
            if threshold == 0:
                return "sigmoid", reason + " (logits thresholded at 0)"
            if 0 < threshold < 1:
                return None, reason + " (the network outputs probabilities)"
            raise ValueError(f"{reason}: a threshold outside [0, 1) on the raw output; set activation explicitly.")
    return None


def resolve_activation(
    activation: str | None, channels: int, postprocessing: tuple[str | None, str] | None, handler: str
) -> tuple[str | None, str, str | None]:
    """The activation a handler applies to a network output of ``channels`` channels.

    Args:
        activation: the handler's option (``"auto"``, ``"sigmoid"``, ``"softmax"`` or ``None``).
        channels: the number of output channels.
        postprocessing: what :func:`postprocessing_activation` found, or ``None``.
        handler: the handler's name, for messages.

    Returns:
        ``(activation, reason, warning)``: the activation, why it was chosen, and a warning when an explicit
        activation contradicts the postprocessing (else ``None``).

    Raises:
        ValueError: softmax on a one-channel output (every pixel would be foreground with probability 1).
    """
    warning = None
    if activation == "auto":
        if postprocessing is not None:
            activation, reason = postprocessing
        else:
            activation = "sigmoid" if channels == 1 else "softmax"
            reason = (f"from the output's {channels} channel(s) (no Activationsd or AsDiscreted on the prediction in "
                      f"the evaluator's postprocessing)")
    else:
        reason = "given"
        if postprocessing is not None and postprocessing[0] != activation:
            warning = (f"{handler}: activation={activation!r} is used, but {postprocessing[1]} means "
                       f"activation={postprocessing[0]!r}; prototypes and predictions may not be the evaluator's. "
                       f"Leave activation='auto' to follow the postprocessing.")
    if activation == "softmax" and channels == 1:
        raise ValueError(
            f"{handler}: activation 'softmax' ({reason}) on a one-channel output makes every pixel foreground with "
            f"probability 1; use activation='sigmoid' (logits) or None (probabilities)."
        )
    return activation, reason, warning


def resampling_transforms(postprocessing: Any) -> list[str]:
    """The transforms of ``postprocessing`` that move data off the network's grid, with their keys.

    Example:
        >>> from monai.transforms import Flipd
        >>> resampling_transforms(Compose([Activationsd("pred", softmax=True), Compose([Flipd(["pred", "label"])])]))
        ["Flipd(keys=('pred', 'label'))"]
    """
    return [f"{type(transform).__name__}(keys={tuple(transform.keys)!r})" for transform in flat_transforms(postprocessing)
            if type(transform).__name__ in RESAMPLING and hasattr(transform, "keys")]


def flat_transforms(transform: Any) -> Iterator[Any]:
    """The transforms of ``transform`` (a transform, a ``Compose`` or a list; ``None``: none) in the order they run,
    nested ``Compose``s and lists opened."""
    if isinstance(transform, Compose):
        for item in transform.transforms:
            yield from flat_transforms(item)
    elif isinstance(transform, (list, tuple)):
        for item in transform:
            yield from flat_transforms(item)
    elif transform is not None:
        yield transform
