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

import functools
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["prototypes", "prototype_map", "sa_score", "UNIT_CHUNK_ELEMENTS"]

UNIT_CHUNK_ELEMENTS = 2**24
"""SA scores resize prototype maps (units, or the classes of :class:`~monai_protoseg.SAScoreMetric`) to full
resolution in chunks of at most this many elements (64 MiB of float32), so their extra memory stays bounded whatever
the number of maps."""


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
    features, origin, prob, mask, _ = _prepare(features, prob, mask)
    fg, bg = _prototypes(features, _Guide(prob, mask))
    return fg[:, 0] + origin, bg[:, 0] + origin


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
    features, _, prob, mask, _ = _prepare(features, prob, mask)
    fg, bg = _prototypes(features, _Guide(prob, mask))
    return torch.sigmoid(_resize(_prototype_logits(features, fg, bg, unit_wise=unit_wise), prob.shape[2:]))


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
    features, _, prob, mask, target = _prepare(features, prob, mask, target)
    with torch.no_grad():
        return _sa_scores(features, _Guide(prob, mask, target), unit_wise=unit_wise, ignore_empty=ignore_empty)[:, 0]


class _Guide:
    """What every layer scored against one batch shares: the prototype weights and the target's pixel counts.

    ``K`` classes are guided at once, one-vs-rest; the weights moved to a feature grid are kept per grid size, so
    layers at the same scale move them once.

    Args:
        prob: validated ``(B, K, *S)`` foreground probability of each class (see :func:`_prepare_guide`).
        mask: validated ``(B, 1, *S)`` mask in the dtype of ``prob``, or None.
        target: validated bool ``(B, K, *S)`` reference of each class, or None (no scores).
    """

    def __init__(
        self, prob: torch.Tensor, mask: torch.Tensor | None = None, target: torch.Tensor | None = None
    ) -> None:
        weights = torch.cat([prob, prob], dim=1)  # (B, 2K, *S): the foreground weights, then the background ones
        weights[:, prob.shape[1]:].neg_().add_(1)  # 1 - prob in place: full-size temporaries cost page faults
        if mask is not None:
            weights.mul_(mask)
        self.size = prob.shape[2:]
        self.weights = weights
        self.totals = weights.flatten(2).sum(-1, keepdim=True)  # (B, 2K, 1)
        self.target = None if target is None else target.flatten(2)  # (B, K, |S|)
        self.truth = None if target is None else _count(self.target)  # (B, K)
        self._moved: dict[tuple[int, ...], torch.Tensor] = {}

    def weights_at(self, size: Sequence[int]) -> torch.Tensor:
        """The weights moved to a grid of ``size`` by the transpose of the interpolation: ``(B, 2K, *size)``."""
        size = tuple(size)
        if size not in self._moved:
            self._moved[size] = _resize_transpose(self.weights, size)
        return self._moved[size]


def _sa_scores(features: torch.Tensor, guide: _Guide, *, unit_wise: bool, ignore_empty: bool) -> torch.Tensor:
    """SA scores of prepared ``features`` (:func:`_prepare_features`) for every class of ``guide``.

    Returns:
        ``(B, K)``, or ``(B, K, C)`` unit-wise.
    """
    fg, bg = _prototypes(features, guide)
    if unit_wise:
        scores = torch.stack([
            _map_scores(_prototype_logits(features, fg[:, k:k + 1], bg[:, k:k + 1], unit_wise=True),
                        guide.target[:, k:k + 1], guide.truth[:, k:k + 1], guide.size, ignore_empty)
            for k in range(fg.shape[1])
        ], dim=1)  # (B, K, C)
    else:
        logits = _prototype_logits(features, fg, bg, unit_wise=False)
        scores = _map_scores(logits, guide.target, guide.truth, guide.size, ignore_empty)[..., None]  # (B, K, 1)
    scores = scores.masked_fill((fg.isnan() | bg.isnan()).any(-1, keepdim=True), float("nan"))
    return scores if unit_wise else scores[..., 0]


def _map_scores(
    logits: torch.Tensor, target: torch.Tensor, truth: torch.Tensor, size: Sequence[int], ignore_empty: bool
) -> torch.Tensor:
    """Dice of each binary map ``_resize(logits, size) > 0`` against its target, resized a chunk of maps at a time.

    Args:
        logits: ``(B, M, *S_f)`` prototype logits of ``M`` maps.
        target: bool ``(B, M, |S|)``, or ``(B, 1, |S|)`` shared by every map.
        truth: ``(B, M)`` or ``(B, 1)`` foreground pixel counts of ``target``.
        size: ``S``.
        ignore_empty: empty-target rule of :func:`sa_score`.

    Returns:
        ``(B, M)`` scores, in the dtype of ``logits``.
    """
    maps_per_chunk = max(1, UNIT_CHUNK_ELEMENTS // (target.shape[0] * target.shape[2]))
    intersection, predicted = [], []
    for start in range(0, logits.shape[1], maps_per_chunk):
        binary = (_resize(logits[:, start:start + maps_per_chunk], size) > 0).flatten(2)
        predicted.append(_count(binary))
        chunk_target = target if target.shape[1] == 1 else target[:, start:start + maps_per_chunk]
        intersection.append(_count(binary.logical_and_(chunk_target)))
    return _dice(torch.cat(intersection, 1), torch.cat(predicted, 1), truth, ignore_empty, logits.dtype)


def _count(binary: torch.Tensor) -> torch.Tensor:
    """The number of true values in each row of a bool ``(B, M, n)`` tensor: ``(B, M)``.

    Row by row, because a bool sum or ``count_nonzero`` over a dim first copies the whole tensor to int64.
    """
    return torch.stack([torch.stack([row.count_nonzero() for row in image]) for image in binary])


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


def _prototypes(features: torch.Tensor, guide: _Guide) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes of every class of ``guide`` at the features' resolution: ``(fg, bg)``, each ``(B, K, C)``."""
    weights = guide.weights_at(features.shape[2:])  # (B, 2K, *S_f)
    sums = torch.bmm(weights.flatten(2), features.flatten(2).transpose(1, 2))  # (B, 2K, C)
    means = (sums / guide.totals).masked_fill(guide.totals == 0, float("nan"))
    return means.chunk(2, dim=1)


def _prototype_logits(
    features: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, *, unit_wise: bool
) -> torch.Tensor:
    """``-||f - fg||^2 + ||f - bg||^2`` at the features' resolution, for ``(B, K, C)`` prototypes of ``K`` classes.

    Written as ``delta . f - delta . (fg + bg) / 2`` with ``delta = 2 (fg - bg)``: linear in ``f``, and exact to
    ~1e-7 of the features' spread because ``f`` are translated to their mean (:func:`_prepare_features`) first.

    Args:
        features: ``(B, C, *S_f)`` translated features (:func:`_prepare_features`).
        fg: ``(B, K, C)`` foreground prototypes.
        bg: ``(B, K, C)`` background prototypes.
        unit_wise: one logit per channel of a single class (``K == 1``), ``(f - (fg + bg) / 2) * delta``.

    Returns:
        ``(B, K, *S_f)``, or ``(B, C, *S_f)`` unit-wise.
    """
    delta = 2 * (fg - bg)
    middle = (fg + bg) / 2
    if unit_wise:  # (B, 1, C) prototypes: one map per channel
        shape = (fg.shape[0], fg.shape[2], *(1,) * (features.ndim - 2))
        return (features - middle.view(shape)).mul_(delta.view(shape))
    offset = (delta * middle).sum(-1, keepdim=True)  # (B, K, 1)
    logits = torch.baddbmm(offset, delta, features.flatten(2), beta=-1)  # delta . f - offset: (B, K, |S_f|)
    return logits.view(*logits.shape[:2], *features.shape[2:])


def _resize(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Linear interpolation of ``(B, K, *S_in)`` to ``(B, K, *size)`` (``align_corners=False``).

    Separable: one product with an ``(size_d, S_in_d)`` matrix per axis, whose weights are those of
    ``F.interpolate`` (which on CPU runs one thread per image and channel, so is slow for few channels).
    """
    for axis in reversed(range(2, values.ndim)):  # the last axis first: contiguous
        n_in, n_out = values.shape[axis], size[axis - 2]
        if n_in != n_out:
            values = _matmul_along(_interpolation_matrix(n_in, n_out, values.dtype, values.device), values, axis)
    return values


def _resize_transpose(values: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Transpose of ``_resize(., values.shape[2:])`` applied to ``values``: ``(B, K, *S)`` to ``(B, K, *size)``.

    ``sum(w * _resize(f, S)) == sum(_resize_transpose(w, f.shape[2:]) * f)`` for any ``f`` of spatial size ``size``.
    """
    for axis in reversed(range(2, values.ndim)):  # the last axis first: contiguous, and shrinks the rest
        n_out, n_in = values.shape[axis], size[axis - 2]
        if n_in != n_out:
            values = _matmul_along(_interpolation_matrix(n_in, n_out, values.dtype, values.device).T, values, axis)
    return values


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(n_in: int, n_out: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The ``(n_out, n_in)`` matrix of 1-D linear interpolation (``align_corners=False``), read off ``F.interpolate``.

    Cached per sizes, dtype and device; callers must not modify it.
    """
    basis = torch.eye(n_in, dtype=dtype, device=device).unsqueeze(0)
    return F.interpolate(basis, size=n_out, mode="linear", align_corners=False)[0].T


def _matmul_along(matrix: torch.Tensor, values: torch.Tensor, axis: int) -> torch.Tensor:
    """``matrix @ values`` along ``axis`` of ``values``: an ``(m, n)`` matrix makes a size-``n`` axis size ``m``."""
    before, n, after = values.shape[:axis], values.shape[axis], values.shape[axis + 1:]
    if not after:
        result = values.reshape(-1, n) @ matrix.T
    else:
        result = torch.matmul(matrix, values.reshape(-1, n, after.numel()))
    return result.view(*before, matrix.shape[0], *after)


def _prepare(
    features: torch.Tensor,
    prob: torch.Tensor,
    mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Validate the inputs and convert them to plain tensors: float32 (float64 for float64 features), bool target.

    Returns:
        ``(features, origin, prob, mask, target)``: the features translated by ``-origin``, their ``(B, C)`` mean
        (see :func:`_prepare_features`).

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a shape, batch size, device or value range is wrong; the message names the argument.
    """
    _check_inputs(features, prob, mask, target)
    features, origin = _prepare_features(features)
    return (features, origin, *_prepare_guide(prob, mask, target, features.dtype))


def _check_inputs(
    features: torch.Tensor,
    prob: torch.Tensor,
    mask: torch.Tensor | None = None,
    target: torch.Tensor | None = None,
) -> None:
    """Check the types, shapes, batch sizes and devices of the inputs; nothing that reads their values.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a shape, batch size or device is wrong; the message names the argument.
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


def _prepare_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``features`` as a plain float32 tensor (float64 if they are float64), translated to their spatial mean.

    Prototype logits do not change when features and prototypes move together, and features near the origin keep
    float32 sums and differences exact to ~1e-7 of their spread instead of their magnitude.

    Returns:
        ``(features - origin, origin)``, with ``origin`` the ``(B, C)`` mean of each image and channel.

    Raises:
        ValueError: the features contain NaN or Inf.
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    features = features.as_subclass(torch.Tensor).to(dtype)
    origin = features.mean(tuple(range(2, features.ndim)))
    # a NaN or Inf makes its channel's mean NaN or Inf; so may finite values whose sum overflows: scan those only
    if not torch.isfinite(origin).all() and not torch.isfinite(features).all():
        raise ValueError("features contain NaN or Inf values.")
    return features - origin.view(*origin.shape, *(1,) * (features.ndim - 2)), origin


def _prepare_guide(
    prob: torch.Tensor, mask: torch.Tensor | None, target: torch.Tensor | None, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the values of shape-checked ``prob``, ``mask`` and ``target`` (any number of channels).

    Returns:
        plain tensors: ``prob`` and ``mask`` in ``dtype``, ``target`` as bool.

    Raises:
        ValueError: ``prob`` is not in [0, 1], or ``mask`` or ``target`` is not binary.
    """
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
    return prob, mask, target
