"""RISE for segmentation: the target score of the input under random smooth masks, averaged over the masks."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.utils import ensure_tuple_rep
from torch import nn

from .base import SegmentationAttribution, resize_to

__all__ = ["RISE", "rise_masks"]


def rise_masks(
    n_masks: int,
    spatial_size: Sequence[int],
    grid_size: int | Sequence[int] = 8,
    probability: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The random masks of RISE (Petsiuk et al., BMVC 2018), in 1D, 2D or 3D.

    Each mask starts as a binary grid of ``grid_size`` cells per axis (the paper's ``s``), each cell 1 with
    ``probability``; the grid is upsampled linearly to ``(grid_size + 1) * cell`` pixels per axis, with
    ``cell = ceil(S / grid_size)``, and a window of size ``S`` is cropped at a random shift in ``[0, cell)`` per axis,
    so that the masks are smooth and their cells do not all start at the same pixels.

    Args:
        n_masks: how many masks.
        spatial_size: ``S``, the input's spatial size.
        grid_size: cells per axis of the low-resolution grid, one number or one per axis.
        probability: the probability of a cell being 1 (the paper's ``p``).
        generator: the random generator (CPU); None: torch's global one.

    Returns:
        ``(n_masks, 1, *S)`` float masks in [0, 1], on the CPU.

    Example:
        >>> masks = rise_masks(4, (32, 32), grid_size=4, generator=torch.Generator().manual_seed(0))
        >>> masks.shape, bool(masks.min() >= 0), bool(masks.max() <= 1)
        (torch.Size([4, 1, 32, 32]), True, True)
    """
    grids, shifts = _draw_grids(n_masks, spatial_size, grid_size, probability, generator)
    return _upsample(grids, shifts, spatial_size)


class RISE(SegmentationAttribution):
    """RISE (Petsiuk et al., BMVC 2018) of the segmentation target; no layers, no gradients.

    The map is ``sum_i s(X * M_i) M_i / (N p)`` over ``N = n_masks`` random masks ``M_i`` (see :func:`rise_masks`),
    with ``s`` the target score summed over the region fixed from the unmasked prediction (so masking cannot move
    the target), then min-max normalised to [0, 1] per case. ``use="prob"`` (the default, as in the paper) sums the
    class probability over the region; ``use="logit"`` the logits. The masks are drawn from a generator seeded with
    ``seed`` at every call, so a call is reproducible and the same masks serve every case; the masked inputs are run
    ``batch_size`` at a time without gradients (``n_masks`` forward passes per case in all). RISE explains the input
    directly: ``result.layer_maps`` holds one raw map, under ``"input"``, and no layer is recorded. Other arguments
    as in :class:`~monai_protoseg.attribution.SegmentationAttribution`.

    Args:
        n_masks: how many random masks (the paper uses thousands; a few hundred give a coarse map).
        grid_size: cells per axis of each mask's low-resolution grid, one number or one per spatial axis.
        probability: the probability of a cell being kept.
        batch_size: masked inputs per forward pass.
        seed: the seed of the masks' random generator.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
        >>> result = RISE(network, n_masks=8, grid_size=4, batch_size=4)(torch.rand(2, 1, 32, 32))
        >>> result.map.shape, list(result.layer_maps)
        (torch.Size([2, 1, 32, 32]), ['input'])
    """

    uses_gradients = False

    def __init__(
        self,
        network: nn.Module,
        class_index: int = 1,
        region: str | torch.Tensor = "pred",
        use: str = "prob",
        activation: str | None = "softmax",
        n_masks: int = 1000,
        grid_size: int | Sequence[int] = 8,
        probability: float = 0.5,
        batch_size: int = 16,
        seed: int = 0,
    ) -> None:
        super().__init__(network, [""], class_index, region, use, activation)
        self.layers = []  # RISE records no layer: only the output is used
        if n_masks < 1:
            raise ValueError(f"n_masks must be at least 1, got {n_masks}.")
        if not 0 < probability <= 1:
            raise ValueError(f"probability must be in (0, 1], got {probability}.")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        self.n_masks = n_masks
        self.grid_size = grid_size
        self.probability = probability
        self.batch_size = batch_size
        self.seed = seed

    @torch.no_grad()
    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        spatial_size = inputs.shape[2:]
        generator = torch.Generator().manual_seed(self.seed)
        grids, shifts = _draw_grids(self.n_masks, spatial_size, self.grid_size, self.probability, generator)
        saliency = torch.zeros(inputs.shape[0], 1, *spatial_size, dtype=inputs.dtype, device=inputs.device)
        for first in range(0, self.n_masks, self.batch_size):
            chunk = slice(first, first + self.batch_size)
            masks = _upsample(grids[chunk], shifts[chunk], spatial_size).to(inputs)
            for case in range(inputs.shape[0]):
                scores = self.score(self.network(inputs[case:case + 1] * masks),
                                    region_mask[case:case + 1].expand(len(masks), *region_mask.shape[1:]))
                saliency[case] += (scores.to(masks).view(-1, *(1,) * (masks.ndim - 1)) * masks).sum(0)
        return {"input": saliency / (self.n_masks * self.probability)}


def _draw_grids(
    n_masks: int,
    spatial_size: Sequence[int],
    grid_size: int | Sequence[int],
    probability: float,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The binary low-resolution grids ``(N, 1, *grid)`` and the crop shifts ``(N, dims)`` of the masks."""
    spatial_size = tuple(int(size) for size in spatial_size)
    grid = ensure_tuple_rep(grid_size, len(spatial_size))
    if any(cells < 1 for cells in grid):
        raise ValueError(f"grid_size must be at least 1 per axis, got {grid_size}.")
    cells = [math.ceil(size / count) for size, count in zip(spatial_size, grid)]
    grids = (torch.rand(n_masks, 1, *grid, generator=generator) < probability).float()
    shifts = torch.stack([torch.randint(0, cell, (n_masks,), generator=generator) for cell in cells], dim=1)
    return grids, shifts


def _upsample(grids: torch.Tensor, shifts: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Upsample each grid to ``(grid + 1) * cell`` pixels per axis and crop ``spatial_size`` at its shift."""
    spatial_size = tuple(int(size) for size in spatial_size)
    grid = grids.shape[2:]
    upsampled = resize_to(grids, [(count + 1) * math.ceil(size / count) for size, count in zip(spatial_size, grid)])
    crops = [mask[(slice(None), *(slice(int(start), int(start) + size) for start, size in zip(shift, spatial_size)))]
             for mask, shift in zip(upsampled, shifts)]
    return torch.stack(crops).clamp(0, 1)  # linear interpolation of 0/1 may overshoot by rounding
