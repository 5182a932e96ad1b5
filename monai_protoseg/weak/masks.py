"""Binary lesion masks from heatmaps and counterfactual difference maps: threshold, clean, keep the largest lesion.

Weakly supervised segmentation turns a map (a classifier heatmap, or COIN's ``|X - X_cf|``) into a mask: threshold
it (fixed, or Otsu per case), open it (removes speckles thinner than the structuring element), close it (fills small
holes and gaps) and keep each case's largest connected component.

Pure torch tensor math (CPU or CUDA): maps and masks are batch-first ``(B, 1, *S)`` with 1, 2 or 3 spatial dims, and
every spatial size runs through the same lines. Conventions:

- threshold: the foreground is ``value > threshold``.
- morphology: cubic (square in 2D) structuring element of odd edge ``size``, centred on each voxel. Outside the
  image, an opening sees foreground when it erodes (the cube must fit in the mask, the part of it beyond the border
  does not count), a closing sees background (the image lies in an empty space). So a lesion cut by the border keeps
  what a cube fits in, while a speckle or a one-voxel line along the border is still removed; and a closing fills
  holes and gaps, also those open to the border, but never joins a lesion to the border. An opening only removes
  voxels, a closing only adds them.
- connected components: ``connectivity`` as in scikit-image: 1 = faces (4 neighbours in 2D, 6 in 3D), up to the
  number of spatial dims = all neighbours (8 in 2D, 26 in 3D); ``None`` = all. Of equally large components, the one
  whose first voxel comes first in raster (C) order is kept.
"""

from __future__ import annotations

import itertools
import math
import numbers

import torch

from ..attribution.base import check_finite

__all__ = ["otsu_threshold", "threshold_maps", "opening", "closing", "largest_connected_component", "clean_mask"]


def _check_batch(tensor: torch.Tensor, name: str) -> None:
    """Raise a ValueError unless ``tensor`` is a ``(B, 1, *S)`` tensor with 1 to 3 spatial dims."""
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}.")
    if not 3 <= tensor.ndim <= 5 or tensor.shape[1] != 1:
        raise ValueError(
            f"{name} must have shape (B, 1, *S) with 1 to 3 spatial dims (ndim 3 to 5), "
            f"got shape {tuple(tensor.shape)}."
        )
    if tensor.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(tensor.shape)}.")


def _as_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """``mask`` checked (``(B, 1, *S)``, bool or only 0 and 1) and returned as bool."""
    _check_batch(mask, name)
    if mask.dtype == torch.bool:
        return mask
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or hold only 0 and 1, got complex dtype {mask.dtype}.")
    other = ~((mask == 0) | (mask == 1))
    if bool(other.any()):
        raise ValueError(f"{name} must be bool or hold only 0 and 1; shape {tuple(mask.shape)}, dtype {mask.dtype} "
                         f"holds {int(other.sum())} other value(s), such as {mask[other][0].item()}.")
    return mask != 0


def _check_size(size: int, name: str) -> int:
    """Raise a ValueError unless ``size`` is an odd int >= 1."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"{name} must be an odd int >= 1, got {size!r}.")
    return size


def otsu_threshold(maps: torch.Tensor, bins: int = 256) -> torch.Tensor:
    """Otsu's threshold of each case: the one that maximises the between-class variance of its histogram.

    Each case gets its own histogram of ``bins`` equal bins over its own ``[min, max]`` range, closed on the right
    (the first bin also holds the minimum); the candidate thresholds are the upper edges of the bins but the last,
    so the foreground ``value > threshold`` is the bins above the split (up to rounding). Equal variances: the lowest
    threshold. A constant case returns its value, so its foreground ``value > threshold`` is empty.

    Args:
        maps: ``(B, ...)`` real values, at least one per case, all finite.
        bins: number of histogram bins, >= 2.

    Returns:
        ``(B,)`` thresholds, in the dtype of ``maps`` if floating (else float32), on its device.

    Example:
        >>> maps = torch.tensor([[0.1, 0.2, 0.15, 0.8, 0.9, 0.85]])
        >>> threshold = otsu_threshold(maps)
        >>> (maps > threshold[:, None]).tolist()
        [[False, False, False, True, True, True]]
    """
    if not isinstance(maps, torch.Tensor) or maps.ndim < 2 or maps.shape[0] == 0 or maps[0].numel() == 0:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a (B, ...) tensor with at least one value per case, got {shape}.")
    if maps.is_complex():
        raise ValueError(f"maps must be real, got dtype {maps.dtype}.")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"bins must be an int >= 2, got {bins!r}.")
    values = maps.reshape(maps.shape[0], -1).double()
    if not bool(torch.isfinite(values).all()):
        raise ValueError("maps must be finite, got NaN or infinite values.")
    low = values.amin(dim=1, keepdim=True)
    width = (values.amax(dim=1, keepdim=True) - low) / bins  # 0 for a constant case
    safe_width = torch.where(width > 0, width, torch.ones_like(width))
    # right-closed bins (edge_k, edge_k+1]: bin = ceil((v - low) / width) - 1, the minimum in bin 0
    index = (torch.ceil((values - low) / safe_width) - 1).clamp(0, bins - 1).long()
    offsets = torch.arange(values.shape[0], device=values.device)[:, None] * bins
    counts = torch.bincount((index + offsets).flatten(), minlength=values.shape[0] * bins)
    prob = counts.reshape(values.shape[0], bins).double() / values.shape[1]
    centres = low + (torch.arange(bins, device=values.device, dtype=torch.float64) + 0.5) * width
    weight_low = prob.cumsum(1)[:, :-1]  # split after bin k, k = 0 .. bins - 2
    mass_low = (prob * centres).cumsum(1)
    mean_total = mass_low[:, -1:]
    mass_low = mass_low[:, :-1]
    weight_high = 1.0 - weight_low
    between = (mean_total * weight_low - mass_low) ** 2 / (weight_low * weight_high).clamp_min(1e-300)
    between = torch.where((weight_low > 0) & (weight_high > 1e-12), between, torch.full_like(between, -1.0))
    split = between.argmax(dim=1, keepdim=True)  # first maximum: the lowest threshold
    threshold = (low + (split + 1) * width).squeeze(1)  # a constant case: width 0, its value
    dtype = maps.dtype if maps.is_floating_point() else torch.float32
    return threshold.to(dtype)


def threshold_maps(maps: torch.Tensor, threshold: str | float = "otsu") -> torch.Tensor:
    """Binary masks ``maps > threshold``, with Otsu's threshold per case or one fixed threshold.

    Args:
        maps: ``(B, 1, *S)`` maps, 1 to 3 spatial dims, finite (heatmaps are usually in [0, 1]).
        threshold: ``"otsu"`` (:func:`otsu_threshold` of each case; a constant case gives an empty mask) or a
            number, the same for every case.

    Returns:
        ``(B, 1, *S)`` bool mask, foreground where the value is strictly above the threshold.

    Raises:
        ValueError: ``maps`` of another shape or not finite (NaN is never above a threshold: it would vanish into the
            background), or a bad threshold.

    Example:
        >>> maps = torch.tensor([[[0.1, 0.7, 0.9, 0.2]]])
        >>> threshold_maps(maps, 0.5).tolist()
        [[[False, True, True, False]]]
        >>> threshold_maps(maps).tolist()
        [[[False, True, True, False]]]
    """
    _check_batch(maps, "maps")
    check_finite(maps, "maps")
    if isinstance(threshold, str):
        if threshold != "otsu":
            raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}.")
        level = otsu_threshold(maps).reshape(-1, *([1] * (maps.ndim - 1)))
        return maps > level
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or math.isnan(threshold):
        raise ValueError(f"threshold must be 'otsu' or a number, got {threshold!r}.")
    return maps > threshold


def _window_max(values: torch.Tensor, axis: int, radius: int) -> torch.Tensor:
    """Maximum over a window of ``2 * radius + 1`` voxels along ``axis`` (voxels outside the image are ignored).

    Shifted slices rather than ``max_pool``: any dtype (bool, int64 labels), and several times faster on CPU."""
    result = values.clone()
    length = values.shape[axis]
    for shift in range(1, min(radius, length - 1) + 1):
        lower = result.narrow(axis, 0, length - shift)
        torch.maximum(lower, values.narrow(axis, shift, length - shift), out=lower)
        upper = result.narrow(axis, shift, length - shift)
        torch.maximum(upper, values.narrow(axis, 0, length - shift), out=upper)
    return result


def _dilate(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary dilation of a bool ``(B, 1, *S)`` mask by a cube of edge ``size`` (outside: background)."""
    for axis in range(2, mask.ndim):
        mask = _window_max(mask, axis, size // 2)
    return mask


def _erode(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Binary erosion by a cube of edge ``size`` (outside: foreground), the dual of :func:`_dilate`."""
    return ~_dilate(~mask, size)


def _close(mask: torch.Tensor, size: int) -> torch.Tensor:
    """Closing of a bool mask in an empty space: padded with background, dilated, eroded and cropped back."""
    margin = size // 2  # the dilation reaches this far beyond the image, and the erosion looks as far
    inside = (slice(None), slice(None)) + tuple(slice(margin, margin + n) for n in mask.shape[2:])
    padded = mask.new_zeros(mask.shape[:2] + tuple(n + 2 * margin for n in mask.shape[2:]))
    padded[inside] = mask
    return _erode(_dilate(padded, size), size)[inside]


def opening(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary opening (erosion, then dilation) by a cube of edge ``size``: removes what the cube does not fit in.

    A voxel stays when some cube centred in the image contains it and fits in the mask, the part of the cube beyond
    the border not counting (the erosion sees foreground outside, scikit-image's convention): a lesion cut by the
    border keeps what a cube fits in, while a speckle or a one-voxel line along the border is removed. The result
    is always within ``mask``.

    Args:
        mask: ``(B, 1, *S)`` bool (or 0/1) mask, 1 to 3 spatial dims.
        size: odd edge of the structuring element, >= 1 (1: the mask unchanged).

    Returns:
        ``(B, 1, *S)`` bool mask.

    Example:
        >>> mask = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
        >>> mask[0, 0, :2, :3] = True   # a 2x3 lesion cut by the corner
        >>> mask[0, 0, 5, :] = True     # a line along the border
        >>> mask[0, 0, 3, 4] = True     # a speckle
        >>> opening(mask).sum().item()
        6
    """
    mask = _as_mask(mask)
    size = _check_size(size, "size")
    return _dilate(_erode(mask, size), size)


def closing(mask: torch.Tensor, size: int = 3) -> torch.Tensor:
    """Binary closing (dilation, then erosion) by a cube of edge ``size``: fills holes and gaps the cube cannot enter.

    The image is taken to lie in an empty space: a voxel is added when every cube containing it, wherever centred,
    touches the mask. Holes and notches open to the border are filled too, but a lesion near the border is never
    joined to it (a constant foreground outside would do that). The result always contains ``mask``.

    Args:
        mask: ``(B, 1, *S)`` bool (or 0/1) mask, 1 to 3 spatial dims.
        size: odd edge of the structuring element, >= 1 (1: the mask unchanged).

    Returns:
        ``(B, 1, *S)`` bool mask.

    Example:
        >>> mask = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
        >>> mask[0, 0, 1:4, 1:4] = True   # one pixel off the border
        >>> mask[0, 0, 2, 2] = False      # a one-pixel hole
        >>> closed = closing(mask)
        >>> closed[0, 0, 2, 2].item(), closed.sum().item()
        (True, 9)
    """
    mask = _as_mask(mask)
    size = _check_size(size, "size")
    return _close(mask, size)


def _neighbourhood_max(values: torch.Tensor, connectivity: int) -> torch.Tensor:
    """Maximum over each voxel's neighbourhood (itself included): the offsets in {-1, 0, 1}^n with at most
    ``connectivity`` non-zero entries, i.e. the union of 3-wide windows over every ``connectivity`` of the axes."""
    result = values
    for axes in itertools.combinations(range(2, values.ndim), connectivity):
        window = values
        for axis in axes:
            window = _window_max(window, axis, 1)
        result = torch.maximum(result, window)
    return result


def largest_connected_component(mask: torch.Tensor, connectivity: int | None = None) -> torch.Tensor:
    """Keep each case's largest connected component.

    Components are found on the tensor's device by parallel union-find (Shiloach-Vishkin style): every voxel points
    to a parent, at first itself; each round, every foreground voxel and its parent are hooked onto the smallest
    grandparent in the voxel's neighbourhood within the foreground (shifted maxima), and pointers are shortcut to
    their grandparents, until nothing changes. Whole trees merge at once, so the rounds stay few (about ten on a
    random 64^3 mask) however winding a component is; each component ends up pointing to its first voxel in raster
    (C) order. Of equally large components, the one whose first voxel comes first in raster order is kept
    (scikit-image's smallest label). An empty mask stays empty.

    Args:
        mask: ``(B, 1, *S)`` bool (or 0/1) mask, 1 to 3 spatial dims; each case is labelled on its own.
        connectivity: neighbours as in scikit-image: two voxels touch when they differ by at most 1 along each axis
            and along at most ``connectivity`` axes. 1: faces (4 in 2D, 6 in 3D); the number of spatial dims or
            ``None``: all (8 in 2D, 26 in 3D); 2 in 3D: faces and edges (18).

    Returns:
        ``(B, 1, *S)`` bool mask, within ``mask``.

    Example:
        >>> mask = torch.tensor([[[[1, 1, 0, 0, 0],
        ...                        [0, 0, 1, 1, 0],
        ...                        [0, 0, 0, 0, 1]]]], dtype=torch.bool)
        >>> largest_connected_component(mask).int().tolist()  # 8 neighbours: the diagonals join
        [[[[1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]]]
        >>> largest_connected_component(mask, connectivity=1).int().tolist()  # 4: sizes 2, 2, 1; the first kept
        [[[[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]]]
    """
    mask = _as_mask(mask)
    spatial_dims = mask.ndim - 2
    if connectivity is None:
        connectivity = spatial_dims
    if isinstance(connectivity, bool) or not isinstance(connectivity, int) or not 1 <= connectivity <= spatial_dims:
        raise ValueError(
            f"connectivity must be None or an int from 1 to the number of spatial dims ({spatial_dims}), "
            f"got {connectivity!r}."
        )
    count = mask.numel()  # voxels of the whole batch, numbered in raster order case after case
    foreground = mask.reshape(count)
    parent = torch.arange(count, device=mask.device)
    while True:
        grandparent = parent[parent]
        # key of a voxel id: count - id (background 0), so a neighbourhood maximum of keys is a minimum of ids
        keys = torch.where(foreground, count - grandparent, 0).reshape(mask.shape)
        # the smallest grandparent over each voxel's neighbourhood within the foreground
        nearest = count - _neighbourhood_max(keys, connectivity).reshape(count)
        nearest = torch.where(foreground, nearest, parent)  # background voxels stay apart
        # hook each voxel's parent, and the voxel itself, onto that smallest grandparent; then shortcut
        hooked = parent.scatter_reduce(0, parent, nearest, "amin")
        hooked = torch.minimum(torch.minimum(hooked, nearest), grandparent)
        if torch.equal(hooked, parent):
            break
        parent = hooked
    sizes = torch.bincount(parent[foreground], minlength=count).reshape(mask.shape[0], -1)  # at each root
    first = sizes.argmax(dim=1)  # the largest; of equal sizes the first maximum, the first voxel in raster order
    keep = first + torch.arange(mask.shape[0], device=mask.device) * sizes.shape[1]
    return (parent.reshape(mask.shape[0], -1) == keep[:, None]).reshape(mask.shape) & mask


def clean_mask(
    mask: torch.Tensor, open_size: int = 3, close_size: int = 3, largest_component: bool = True
) -> torch.Tensor:
    """COIN's cleaning: opening, then closing, then each case's largest connected component (all neighbours).

    Args:
        mask: ``(B, 1, *S)`` bool (or 0/1) mask, 1 to 3 spatial dims.
        open_size: edge of the opening's structuring element (1: no opening).
        close_size: edge of the closing's structuring element (1: no closing).
        largest_component: keep only each case's largest connected component (see
            :func:`largest_connected_component`).

    Returns:
        ``(B, 1, *S)`` bool mask.

    Example:
        >>> mask = torch.zeros(1, 1, 8, 8, dtype=torch.bool)
        >>> mask[0, 0, 1:5, 1:5] = True   # a 4x4 lesion
        >>> mask[0, 0, 7, 7] = True       # a speckle
        >>> cleaned = clean_mask(mask)
        >>> cleaned.sum().item(), cleaned[0, 0, 7, 7].item()
        (16, False)
    """
    mask = _as_mask(mask)
    open_size = _check_size(open_size, "open_size")
    close_size = _check_size(close_size, "close_size")
    if open_size > 1:
        mask = opening(mask, open_size)
    if close_size > 1:
        mask = closing(mask, close_size)
    if largest_component:
        mask = largest_connected_component(mask)
    return mask
