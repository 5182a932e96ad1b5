"""The attribution maps of several methods side by side: one row per case, the image, the prediction, then each
method's map.

A 2D case is shown whole; a 3D case at one slice of its last spatial axis (as in MONAI): the one with the most
predicted foreground, the middle one without a prediction or when it is empty (the rule of
:mod:`monai_protoseg.maps`). The figure is made without pyplot, so no backend or global state is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..maps import slice_with_most_foreground

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_attribution_maps"]


def plot_attribution_maps(
    images: Sequence[np.ndarray | torch.Tensor],
    maps_by_method: Mapping[str, Sequence[np.ndarray | torch.Tensor]],
    predictions: Sequence[np.ndarray | torch.Tensor] | None = None,
    titles: Sequence[str] | None = None,
    reference_title: str = "prediction",
    map_label: str = "attribution",
) -> Figure:
    """One row per case: the image (first channel), the binary prediction, then each method's attribution map.

    The maps share one colour scale, [0, 1], with a colorbar at the right; the prediction's outline is drawn on every
    map. Cases may differ in shape (2D and 3D cases in one figure).

    Args:
        images: per case, ``(C, *S)`` with 2 or 3 spatial dimensions (a batch ``(B, C, *S)`` works too).
        maps_by_method: per method, the map of every case, ``(1, *S)`` or ``(*S)`` in [0, 1] (a batch ``(B, 1, *S)``
            works too); the methods become the columns, in order.
        predictions: per case, the binary prediction ``(1, *S)`` or ``(*S)``; it also chooses a 3D case's slice.
        titles: per case, the row's title; default ``case 0``, ``case 1``, ...
        reference_title: the title of the second column (``predictions`` may be any reference mask, the truth).
        map_label: the colorbar's label.

    Returns:
        the figure: ``cases x (2 + methods)`` panels and one colorbar.

    Raises:
        ValueError: no case or no method, a method, the predictions or the titles do not have one entry per case, or
            a shape does not match the case's image.

    Example:
        >>> maps = {"Grad-CAM": torch.rand(2, 1, 8, 8), "RISE": torch.rand(2, 1, 8, 8)}
        >>> figure = plot_attribution_maps(torch.rand(2, 1, 8, 8), maps, predictions=torch.rand(2, 1, 8, 8) > 0.5)
        >>> len(figure.axes)  # 2 rows of image, prediction and 2 maps, and the colorbar
        9
    """
    from matplotlib.figure import Figure  # here, so that importing the attribution package stays light

    cases = len(images)
    if cases == 0 or not maps_by_method:
        raise ValueError("plot_attribution_maps needs at least one case and one method.")
    counts = {f"method {name!r}": len(maps) for name, maps in maps_by_method.items()}
    counts.update({name: len(values) for name, values in (("predictions", predictions), ("titles", titles))
                   if values is not None})
    wrong = {name: count for name, count in counts.items() if count != cases}
    if wrong:
        raise ValueError(f"every method, the predictions and the titles need one entry per case ({cases} images); "
                         f"got {wrong}.")
    columns = 2 + len(maps_by_method)
    figure = Figure(figsize=(1.7 * columns + 0.8, 1.9 * cases + 0.3), layout="constrained")
    axes = figure.subplots(cases, columns, squeeze=False)
    mappable = None
    for case, row in enumerate(axes):
        for axis in row:
            axis.set_axis_off()
        image = _numpy(images[case])
        if image.ndim not in (3, 4):
            raise ValueError(f"case {case}: the image must be (C, *S) with 2 or 3 spatial dimensions, got shape "
                             f"{image.shape}.")
        spatial = image.shape[1:]
        prediction = None if predictions is None else _full(predictions[case], spatial, f"case {case}: prediction")
        index = None
        if len(spatial) == 3:
            reference = np.zeros(spatial, dtype=bool) if prediction is None else prediction > 0.5
            index = slice_with_most_foreground([torch.from_numpy(reference)], None)
        title = f"case {case}" if titles is None else titles[case]
        where = "" if index is None else f", slice {index}/{spatial[-1]}"
        row[0].imshow(_sliced(image[0], index), cmap="gray")
        row[0].set_title(f"{title}{where}\nimage", fontsize=8)
        outline = None
        if prediction is None:
            row[1].text(0.5, 0.5, f"no {reference_title}", ha="center", va="center", fontsize=8,
                        transform=row[1].transAxes)
        else:
            outline = _sliced(prediction, index)
            row[1].imshow(outline, cmap="gray", vmin=0, vmax=1)
        row[1].set_title(reference_title, fontsize=8)
        for axis, (name, maps) in zip(row[2:], maps_by_method.items()):
            values = _sliced(_full(maps[case], spatial, f"case {case}: the map of {name!r}"), index)
            mappable = axis.imshow(values, cmap="inferno", vmin=0, vmax=1)
            if outline is not None and outline.min() < 0.5 < outline.max():
                axis.contour(outline, levels=[0.5], colors="cyan", linewidths=0.6)
            axis.set_title(name, fontsize=8)
    figure.colorbar(mappable, ax=axes[:, 2:], shrink=0.8, label=map_label)
    return figure


def _numpy(value: np.ndarray | torch.Tensor) -> np.ndarray:
    """``value`` as a float32 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().as_subclass(torch.Tensor).float().numpy()
    return np.asarray(value, dtype=np.float32)


def _full(value: np.ndarray | torch.Tensor, spatial: tuple[int, ...], what: str) -> np.ndarray:
    """A ``(1, *S)`` or ``(*S)`` value as a ``(*S)`` array, checked against the image's spatial shape."""
    array = _numpy(value)
    if array.shape not in (spatial, (1, *spatial)):
        raise ValueError(f"{what} has shape {array.shape}; expected {spatial} or (1, *{spatial}) like the image.")
    return array.reshape(spatial)


def _sliced(array: np.ndarray, index: int | None) -> np.ndarray:
    """A 2D array whole, a 3D array at ``index`` of its last axis."""
    return array if index is None else array[..., index]
