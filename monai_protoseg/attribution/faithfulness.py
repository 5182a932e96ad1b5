"""How faithful an attribution map is to the network: Prediction Preserved, Image Preserved, deletion and insertion.

Prediction Preserved and Image Preserved follow Visual attribution for deep learning segmentation in medical imaging
(SPIE Medical Imaging 2022): multiply the input by the map, predict again, and measure how much of the prediction is
kept (higher is better) and how much of the image the map keeps (lower is better). The deletion and insertion curves
follow RISE (Petsiuk et al., BMVC 2018): the target score as the map's most important pixels are removed (a faithful
map makes it fall fast: low area) or revealed (rise fast: high area). Every function is per case, batched, and the
same in 1D, 2D and 3D. The network is run without gradients in eval mode and left exactly as it was.

A map that is NaN throughout a case is undefined (an attribution method gives one where the case's region is empty:
nothing to explain) and every score of that case is NaN, never a best score. Anything else is refused with a
ValueError that starts with the function's name and names the argument and its shape: inputs that are not finite or
an empty batch, a map, probability or baseline with a NaN or infinite value elsewhere (or, where one is needed, out of
[0, 1]), a region that is not binary, a network output that is not finite.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from monai.networks.layers import GaussianFilter
from monai.utils import convert_to_tensor
from torch import nn

from .base import (
    check_finite,
    check_inputs,
    check_output,
    checked_mask,
    errors_named,
    network_kept_as_is,
    target_region,
    target_score,
)

__all__ = ["prediction_preserved", "image_preserved", "masked_prediction", "deletion_insertion", "COLUMNS"]

KINDS = ("deletion", "insertion")
COLUMNS = ("prediction_preserved", "image_preserved", "deletion_auc", "insertion_auc")
"""The faithfulness columns of a case or a method: Prediction Preserved, Image Preserved, deletion and insertion AUC
(what :class:`~monai_protoseg.AttributionHandler` and ``benchmarks/bench_attribution.py`` write)."""


def prediction_preserved(
    prob: torch.Tensor, prob_masked: torch.Tensor, region: torch.Tensor | None = None
) -> torch.Tensor:
    """Prediction Preserved per case: ``sum min(P, P') / sum P``.

    ``P`` is the explained class's probability map for the input, ``P'`` for the input multiplied by the attribution
    map (see :func:`masked_prediction`); the sums run over every pixel (over ``region`` only, when given). 1 means the
    masked input keeps the whole prediction; a larger ``P'`` counts no more than ``P``.

    Args:
        prob: ``(B, 1, *S)`` class probability ``P`` in [0, 1] (NaN throughout a case: undefined).
        prob_masked: ``(B, 1, *S)`` class probability ``P'`` in [0, 1] (NaN throughout a case: undefined, as
            :func:`masked_prediction` gives for an undefined map).
        region: optional ``(B, 1, *S)`` binary mask restricting the sums.

    Returns:
        ``(B,)`` float; NaN where ``sum P`` is 0 (nothing predicted, nothing to preserve) or a case is undefined.

    Raises:
        ValueError: an empty batch, shapes that differ, a value out of [0, 1] or a NaN in part of a case, a region
            that is not binary.

    Example:
        >>> prob = torch.tensor([[[[0.8, 0.2]]], [[[0.0, 0.0]]]])
        >>> prediction_preserved(prob, torch.tensor([[[[0.4, 0.6]]], [[[0.5, 0.5]]]]))
        tensor([0.6000,    nan])
    """
    with errors_named("prediction_preserved"):
        prob = _checked_probability(prob, "prob")
        prob_masked = _checked_probability(prob_masked, "prob_masked")
        if prob.shape != prob_masked.shape:
            raise ValueError(f"prob {tuple(prob.shape)} and prob_masked {tuple(prob_masked.shape)} must have one "
                             f"shape.")
        if region is not None:
            region = checked_mask(region, tuple(prob.shape), "region").to(prob)
            prob, prob_masked = prob * region, prob_masked * region
    total = prob.flatten(1).sum(1)
    kept = torch.minimum(prob, prob_masked).flatten(1).sum(1)  # NaN for an undefined case
    return torch.where(total > 0, kept / torch.where(total > 0, total, 1), torch.nan)


def image_preserved(maps: torch.Tensor) -> torch.Tensor:
    """Image Preserved per case: the mean of the attribution map, the fraction of the image it keeps.

    Args:
        maps: ``(B, 1, *S)`` attribution maps in [0, 1] (NaN throughout a case: undefined).

    Returns:
        ``(B,)`` float; NaN for an undefined case (an empty region: 0 would be the best score).

    Raises:
        ValueError: an empty batch, a value out of [0, 1] or a NaN in part of a case.

    Example:
        >>> image_preserved(torch.tensor([[[[1.0, 0.0, 0.5, 0.5]]], [[[torch.nan] * 4]]]))
        tensor([0.5000,    nan])
    """
    with errors_named("image_preserved"):
        return _checked_probability(maps, "maps").flatten(1).mean(1)


def masked_prediction(
    network: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    class_index: int = 1,
    activation: str | None = "softmax",
) -> torch.Tensor:
    """The class probability ``P'`` for the input multiplied by the attribution map (every input channel).

    ``masked_prediction(network, inputs, torch.ones_like(maps))`` is ``P``, the unmasked prediction.

    Args:
        network: the segmentation network, ``(B, C_in, *S) -> (B, K, *S)``, run in eval mode without gradients.
        inputs: ``(B, C_in, *S)`` batch, ``B >= 1``, finite.
        maps: ``(B, 1, *S)`` attribution maps in [0, 1] (NaN throughout a case: undefined).
        class_index: the explained output channel.
        activation: the network's output activation: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).

    Returns:
        ``(B, 1, *S)`` class probability; NaN throughout an undefined case.

    Raises:
        ValueError: bad ``inputs`` or ``maps`` (see the module docstring), a network output that is not finite.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8), strides=(2,))
        >>> masked_prediction(network, torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)).shape
        torch.Size([2, 1, 16, 16])
    """
    with errors_named("masked_prediction"):
        inputs = _checked_inputs(inputs, maps)
        maps = _checked_probability(maps, "maps").to(inputs)
        with _evaluated(network):
            output = network(inputs * maps.nan_to_num(0.0))  # an undefined case is run hidden, its result dropped
        prob = _class_probability(output, class_index, activation)
    return prob.masked_fill(_undefined(maps).reshape(-1, *(1,) * (maps.ndim - 1)), torch.nan)


def deletion_insertion(
    network: nn.Module,
    inputs: torch.Tensor,
    maps: torch.Tensor,
    class_index: int = 1,
    activation: str | None = "softmax",
    steps: int = 16,
    baseline: str | torch.Tensor = "zero",
    region: torch.Tensor | None = None,
    batch_size: int = 16,
    blur_sigma: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Deletion and insertion curves of attribution maps and the areas under them.

    Each case's pixels are ordered by its map, highest first (ties in raster order). At step ``t = 0 .. steps`` the
    first ``floor(t * n / steps)`` of the ``n`` pixels are replaced by the baseline (deletion) or are the only ones
    taken from the input, the rest from the baseline (insertion), in every input channel. The curve is the target
    score (the class probability summed over the region, see :func:`~monai_protoseg.attribution.target_score`)
    divided by the unmasked input's score, against the fraction of pixels removed or revealed; the area under it
    is taken by the trapezoid rule over [0, 1]. The region is fixed from the unmasked prediction unless given, so it
    cannot move as pixels change. A faithful map gives a low deletion and a high insertion area.

    Args:
        network: the segmentation network, run in eval mode without gradients.
        inputs: ``(B, C_in, *S)`` batch, ``B >= 1``, finite.
        maps: ``(B, 1, *S)`` attribution maps, finite (only their order matters; NaN throughout a case: undefined).
        class_index: the explained output channel.
        activation: the network's output activation: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).
        steps: how many equal chunks of pixels are removed or revealed.
        baseline: what replaces the pixels: ``"zero"``, ``"blur"`` (the input smoothed by a Gaussian of
            ``blur_sigma`` pixels), or a finite tensor broadcastable to ``inputs``.
        region: ``(B, 1, *S)`` binary region of the score; None: the network's binarised prediction of the class.
        batch_size: modified inputs per forward pass (``2 * (steps + 1)`` per case in all).
        blur_sigma: the Gaussian's standard deviation for ``baseline="blur"``.

    Returns:
        ``(deletion_auc, insertion_auc, curves)``: the areas ``(B,)`` (NaN where the unmasked score is 0: empty
        region, and where the map is undefined) and ``curves = {"fraction": (steps + 1,), "deletion": (B, steps + 1),
        "insertion": (B, steps + 1)}``, float64 on the inputs' device (NaN where the area is).

    Raises:
        ValueError: bad ``inputs``, ``maps``, ``baseline`` or ``region`` (see the module docstring), ``steps`` or
            ``batch_size`` below 1, a network output that is not finite (also of a modified input).

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8), strides=(2,))
        >>> deletion, insertion, curves = deletion_insertion(network, torch.rand(1, 1, 16, 16),
        ...                                                  torch.rand(1, 1, 16, 16), steps=4)
        >>> curves["fraction"].tolist(), curves["deletion"].shape
        ([0.0, 0.25, 0.5, 0.75, 1.0], torch.Size([1, 5]))
    """
    with errors_named("deletion_insertion"):
        inputs = _checked_inputs(inputs, maps)
        maps = convert_to_tensor(maps, track_meta=False)
        undefined = _undefined(maps)
        maps = _defined(maps, "maps")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        pixels = inputs.shape[2:].numel()
        counts = torch.arange(steps + 1) * pixels // steps
        fraction = counts.to(inputs.device, torch.float64) / pixels
        with _evaluated(network):
            output = network(inputs)
            region = target_region(output, "pred" if region is None else region, class_index, activation)
            full = target_score(output, region, class_index, "prob", activation)
            filler = _baseline(inputs, baseline, blur_sigma)
            curves = {kind: inputs.new_full((inputs.shape[0], steps + 1), torch.nan, dtype=torch.float64)
                      for kind in KINDS}
            for case in (~undefined).nonzero().flatten().tolist():
                order = maps[case].flatten().to(inputs.device, torch.float64).argsort(descending=True, stable=True)
                rank = order.argsort().reshape(1, *inputs.shape[2:])  # each pixel's place in the map's order
                variants = [(kind, step) for kind in KINDS for step in range(steps + 1)]
                for start in range(0, len(variants), batch_size):
                    chunk = variants[start:start + batch_size]
                    batch = torch.stack([_replaced(inputs[case], filler[case], rank < counts[step], kind)
                                         for kind, step in chunk])
                    scores = target_score(network(batch),
                                          region[case:case + 1].expand(len(chunk), *region.shape[1:]),
                                          class_index, "prob", activation)
                    for (kind, step), score in zip(chunk, scores):
                        curves[kind][case, step] = score
    full = full.double()[:, None]
    curves = {kind: torch.where(full > 0, curve / torch.where(full > 0, full, 1), torch.nan)
              for kind, curve in curves.items()}
    deletion_auc, insertion_auc = (torch.trapezoid(curves[kind], fraction, dim=-1) for kind in KINDS)
    return deletion_auc, insertion_auc, {"fraction": fraction, **curves}


@contextmanager
def _evaluated(network: nn.Module) -> Iterator[None]:
    """Run ``network`` in eval mode without gradients, every module's mode and parameter state restored after."""
    with network_kept_as_is(network), torch.no_grad():
        network.eval()
        yield


def _replaced(image: torch.Tensor, filler: torch.Tensor, first: torch.Tensor, kind: str) -> torch.Tensor:
    """Deletion: the ``first`` pixels (the map's most important) from ``filler``; insertion: only those from
    ``image``."""
    return torch.where(first, filler, image) if kind == "deletion" else torch.where(first, image, filler)


def _class_probability(output: torch.Tensor, class_index: int, activation: str | None) -> torch.Tensor:
    """``(B, 1, *S)`` probability of the class from the ``(B, K, *S)`` output."""
    check_output(output, class_index, activation)
    if activation == "softmax":
        output = torch.softmax(output, dim=1)
    elif activation == "sigmoid":
        output = torch.sigmoid(output)
    return output[:, class_index:class_index + 1]


def _baseline(inputs: torch.Tensor, baseline: str | torch.Tensor, blur_sigma: float) -> torch.Tensor:
    """The ``(B, C_in, *S)`` values that replace removed (or hidden) pixels."""
    if isinstance(baseline, torch.Tensor):
        baseline = convert_to_tensor(baseline, track_meta=False)
        check_finite(baseline, "baseline")
        return torch.broadcast_to(baseline.to(inputs), inputs.shape)
    if baseline == "zero":
        return torch.zeros_like(inputs)
    if baseline == "blur":
        return GaussianFilter(inputs.ndim - 2, blur_sigma).to(inputs.device)(inputs)
    raise ValueError(f'baseline must be "zero", "blur" or a tensor broadcastable to the inputs, got {baseline!r}.')


def _checked_inputs(inputs: torch.Tensor, maps: torch.Tensor) -> torch.Tensor:
    """``inputs`` as a plain tensor, checked (see :func:`~monai_protoseg.attribution.base.check_inputs`) and against
    ``(B, 1, *S)`` ``maps``."""
    inputs = check_inputs(inputs)
    expected = (inputs.shape[0], 1, *inputs.shape[2:])
    if tuple(maps.shape) != expected:
        raise ValueError(f"maps have shape {tuple(maps.shape)}; expected (B, 1, *S) = {expected} for inputs of shape "
                         f"{tuple(inputs.shape)}.")
    return inputs


def _checked_probability(values: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` as a float ``(B, 1, *S)`` tensor, ``B >= 1``, each case in [0, 1] or NaN throughout (undefined)."""
    values = convert_to_tensor(values, track_meta=False)
    if values.ndim < 3 or values.numel() == 0:
        raise ValueError(f"{name} must be (B, 1, *S) with B >= 1 and no empty axis, got shape "
                         f"{tuple(values.shape)}.")
    values = values if values.dtype == torch.float64 else values.float()
    defined = _defined(values, name)
    outside = (defined < 0) | (defined > 1)
    if bool(outside.any()):
        raise ValueError(f"{name} must be in [0, 1]; shape {tuple(values.shape)} holds {int(outside.sum())} other "
                         f"value(s), such as {defined[outside][0].item()}.")
    return values


def _undefined(values: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: the cases of ``values`` that are NaN throughout (undefined)."""
    return values.flatten(1).isnan().all(1)


def _defined(values: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` with its undefined cases (NaN throughout) set to 0, the others checked finite (ValueError naming
    ``name``)."""
    defined = values.masked_fill(_undefined(values).reshape(-1, *(1,) * (values.ndim - 1)), 0)
    check_finite(defined, name)
    return defined

