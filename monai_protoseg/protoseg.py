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
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

__all__ = ["prototypes", "prototype_map", "sa_score", "sa_scores", "GUIDES", "UNIT_CHUNK_ELEMENTS"]

UNIT_CHUNK_ELEMENTS = 2**24
"""SA scores resize prototype maps (units, or the classes of :class:`~monai_protoseg.SAScoreMetric`) to full
resolution in chunks of at most this many elements (64 MiB of float32), so their extra memory stays bounded whatever
the number of maps."""


GUIDES = ("soft", "binary")
"""What weights the features into prototypes: the soft probability (the authors' code) or the binarised prediction
(the paper's text)."""

SUM_BLOCK = 2**15
"""Voxels per block of the prototypes' weighted sums (see :func:`_weighted_sums`)."""


def prototypes(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None, *, guide: str = "soft"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground and background prototypes: the ``prob``-weighted and ``(1 - prob)``-weighted mean features.

    Args:
        features: ``(B, C, *S_f)`` features of one layer (or the input image).
        prob: ``(B, 1, *S)`` foreground probability in [0, 1], from the network's own output.
        mask: optional binary ``(B, 1, *S)`` tissue mask; only pixels where it is 1 feed the prototypes.
        guide: ``"soft"`` weights the features by ``prob`` (the authors' code), ``"binary"`` by the binarised
            prediction ``prob > 0.5`` (the paper's text).

    Returns:
        ``(fg, bg)``, each ``(B, C)``. A row is NaN where its prototype does not exist (zero total weight).

    Example:
        >>> fg, bg = prototypes(torch.rand(2, 8, 16, 16), torch.rand(2, 1, 64, 64))
        >>> fg.shape
        torch.Size([2, 8])
    """
    features, origin, scale, prob, mask, _ = _prepare(features, prob, mask, guide=guide)
    fg, bg = _prototypes(features, _Guide(prob, mask))
    return fg[:, 0] * scale[:, None] + origin, bg[:, 0] * scale[:, None] + origin


def prototype_map(
    features: torch.Tensor,
    prob: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    unit_wise: bool = False,
    binary: bool = False,
    guide: str = "soft",
) -> torch.Tensor:
    """Foreground probability of the prototype segmentation at every pixel of ``prob``'s grid, or its binary map.

    ``p = exp(-||f - c_fg||^2) / (exp(-||f - c_fg||^2) + exp(-||f - c_bg||^2))``, with all channels of ``f``
    (layer-wise) or each channel alone (unit-wise). The binary ProtoSeg map, the one :func:`sa_score` scores, is
    ``binary=True``: the sign of the logit ``||f - c_bg||^2 - ||f - c_fg||^2``. Thresholding ``p > 0.5`` gives the
    same map except where the logit is so small (below ~1e-8 in float32) that ``p`` rounds to exactly 0.5.

    Args:
        features: ``(B, C, *S_f)`` features.
        prob: ``(B, 1, *S)`` foreground probability in [0, 1] that guides the prototypes.
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        unit_wise: one map per channel instead of one for the whole layer.
        binary: return the binary map (bool) instead of ``p``.
        guide: ``"soft"`` (prototypes weighted by ``prob``) or ``"binary"`` (by ``prob > 0.5``); see
            :func:`prototypes`.

    Returns:
        ``(B, 1, *S)`` layer-wise or ``(B, C, *S)`` unit-wise, float32 (float64 for float64 features), NaN for an
        image whose prototypes do not exist; with ``binary``, bool, all False for such an image.

    Example:
        >>> prototype_map(torch.rand(2, 8, 16, 16), torch.rand(2, 1, 64, 64)).shape
        torch.Size([2, 1, 64, 64])
    """
    features, _, scale, prob, mask, _ = _prepare(features, prob, mask, guide=guide)
    fg, bg = _prototypes(features, _Guide(prob, mask))
    logits = _resize(_prototype_logits(features, fg, bg, unit_wise=unit_wise), prob.shape[2:])
    return logits > 0 if binary else _rescaled_sigmoid(logits, scale)


def sa_score(
    features: torch.Tensor,
    prob: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    unit_wise: bool = False,
    ignore_empty: bool = True,
    guide: str = "soft",
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
        guide: ``"soft"`` (prototypes weighted by ``prob``) or ``"binary"`` (by ``prob > 0.5``).

    Returns:
        ``(B,)`` layer-wise or ``(B, C)`` unit-wise. NaN where a prototype does not exist.

    Example:
        >>> prob = torch.zeros(1, 1, 32, 32); prob[..., 8:24, 8:24] = 1
        >>> sa_score(torch.cat([prob, 1 - prob], 1), prob, prob > 0.5)
        tensor([1.])
    """
    features, _, _, prob, mask, target = _prepare(features, prob, mask, target, guide=guide)
    with torch.no_grad():
        return _sa_scores(features, _Guide(prob, mask, [target]), unit_wise=unit_wise, ignore_empty=ignore_empty)[0][:, 0]


def sa_scores(
    features: Mapping[str, torch.Tensor],
    prob: torch.Tensor,
    target: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor | None = None,
    *,
    unit_wise: bool = False,
    ignore_empty: bool = True,
    guide: str = "soft",
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """SA scores of many layers against one guide, as :func:`sa_score` layer by layer but sharing the work.

    ``prob``, ``target`` and ``mask`` are checked once, and the prototype weights and the target's pixel counts are
    built once for all layers (and moved once to each feature grid). ``K`` classes are scored at once, one-vs-rest.
    With several targets (e.g. the ground truth and the network's own prediction), each layer's binary map is built
    once and counted against each of them.

    Args:
        features: ``{layer: (B, C, *S_f)}``; the layers may have different channels and resolutions.
        prob: ``(B, K, *S)`` foreground probability of each of ``K`` classes, in [0, 1].
        target: binary ``(B, K, *S)`` reference of each class, or a sequence of such references.
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        unit_wise: score each channel alone instead of the whole layer.
        ignore_empty: empty-target rule of :func:`sa_score`.
        guide: ``"soft"`` or ``"binary"`` prototype weights (see :func:`prototypes`).

    Returns:
        ``{layer: (B, K)} (unit-wise ``(B, K, C)``) for one target; for a sequence of targets, one such dict per
        target. NaN where a prototype does not exist.

    Raises:
        ValueError: a shape, batch size, device or value is wrong; the message names the layer and the argument.

    Example:
        >>> prob = torch.zeros(1, 1, 32, 32); prob[..., 8:24, 8:24] = 1
        >>> scores = sa_scores({"a": torch.cat([prob, 1 - prob], 1), "b": prob[..., ::2, ::2]}, prob, prob > 0.5)
        >>> {layer: value.tolist() for layer, value in scores.items()}
        {'a': [[1.0]], 'b': [[1.0]]}
    """
    return _shared_guide_sa_scores(features, prob, target, mask, unit_wise=unit_wise, ignore_empty=ignore_empty,
                                   guide=guide, guides={})


def _shared_guide_sa_scores(
    features: Mapping[str, torch.Tensor],
    prob: torch.Tensor,
    target: torch.Tensor | Sequence[torch.Tensor],
    mask: torch.Tensor | None,
    *,
    unit_wise: bool,
    ignore_empty: bool,
    guide: str,
    guides: dict[torch.dtype, _Guide],
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """:func:`sa_scores`, keeping the guide it builds for each features' dtype in ``guides``: its prototype weights,
    moved to each layer's grid, serve more layers of the same batch (``prototype_margins(..., guides=guides)``)."""
    several = not isinstance(target, torch.Tensor)
    targets = list(target) if several else [target]
    if not features:
        raise ValueError("features is empty: give {layer: (B, C, *S_f)} for at least one layer.")
    if not targets:
        raise ValueError("target is an empty sequence: give at least one (B, K, *S) reference.")
    per_target: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    # guides: prob, targets and mask are checked and weighted once per dtype
    with torch.no_grad():
        for layer, layer_features in features.items():
            try:
                if not isinstance(prob, torch.Tensor) or any(not isinstance(t, torch.Tensor) for t in targets):
                    raise TypeError("prob and target must be torch.Tensors.")
                for index, value in enumerate(targets):
                    name = f"target[{index}]" if several else "target"
                    if value.shape != prob.shape:
                        raise ValueError(f"{name} must have the shape of prob {tuple(prob.shape)} (one channel per "
                                         f"class), got {tuple(value.shape)}.")
                _check_inputs(layer_features, prob[:, :1], mask, targets[0][:, :1])  # the shapes of one class
                layer_features, _, _ = _prepare_features(layer_features)  # scaled, translated to their mean
                dtype = layer_features.dtype
                if dtype not in guides:
                    prepared = [_prepare_guide(prob, mask, value, dtype, guide) for value in targets]
                    guides[dtype] = _Guide(prepared[0][0], prepared[0][1], [item[2] for item in prepared])
            except (TypeError, ValueError) as error:
                raise type(error)(f"layer {layer!r}: {error}") from error
            scores = _sa_scores(layer_features, guides[dtype], unit_wise=unit_wise, ignore_empty=ignore_empty)
            for result, value in zip(per_target, scores):
                result[layer] = value
    return per_target if several else per_target[0]


class _Guide:
    """What every layer scored against one batch shares: the prototype weights and the targets' pixel counts.

    ``K`` classes are guided at once, one-vs-rest; the weights moved to a feature grid are kept per grid size, so
    layers at the same scale move them once. Each map is counted against every target.

    Args:
        prob: validated ``(B, K, *S)`` foreground probability of each class (see :func:`_prepare_guide`).
        mask: validated ``(B, 1, *S)`` mask in the dtype of ``prob``, or None.
        targets: validated bool ``(B, K, *S)`` references of each class (none: no scores).
    """

    def __init__(
        self, prob: torch.Tensor, mask: torch.Tensor | None = None, targets: Sequence[torch.Tensor] = ()
    ) -> None:
        weights = torch.cat([prob, prob], dim=1)  # (B, 2K, *S): the foreground weights, then the background ones
        weights[:, prob.shape[1]:].neg_().add_(1)  # 1 - prob in place: full-size temporaries cost page faults
        if mask is not None:
            weights.mul_(mask)
        self.size = prob.shape[2:]
        self.weights = weights
        self.totals = weights.flatten(2).sum(-1, keepdim=True)  # (B, 2K, 1)
        self.targets = [target.flatten(2) for target in targets]  # (B, K, |S|) each
        self.truths = [_count(target) for target in self.targets]  # (B, K) each
        self._moved: dict[tuple[int, ...], torch.Tensor] = {}

    def weights_at(self, size: Sequence[int]) -> torch.Tensor:
        """The weights moved to a grid of ``size`` by the transpose of the interpolation: ``(B, 2K, *size)``."""
        size = tuple(size)
        if size not in self._moved:
            self._moved[size] = _resize_transpose(self.weights, size)
        return self._moved[size]


def _sa_scores(
    features: torch.Tensor, guide: _Guide, *, unit_wise: bool, ignore_empty: bool
) -> list[torch.Tensor]:
    """SA scores of prepared ``features`` (:func:`_prepare_features`) for every class of ``guide``.

    Returns:
        one tensor per target of ``guide``: ``(B, K)``, or ``(B, K, C)`` unit-wise.
    """
    fg, bg = _prototypes(features, guide)
    if unit_wise:
        per_class = [
            _map_scores(_prototype_logits(features, fg[:, k:k + 1], bg[:, k:k + 1], unit_wise=True),
                        [target[:, k:k + 1] for target in guide.targets], [truth[:, k:k + 1] for truth in guide.truths],
                        guide.size, ignore_empty)
            for k in range(fg.shape[1])
        ]
        scores = [torch.stack([item[t] for item in per_class], dim=1) for t in range(len(guide.targets))]  # (B, K, C)
    else:
        logits = _prototype_logits(features, fg, bg, unit_wise=False)
        scores = [value[..., None] for value in  # (B, K, 1)
                  _map_scores(logits, guide.targets, guide.truths, guide.size, ignore_empty)]
    undefined = (fg.isnan() | bg.isnan()).any(-1, keepdim=True)
    scores = [value.masked_fill(undefined, float("nan")) for value in scores]
    return scores if unit_wise else [value[..., 0] for value in scores]


def _map_scores(
    logits: torch.Tensor,
    targets: Sequence[torch.Tensor],
    truths: Sequence[torch.Tensor],
    size: Sequence[int],
    ignore_empty: bool,
) -> list[torch.Tensor]:
    """Dice of each binary map ``_resize(logits, size) > 0`` against each target, resized a chunk of maps at a time.

    Args:
        logits: ``(B, M, *S_f)`` prototype logits of ``M`` maps.
        targets: bool ``(B, M, |S|)``, or ``(B, 1, |S|)`` shared by every map, one per reference.
        truths: ``(B, M)`` or ``(B, 1)`` foreground pixel counts of each target.
        size: ``S``.
        ignore_empty: empty-target rule of :func:`sa_score`.

    Returns:
        ``(B, M)`` scores per target, in the dtype of ``logits``.
    """
    maps_per_chunk = max(1, UNIT_CHUNK_ELEMENTS // (logits.shape[0] * math.prod(size)))
    predicted: list[torch.Tensor] = []
    intersections: list[list[torch.Tensor]] = [[] for _ in targets]
    for start in range(0, logits.shape[1], maps_per_chunk):
        binary = (_resize(logits[:, start:start + maps_per_chunk], size) > 0).flatten(2)
        predicted.append(_count(binary))
        for target, intersection in zip(targets, intersections):
            chunk_target = target if target.shape[1] == 1 else target[:, start:start + maps_per_chunk]
            intersection.append(_count(torch.logical_and(binary, chunk_target)))
    counted = torch.cat(predicted, 1)
    return [_dice(torch.cat(intersection, 1), counted, truth, ignore_empty, logits.dtype)
            for intersection, truth in zip(intersections, truths)]


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


def _layer_logits(
    features: Mapping[str, torch.Tensor],
    prob: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    guide: str = "soft",
    guides: dict[torch.dtype, _Guide] | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Every layer's prototype logits at its own resolution, as :func:`_prototype_logits` gives them, for ``K``
    classes at once.

    Args:
        features: ``{layer: (B, C, *S_f)}``.
        prob: ``(B, K, *S)`` foreground probability of each class, in [0, 1].
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
        guide: ``"soft"`` or ``"binary"`` prototype weights.
        guides: the prototype weights per features' dtype already built for ``prob``, ``mask`` and ``guide`` (by
            :func:`_shared_guide_sa_scores`); those missing are built and added.

    Returns:
        ``{layer: (logits, fg, bg, scale)}``: ``(B, K, *S_f)`` logits of the scaled and translated features
        (:func:`_prepare_features`), their ``(B, K, C)`` prototypes, and the ``(B,)`` scale.

    Raises:
        TypeError, ValueError: a bad argument; the message names the layer.
    """
    guides = {} if guides is None else guides
    result = {}
    for layer, layer_features in features.items():
        try:
            _check_inputs(layer_features, prob[:, :1], mask)
            prepared, _, scale = _prepare_features(layer_features)
            if prepared.dtype not in guides:
                guides[prepared.dtype] = _Guide(*_prepare_guide(prob, mask, None, prepared.dtype, guide)[:2])
        except (TypeError, ValueError) as error:
            raise type(error)(f"layer {layer!r}: {error}") from error
        fg, bg = _prototypes(prepared, guides[prepared.dtype])
        result[layer] = _prototype_logits(prepared, fg, bg, unit_wise=False), fg, bg, scale
    return result


def _prototypes(features: torch.Tensor, guide: _Guide) -> tuple[torch.Tensor, torch.Tensor]:
    """Prototypes of every class of ``guide`` at the features' resolution: ``(fg, bg)``, each ``(B, K, C)``."""
    weights = guide.weights_at(features.shape[2:])  # (B, 2K, *S_f)
    sums = _weighted_sums(weights.flatten(2), features.flatten(2)).to(features.dtype)  # (B, 2K, C)
    means = (sums / guide.totals).masked_fill(guide.totals == 0, float("nan"))
    return means.chunk(2, dim=1)


def _weighted_sums(weights: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """``weights @ features^T`` for ``(B, M, n)`` weights and ``(B, C, n)`` features: ``(B, M, C)``, in float64.

    A float32 product sums ``n`` terms in one accumulator, whose error grows with ``n`` (1.2 absolute over 96^3
    voxels). Blocks of :data:`SUM_BLOCK` voxels are multiplied in the features' dtype and their partial sums added in
    float64, so the error stays that of one block at any volume size, for a few percent of the product's time.
    """
    total = torch.zeros(weights.shape[0], weights.shape[1], features.shape[1], dtype=torch.float64,
                        device=features.device)
    for start in range(0, features.shape[2], SUM_BLOCK):
        block = slice(start, start + SUM_BLOCK)
        total += torch.bmm(weights[..., block], features[..., block].transpose(1, 2))
    return total


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

    Separable, the last axis first: each axis takes two neighbours and blends them with the weights of
    ``F.interpolate`` (which on CPU runs one thread per image and channel, so is slow for few channels).
    """
    for axis in reversed(range(2, values.ndim)):
        n_in, n_out = values.shape[axis], size[axis - 2]
        if n_in != n_out:
            lower, upper, weight = _interpolation_taps(n_in, n_out, values.dtype, values.device)
            shape = [1] * values.ndim
            shape[axis] = n_out
            values = torch.lerp(values.index_select(axis, lower), values.index_select(axis, upper), weight.view(shape))
    return values


@functools.lru_cache(maxsize=64)
def _interpolation_taps(
    n_in: int, n_out: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The two neighbours and the weight of the upper one for each output pixel of 1-D linear interpolation
    (``align_corners=False``): the nonzero entries of :func:`_interpolation_matrix`'s rows.

    Cached per sizes, dtype and device; callers must not modify them.
    """
    matrix = _interpolation_matrix(n_in, n_out, dtype, device)  # (n_out, n_in), at most two nonzeros a row
    lower = (matrix != 0).int().argmax(1)  # the first nonzero column
    upper = (lower + 1).clamp_max(n_in - 1)
    weight = matrix.gather(1, upper[:, None])[:, 0].where(upper != lower, torch.zeros((), dtype=dtype, device=device))
    return lower, upper, weight


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
    *,
    guide: str = "soft",
) -> tuple[torch.Tensor, ...]:
    """Validate the inputs and convert them to plain tensors: float32 (float64 for float64 features), bool target.

    Returns:
        ``(features, origin, scale, prob, mask, target)``: the features scaled and translated as
        :func:`_prepare_features` returns them, then the guide.

    Raises:
        TypeError: an argument is not a tensor.
        ValueError: a shape, batch size, device or value range is wrong; the message names the argument.
    """
    _check_inputs(features, prob, mask, target)
    features, origin, scale = _prepare_features(features)
    return (features, origin, scale, *_prepare_guide(prob, mask, target, features.dtype, guide))


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
    if features.is_complex():
        raise ValueError(f"features must be real-valued, got dtype {features.dtype}.")
    if features.shape[0] == 0:
        raise ValueError(f"features hold no image (batch size 0, shape {tuple(features.shape)}): nothing to score.")
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


def _prepare_features(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``features`` as a plain float32 tensor (float64 if they are float64), scaled and translated to their mean.

    Each image is divided by a power of two (exactly) that brings its largest magnitude into [1, 2), so squared
    distances neither overflow (features of 1e20) nor underflow (1e-30) whatever the features' scale; then translated
    to its spatial mean, so float32 sums and differences stay exact to ~1e-7 of the features' spread instead of their
    magnitude. Prototype logits do not change with the translation and only get multiplied by ``scale**2`` (a
    positive number: the binary map does not change at all).

    Returns:
        ``(prepared, origin, scale)`` with ``features == prepared * scale + origin``: ``origin`` the ``(B, C)`` mean
        of each image and channel, ``scale`` the ``(B,)`` power of two of each image.

    Raises:
        ValueError: the features contain NaN or Inf.
    """
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    features = features.as_subclass(torch.Tensor).to(dtype)
    flat = features.flatten(1)
    largest = torch.maximum(flat.amax(1), -flat.amin(1))  # NaN propagates; amax and amin beat aminmax 3x on CPU
    if not torch.isfinite(largest).all():
        raise ValueError("features contain NaN or Inf values.")
    exponent = torch.frexp(largest).exponent - 1  # largest / 2**exponent in [1, 2); 2**exponent is finite
    scale = torch.where(largest > 0, torch.ldexp(torch.ones_like(largest), exponent), torch.ones_like(largest))
    prepared = features / scale.view(-1, *(1,) * (features.ndim - 1))  # a copy, exact
    origin = prepared.mean(tuple(range(2, features.ndim)))
    prepared -= origin.view(*origin.shape, *(1,) * (features.ndim - 2))
    return prepared, origin * scale[:, None], scale


def _rescaled_sigmoid(logits: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``sigmoid(logits * scale**2)`` per image: the map's probabilities from the logits of scaled features.

    ``scale**2`` may overflow to infinity (or underflow to 0): the probability then saturates at 0 or 1 (or is 0.5),
    as it does in exact arithmetic to the float's precision; a logit of exactly 0 stays 0.5.
    """
    factor = (scale.double() ** 2).to(logits.dtype).view(-1, *(1,) * (logits.ndim - 1))
    return torch.sigmoid(torch.where(logits == 0, torch.zeros((), dtype=logits.dtype), logits * factor))


def _prepare_guide(
    prob: torch.Tensor,
    mask: torch.Tensor | None,
    target: torch.Tensor | None,
    dtype: torch.dtype,
    guide: str = "soft",
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Check the values of shape-checked ``prob``, ``mask`` and ``target`` (any number of channels).

    Returns:
        plain tensors: the prototype weights ``prob`` (binarised with ``guide="binary"``) and ``mask`` in
        ``dtype``, ``target`` as bool.

    Raises:
        ValueError: ``guide`` is unknown, ``prob`` is not in [0, 1], or ``mask`` or ``target`` is not binary.
    """
    if guide not in GUIDES:
        raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}.")
    prob = prob.as_subclass(torch.Tensor).to(dtype)
    low, high = prob.amin(), prob.amax()  # NaN propagates and fails both comparisons
    if not (low >= 0 and high <= 1):
        raise ValueError(
            f"prob must be a foreground probability in [0, 1] (apply sigmoid or softmax to logits first), "
            f"got values in [{low.item():.9g}, {high.item():.9g}]."
        )
    for name, value in (("mask", mask), ("target", target)):
        if value is not None and value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1 values), got other values.")
    if guide == "binary":
        prob = (prob > 0.5).to(dtype)
    if mask is not None:
        mask = mask.as_subclass(torch.Tensor).to(dtype)
    if target is not None:
        target = target.as_subclass(torch.Tensor).bool()
    return prob, mask, target
