"""The naive ProtoSeg formulation, written straight from METHOD.md: the oracle of the tests and the benchmark baseline.

It resizes the features to the probability's grid with all their channels, takes weighted means, and applies a
softmax over negative squared distances. Nothing is shared with ``monai_protoseg.prototypes``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MODES = {1: "linear", 2: "bilinear", 3: "trilinear"}


def naive_upsampled(features: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    """Features resized to ``size`` with all channels (what the method's step 1 says)."""
    if tuple(features.shape[2:]) == tuple(size):
        return features
    return F.interpolate(features, size=size, mode=MODES[len(size)], align_corners=False)


def naive_prototypes(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means of the resized features; NaN where the weights sum to zero."""
    features = naive_upsampled(features, tuple(prob.shape[2:]))
    mask = torch.ones_like(prob) if mask is None else mask.to(prob.dtype)
    spatial = tuple(range(2, features.ndim))
    result = []
    for weight in (mask * prob, mask * (1 - prob)):
        total = weight.sum(spatial)  # (B, 1)
        mean = (features * weight).sum(spatial) / total
        result.append(torch.where(total > 0, mean, torch.full_like(mean, float("nan"))))
    return result[0], result[1]


def naive_distances(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None, unit_wise: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distances of every resized feature vector (or unit) to the two prototypes: ``(d_fg, d_bg)``."""
    fg, bg = naive_prototypes(features, prob, mask)
    features = naive_upsampled(features, tuple(prob.shape[2:]))
    spatial = (1,) * (features.ndim - 2)
    dist_fg = (features - fg.view(*fg.shape, *spatial)) ** 2
    dist_bg = (features - bg.view(*bg.shape, *spatial)) ** 2
    if not unit_wise:
        dist_fg, dist_bg = dist_fg.sum(1, keepdim=True), dist_bg.sum(1, keepdim=True)
    return dist_fg, dist_bg


def naive_prototype_map(
    features: torch.Tensor, prob: torch.Tensor, mask: torch.Tensor | None = None, unit_wise: bool = False
) -> torch.Tensor:
    """Softmax over the negative squared distances to the two prototypes, foreground component."""
    dist_fg, dist_bg = naive_distances(features, prob, mask, unit_wise)
    return torch.softmax(torch.stack([-dist_fg, -dist_bg]), dim=0)[0]


def naive_dice(binary: torch.Tensor, target: torch.Tensor, ignore_empty: bool = True) -> float:
    """Dice of two boolean arrays of one image, with MONAI's empty-target rule."""
    if target.sum() == 0:
        return float("nan") if ignore_empty else float(binary.sum() == 0)
    return 2.0 * (binary & target).sum().item() / (binary.sum() + target.sum()).item()


def naive_sa_score(
    features: torch.Tensor,
    prob: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    unit_wise: bool = False,
    ignore_empty: bool = True,
) -> torch.Tensor:
    """Dice of ``p > 0.5`` against ``target``, image by image and unit by unit: ``(B,)`` or ``(B, C)``.

    ``p > 0.5`` is read as ``d_fg < d_bg``, which it means: the softmax of two distances that differ by less than
    their rounding (features of magnitude 1e-5, a random EfficientNet's) would be 0.5 give or take an ulp.
    """
    dist_fg, dist_bg = naive_distances(features, prob, mask, unit_wise)
    binary = dist_fg < dist_bg
    fg, bg = naive_prototypes(features, prob, mask)
    scores = torch.empty(binary.shape[:2], dtype=torch.float64)
    for b in range(binary.shape[0]):
        for k in range(binary.shape[1]):
            undefined = bool(fg[b].isnan().any() or bg[b].isnan().any())
            scores[b, k] = float("nan") if undefined else naive_dice(binary[b, k], target[b, 0].bool(), ignore_empty)
    return scores if unit_wise else scores[:, 0]
