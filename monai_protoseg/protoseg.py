"""Pure tensor math of ProtoSeg: prototypes, prototype maps and segmentation-ability (SA) scores.

Shapes follow MONAI: ``features`` is ``(B, C, *S_f)`` and ``prob``, ``mask``, ``target`` are ``(B, 1, *S)``, with
1 to 3 spatial dimensions. When ``S_f != S`` the features are treated as if they had been resized to ``S`` with
linear interpolation (``torch.nn.functional.interpolate``, ``align_corners=False``).

Interpolation is linear and the prototype map is a linear function of the features inside a sigmoid
(``-||f - c_fg||^2 + ||f - c_bg||^2 = 2 (c_fg - c_bg) . (f - (c_fg + c_bg) / 2)``), so nothing here ever builds
the C-channel features at full resolution: prototypes are weighted sums taken at the features' own resolution (with
the weights moved there by the transpose of the interpolation), and only the one-channel logit map is resized.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["prototypes", "prototype_map", "sa_score", "UNIT_CHUNK_ELEMENTS"]

_INTERPOLATION_MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}

UNIT_CHUNK_ELEMENTS = 2**24
"""Unit-wise ``sa_score`` resizes units to full resolution in chunks of at most this many elements (64 MiB of
float32), so its extra memory stays bounded whatever the number of units."""


def prototypes(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background prototypes: the ``prob``-weighted and ``(1 - prob)``-weighted mean features.

    Args:
        features: ``(B, C, *S_f)`` features of one layer (or the input image).
        prob: ``(B, 1, *S)`` foreground probability in [0, 1], from the network's own output.
        mask: optional binary ``(B, 1, *S)`` tissue mask; only pixels where it is 1 feed the prototypes.

    Returns:
        ``(fg, bg)``, each ``(B, C)``. A row is NaN where its prototype does not exist (zero total weight).

    Example:
        >>> fg, bg = prototypes(torch.rand(2, 8, 16, 16), torch.rand(2, 1, 64, 64))
        >>> fg.shape
        torch.Size([2, 8])
    """
    features, prob, mask, _ = _prepare(features, prob, mask)
    origin = features.mean(tuple(range(2, features.ndim)))
    fg, bg = _prototypes(_translate(features, origin), prob, mask)
    return fg + origin, bg + origin


def prototype_map(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None, *, unit_wise: bool = False
) -> torch.Tensor:
    """Foreground probability of the prototype segmentation at every pixel of ``prob``'s grid.

    ``p = exp(-||f - c_fg||^2) / (exp(-||f - c_fg||^2) + exp(-||f - c_bg||^2))``, with all channels of ``f``
    (layer-wise) or each channel alone (unit-wise). The binary ProtoSeg map is ``p > 0.5``.

    Args:
        features: ``(B, C, *S_f)`` features.
        prob: ``(B, 1, *S)`` foreground probability in [0, 1] that guides the prototypes.
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        unit_wise: one map per channel instead of one for the whole layer.

    Returns:
        ``(B, 1, *S)`` layer-wise or ``(B, C, *S)`` unit-wise, float32 (float64 for float64 features);
        NaN for an image whose prototypes do not exist.

    Example:
        >>> prototype_map(torch.rand(2, 8, 16, 16), torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """
    features, prob, mask, _ = _prepare(features, prob, mask)
    features = _translate(features)
    fg, bg = _prototypes(features, prob, mask)
    logits = _prototype_logits(features, fg, bg, unit_wise=unit_wise)
    return torch.sigmoid(_resize(logits, prob.shape[2:]))


def sa_score(
    features: torch.Tensor,
    prob: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    unit_wise: bool = False,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """Segmentation-ability score: Dice of the binary prototype map ``p > 0.5`` against ``target``.

    Args:
        features: ``(B, C, *S_f)`` features.
        prob: ``(B, 1, *S)`` foreground probability in [0, 1] that guides the prototypes.
        target: binary ``(B, 1, *S)`` reference: the ground truth, or the network's own binarised prediction.
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        unit_wise: score each channel alone (``C`` scores per image) instead of the whole layer.
        ignore_empty: as MONAI's ``DiceMetric``: an empty target gives NaN; with ``False`` it gives 1 if the map
            is empty too, else 0.

    Returns:
        ``(B,)`` layer-wise or ``(B, C)`` unit-wise. NaN where a prototype does not exist.

    Example:
        >>> prob = torch.zeros(1, 1, 32, 32); prob[..., 8:24, 8:24] = 1
        >>> sa_score(torch.cat([prob, 1 - prob], 1), prob, prob > 0.5)
        tensor([1.])
    """
    features, prob, mask, target = _prepare(features, prob, mask, target)
    with torch.no_grad():
        features = _translate(features)
        fg, bg = _prototypes(features, prob, mask)
        logits = _prototype_logits(features, fg, bg, unit_wise=unit_wise)
        size = prob.shape[2:]
        target = target.flatten(2)
        units_per_chunk = max(1, UNIT_CHUNK_ELEMENTS // target.numel())
        intersection, predicted = [], []
        for chunk in logits.split(units_per_chunk, dim=1):
            binary = (_resize(chunk, size) > 0).flatten(2)
            intersection.append((binary & target).sum(-1))
            predicted.append(binary.sum(-1))
        scores = _dice(torch.cat(intersection, 1), torch.cat(predicted, 1), target.sum(-1), ignore_empty, fg.dtype)
        scores = scores.masked_fill((fg.isnan() | bg.isnan()).any(1, keepdim=True), float("nan"))
    return scores if unit_wise else scores[:, 0]


def _dice(
    intersection: torch.Tensor, predicted: torch.Tensor, truth: torch.Tensor, ignore_empty: bool, dtype: torch.dtype
) -> torch.Tensor:
    """Dice ``2 |A & G| / (|A| + |G|)`` from counts, with MONAI's ``DiceMetric`` rule for an empty ``G``."""
    dice = 2 * intersection.to(dtype) / (predicted + truth).clamp_min(1).to(dtype)
    if ignore_empty:
        empty_value = torch.full_like(dice, float("nan"))
    else:
        empty_value = (predicted == 0).to(dtype)
    return torch.where(truth > 0, dice, empty_value)


def _translate(features: torch.Tensor, origin: torch.Tensor | None = None) -> torch.Tensor:
    """``features - origin`` per image and channel (default: their spatial mean).

    Prototype logits do not change when features and prototypes move together, and features near the origin keep
    float32 sums and differences exact to ~1e-7 of their spread instead of their magnitude.
    """
    if origin is None:
        origin = features.mean(tuple(range(2, features.ndim)))
    return features - origin.view(*origin.shape, *(1,) * (features.ndim - 2))


def _prototypes(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes of validated inputs, computed at the features' resolution."""
    weights = torch.cat([prob, 1 - prob], dim=1)
    if mask is not None:
        weights = weights * mask
    totals = weights.flatten(2).sum(-1, keepdim=True)  # (B, 2, 1)
    weights = _resize_transpose(weights, features.shape[2:])  # (B, 2, *S_f)
    sums = torch.bmm(weights.flatten(2), features.flatten(2).transpose(1, 2))  # (B, 2, C)
    means = (sums / totals).masked_fill(totals == 0, float("nan"))
    return means[:, 0], means[:, 1]


def _prototype_logits(
    features: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, *, unit_wise: bool
) -> torch.Tensor:
    """``-||f - fg||^2 + ||f - bg||^2`` at the features' resolution: ``(B, 1, *S_f)`` or ``(B, C, *S_f)``.

    Written as ``2 (fg - bg) . (f - (fg + bg) / 2)``: linear in ``f`` and free of the cancellation that expanding
    the squares would cause for features far from the origin.
    """
    spatial = (1,) * (features.ndim - 2)
    centered = features - ((fg + bg) / 2).view(*fg.shape, *spatial)
    delta = 2 * (fg - bg)
    if unit_wise:
        return centered * delta.view(*delta.shape, *spatial)
    logits = torch.bmm(delta.unsqueeze(1), centered.flatten(2))  # (B, 1, |S_f|)
    return logits.view(features.shape[0], 1, *features.shape[2:])


def _resize(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``(B, K, *S_in)`` to ``(B, K, *size)`` (``align_corners=False``)."""
    if tuple(values.shape[2:]) == tuple(size):
        return values
    return F.interpolate(values, size=tuple(size), mode=_INTERPOLATION_MODES[len(size)], align_corners=False)


def _resize_transpose(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Transpose of ``_resize(., values.shape[2:])`` applied to ``values``: ``(B, K, *S)`` to ``(B, K, *size)``.

    ``sum(w * _resize(f, S)) == sum(_resize_transpose(w, f.shape[2:]) * f)`` for any ``f`` of spatial size ``size``.
    Linear interpolation is separable, so the transpose is one small ``(S_d, size_d)`` matrix per spatial axis,
    read off ``F.interpolate`` itself so that its weights are exactly the ones ``_resize`` uses.
    """
    axes = list(enumerate(zip(values.shape[2:], size), start=2))
    for axis, (n_out, n_in) in reversed(axes):  # the last axis first: contiguous, and shrinks the rest
        if n_out == n_in:
            continue
        basis = torch.eye(n_in, dtype=values.dtype, device=values.device).unsqueeze(0)
        weights = F.interpolate(basis, size=n_out, mode="linear", align_corners=False)[0]  # (n_in, n_out)
        values = (values.movedim(axis, -1) @ weights.T).movedim(-1, axis)
    return values


def _prepare(
    features: torch.Tensor,
    prob: torch.Tensor,
    mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate the inputs and convert them to plain tensors: float32 (float64 for float64 features), bool target.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a shape, batch size, device or value range is wrong; the message names the argument.
    """
    named = {"features": features, "prob": prob, "mask": mask, "target": target}
    for name, value in named.items():
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if not 3 <= features.ndim <= 5 or features.shape[1] == 0 or 0 in features.shape[2:]:
        raise ValueError(
            f"features must have shape (B, C, *S_f) with C > 0 and 1 to 3 non-empty spatial dims, "
            f"got shape {tuple(features.shape)}."
        )
    spatial_dims = features.ndim - 2
    for name, value in named.items():
        if name == "features" or value is None:
            continue
        if value.ndim != features.ndim or value.shape[1] != 1 or 0 in value.shape[2:]:
            raise ValueError(
                f"{name} must have shape (B, 1, *S) with {spatial_dims} non-empty spatial dims (as features "
                f"{tuple(features.shape)}), got shape {tuple(value.shape)}."
            )
        if value.shape[0] != features.shape[0]:
            raise ValueError(
                f"batch sizes differ: features has {features.shape[0]} images, {name} has {value.shape[0]}."
            )
        if name != "prob" and value.shape != prob.shape:
            raise ValueError(f"{name} must have the shape of prob {tuple(prob.shape)}, got {tuple(value.shape)}.")
        if value.device != features.device:
            raise ValueError(f"{name} is on {value.device} but features are on {features.device}.")

    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    features = features.as_subclass(torch.Tensor).to(dtype)
    if not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf values.")
    prob = prob.as_subclass(torch.Tensor).to(dtype)
    low, high = torch.aminmax(prob)  # NaN propagates and fails both comparisons
    if not (low >= 0 and high <= 1):
        raise ValueError(
            f"prob must be a foreground probability in [0, 1] (apply sigmoid or softmax to logits first), "
            f"got values in [{low.item():.4g}, {high.item():.4g}]."
        )
    for name, value in (("mask", mask), ("target", target)):
        if value is not None and value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1 values), got other values.")
    if mask is not None:
        mask = mask.as_subclass(torch.Tensor).to(dtype)
    if target is not None:
        target = target.as_subclass(torch.Tensor).bool()
    return features, prob, mask, target
