"""What the handlers read of the batch the network saw (``engine.state.batch``: on the network's grid, before any
post-transform such as ``Invertd``), and the check that a label lies on that grid."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from monai.data.utils import affine_to_spacing
from nibabel.orientations import aff2axcodes

__all__ = ["Grid", "as_batch", "batch_value", "grid_of", "check_same_grid"]

def as_batch(value: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """A batch-first tensor from a tensor or a list of channel-first tensors (MONAI's decollated output)."""
    if isinstance(value, torch.Tensor):
        return value.as_subclass(torch.Tensor)
    return torch.stack([item.as_subclass(torch.Tensor) for item in value])


@dataclass
class Grid:
    """The spatial grid of a batch: its spatial shape and, when meta data tells, each item's affine."""

    shape: tuple[int, ...]
    affine: torch.Tensor | None = None  # (B, 4, 4) float64

    def describe(self) -> str:
        """``(35, 35, 38)``, with ``spacing (1.5, 1.5, 2) in RAS`` when the affine is known."""
        text = str(self.shape)
        if self.affine is None:
            return text
        affine = self.affine[0].numpy()
        rank = min(len(self.shape), affine.shape[-1] - 1)
        spacing = ", ".join(f"{value:.4g}" for value in affine_to_spacing(affine, r=rank))
        return f"{text} at spacing ({spacing}) in {''.join(aff2axcodes(affine))[:rank]}"

    def matches(self, other: Grid) -> bool:
        """Same shape, and same affines wherever both are known."""
        if self.shape != other.shape:
            return False
        if self.affine is None or other.affine is None or self.affine.shape != other.affine.shape:
            return True
        return torch.allclose(self.affine, other.affine, rtol=1e-4, atol=1e-4)


def batch_value(batch: Any, key: str) -> torch.Tensor | list[torch.Tensor] | None:
    """``key``'s value in a collated dict batch (a ``(B, C, *S)`` tensor), or in a list of decollated dicts (MONAI
    engines decollate ``engine.state.batch`` by default: a list of ``(C, *S)`` tensors); ``None`` when the batch does
    not hold ``key``. :func:`as_batch` makes either a batch-first tensor."""
    if isinstance(batch, dict):
        return batch.get(key)
    if isinstance(batch, (list, tuple)) and batch and all(isinstance(item, dict) and key in item for item in batch):
        return [item[key] for item in batch]
    return None


def grid_of(value: Any, batch: Any = None, key: str | None = None) -> Grid:
    """The grid of a batch ``value`` (a tensor or a list of channel-first tensors), its affines read from MetaTensor
    meta data, else from ``batch[f"{key}_meta_dict"]``."""
    items = list(value) if isinstance(value, (list, tuple)) else None
    shape = tuple((items[0] if items else value).shape[1 if items else 2:])
    affines = [_affine(item) for item in items] if items else [_affine(value)]
    if any(affine is None for affine in affines) and batch is not None and key is not None:
        affines = [_meta_dict_affine(batch, key)]
    if any(affine is None for affine in affines):
        return Grid(shape)
    return Grid(shape, torch.cat([affine.reshape(-1, *affine.shape[-2:]) for affine in affines]))


def check_same_grid(what: str, grid: Grid, network_grid: Grid, cause: str) -> None:
    """Raise a ``ValueError`` naming both grids, the likely ``cause`` and the fix, when ``grid`` is not the network's.

    Args:
        what: what lies on ``grid`` (``"the label (engine.state.batch['label'])"``).
        grid: its grid.
        network_grid: the grid of the input the network saw.
        cause: the likely cause and the fix.
    """
    if not grid.matches(network_grid):
        raise ValueError(
            f"{what} is not on the grid the network saw: it is {grid.describe()}, the network's input "
            f"{network_grid.describe()}. {cause}"
        )


def _affine(value: Any) -> torch.Tensor | None:
    meta = getattr(value, "meta", None)
    affine = None if meta is None else meta.get("affine")
    return None if affine is None else torch.as_tensor(np.asarray(affine), dtype=torch.float64)


def _meta_dict_affine(batch: Any, key: str) -> torch.Tensor | None:
    items = batch if isinstance(batch, (list, tuple)) else [batch]
    affines = []
    for item in items:
        meta = item.get(f"{key}_meta_dict") if isinstance(item, dict) else None
        if not isinstance(meta, dict) or meta.get("affine") is None:
            return None
        affine = torch.as_tensor(np.asarray(meta["affine"]), dtype=torch.float64)
        affines.append(affine.reshape(-1, *affine.shape[-2:]))
    return torch.cat(affines)
