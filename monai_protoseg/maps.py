"""Prototype maps of chosen cases as pictures: a 2D snapshot per case and class, saved as ``.npz``, plotted as a
figure (image, ground truth, prediction, then every layer's map) or tiled into one image for TensorBoard.

A snapshot is taken from one case's full tensors; for a 3D case it keeps one axial slice (the last spatial axis, as
in MONAI): the one with the most foreground, or a given index. ``take_snapshot`` works on tensors; the snapshot
holds numpy arrays, ready to save and plot. Figures are made without pyplot, so no backend or global state is
touched.
"""

from __future__ import annotations

import io
import math
import os
import pathlib
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .figures import figure_png, short_label
from .io import atomic_write_bytes
from .sections import Paragraph, PNGImage, RunFiles, Section

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MapSnapshot",
    "take_snapshot",
    "save_snapshot",
    "read_snapshot",
    "plot_prototype_maps",
    "tile_snapshot",
    "prototype_map_section",
    "SNAPSHOT_FORMAT",
    "SNAPSHOT_VERSION",
]

SNAPSHOT_FORMAT = "monai_protoseg.MapSnapshot"
SNAPSHOT_VERSION = 1
_REQUIRED = ("format", "version", "case", "class_name", "layers", "image", "prob", "maps", "sa", "reference",
             "spatial_shape")


@dataclass(frozen=True, eq=False)
class MapSnapshot:
    """The prototype maps of every probed layer for one case and one class, on one 2D slice.

    Attributes:
        case: the case name.
        class_name: the class whose foreground probability guided the prototypes.
        layers: the layer names, in the order of ``maps`` and ``sa``.
        image: ``(C, H, W)`` float32 image slice, all channels (figures show the first).
        prob: ``(H, W)`` float32 foreground probability of the class (the network's soft prediction).
        label: ``(H, W)`` bool ground truth of the class, or ``None`` (inference).
        maps: ``(L, H, W)`` float32 prototype maps in [0, 1] (NaN where a prototype does not exist); the binary
            ProtoSeg map is ``maps > 0.5``.
        sa: ``(L,)`` float64 SA of each layer over the whole case (all slices): Dice of ``map > 0.5`` against
            ``reference``; NaN when the map or the reference is undefined or the reference is empty.
        reference: ``"label"`` (the ground truth) or ``"prediction"`` (the network's binarised prediction).
        spatial_shape: the spatial shape of the whole case; a 3D case is sliced along its last axis.
        slice_index: the index of the slice along the last axis for a 3D case; ``None`` for a 2D case.
    """

    case: str
    class_name: str
    layers: tuple[str, ...]
    image: np.ndarray
    prob: np.ndarray
    label: np.ndarray | None
    maps: np.ndarray
    sa: np.ndarray
    reference: str
    spatial_shape: tuple[int, ...]
    slice_index: int | None

    def __post_init__(self) -> None:
        size = self.prob.shape
        problems = []
        if self.prob.ndim != 2:
            problems.append(f"prob must be 2D (H, W), got shape {self.prob.shape}")
        if self.image.ndim != 3 or self.image.shape[1:] != size:
            problems.append(f"image must be (C, *{size}), got shape {self.image.shape}")
        if self.label is not None and self.label.shape != size:
            problems.append(f"label must be {size}, got shape {self.label.shape}")
        if not self.layers:
            problems.append("there must be at least one layer")
        if self.maps.shape != (len(self.layers), *size):
            problems.append(f"maps must be {(len(self.layers), *size)} (layers, H, W), got shape {self.maps.shape}")
        if self.sa.shape != (len(self.layers),):
            problems.append(f"sa must have one value per layer ({len(self.layers)}), got shape {self.sa.shape}")
        if self.reference not in ("label", "prediction"):
            problems.append(f"reference must be 'label' or 'prediction', got {self.reference!r}")
        if len(self.spatial_shape) not in (2, 3) or (self.slice_index is None) != (len(self.spatial_shape) == 2):
            problems.append(f"spatial_shape {self.spatial_shape} and slice_index {self.slice_index} disagree "
                            f"(a 2D case has no slice index, a 3D case has one)")
        if problems:
            raise ValueError(f"invalid MapSnapshot of case {self.case!r}: " + "; ".join(problems) + ".")


def take_snapshot(
    image: torch.Tensor,
    prob: torch.Tensor,
    maps: Mapping[str, torch.Tensor],
    label: torch.Tensor | None = None,
    *,
    prediction: torch.Tensor | None = None,
    case: str = "case",
    class_name: str = "class",
    slice_index: int | None = None,
) -> MapSnapshot:
    """The snapshot of one case and class: a 2D case whole, a 3D case at one slice of its last spatial axis.

    The 3D slice is ``slice_index`` when given, else the one with the most foreground in ``label`` (in the prediction
    when there is no label or it is empty; the first such slice on ties, the middle slice when neither has any).

    Args:
        image: ``(C, *S)`` image of the case.
        prob: ``(*S)`` foreground probability of the class in [0, 1].
        maps: ``{layer: (*S)}`` prototype maps (:func:`~monai_protoseg.prototype_map` of one image and class).
        label: binary ``(*S)`` ground truth of the class, or ``None``.
        prediction: binary ``(*S)`` prediction of the class (argmax for a softmax network); default ``prob > 0.5``.
            The reference of SA and of the slice choice when there is no label.
        case: the case name.
        class_name: the class name.
        slice_index: the slice of a 3D case along its last axis (negative counts from the end).

    Returns:
        the snapshot, with numpy arrays.

    Raises:
        ValueError: a shape does not match ``prob``'s, ``prob`` is not in [0, 1], ``label`` or ``prediction`` is not
            binary, ``maps`` is empty, or ``slice_index`` is out of range or given for a 2D case.

    Example:
        >>> prob = torch.zeros(8, 8); prob[2:6, 2:6] = 1
        >>> snapshot = take_snapshot(prob[None], prob, {"model.0": prob}, prob > 0.5)
        >>> snapshot.maps.shape, snapshot.sa.tolist(), snapshot.slice_index
        ((1, 8, 8), [1.0], None)
    """
    size = tuple(prob.shape)
    if len(size) not in (2, 3):
        raise ValueError(f"take_snapshot needs a 2D or 3D case: prob must be (H, W) or (H, W, D), got shape {size}.")
    if image.ndim != len(size) + 1 or tuple(image.shape[1:]) != size:
        raise ValueError(f"image must be (C, *{size}) like prob, got shape {tuple(image.shape)}.")
    if not maps:
        raise ValueError("maps is empty: take_snapshot needs the map of at least one layer.")
    for layer, value in maps.items():
        if tuple(value.shape) != size:
            raise ValueError(f"the map of layer {layer!r} has shape {tuple(value.shape)}, prob {size}.")
    prob = prob.as_subclass(torch.Tensor).float()
    low, high = torch.aminmax(prob)
    if not (low >= 0 and high <= 1):
        raise ValueError(
            f"prob must be a foreground probability in [0, 1], got values in [{low.item():.4g}, {high.item():.4g}]."
        )
    label = None if label is None else _binary(label, "label", size).to(prob.device)
    prediction = prob > 0.5 if prediction is None else _binary(prediction, "prediction", size).to(prob.device)
    reference = prediction if label is None else label
    stacked = torch.stack([value.as_subclass(torch.Tensor).to(prob.device, torch.float32) for value in maps.values()])
    sa = _dice(stacked, reference)
    if len(size) == 3:
        index = slice_with_most_foreground([reference, prediction], slice_index)
        image, prob, stacked = image[..., index], prob[..., index], stacked[..., index]
        label = None if label is None else label[..., index]
    elif slice_index is not None:
        raise ValueError(f"slice_index is for 3D cases; this case is 2D (shape {size}).")
    else:
        index = None
    return MapSnapshot(
        case=case,
        class_name=class_name,
        layers=tuple(maps),
        image=_numpy(image.as_subclass(torch.Tensor).float()),
        prob=_numpy(prob),
        label=None if label is None else _numpy(label),
        maps=_numpy(stacked),
        sa=_numpy(sa),
        reference="prediction" if label is None else "label",
        spatial_shape=size,
        slice_index=index,
    )


def _binary(value: torch.Tensor, name: str, size: tuple[int, ...]) -> torch.Tensor:
    """``value`` as a bool tensor, after checking its shape and that it is binary."""
    if tuple(value.shape) != size:
        raise ValueError(f"{name} must have prob's shape {size}, got {tuple(value.shape)}.")
    value = value.as_subclass(torch.Tensor)
    if value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
        raise ValueError(f"{name} must be binary (bool or 0/1 values) for one class, got other values.")
    return value.bool()


def _dice(maps: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Dice of each ``(L, *S)`` map's ``> 0.5`` against the bool ``reference``: ``(L,)`` float64, NaN when the map
    has NaN or the reference is empty."""
    binary = (maps > 0.5).flatten(1)
    reference = reference.flatten()
    truth = reference.sum()
    dice = 2 * (binary & reference).sum(1).double() / (binary.sum(1) + truth).clamp_min(1).double()
    undefined = maps.isnan().flatten(1).any(1) | (truth == 0)
    return dice.masked_fill(undefined, math.nan)


def slice_with_most_foreground(references: Sequence[torch.Tensor], slice_index: int | None) -> int:
    """The slice along the last axis of ``(H, W, D)`` masks: ``slice_index`` (checked), else the one with the most
    foreground in the first mask that has any, else the middle one."""
    depth = references[0].shape[-1]
    if slice_index is not None:
        if not -depth <= slice_index < depth:
            raise ValueError(f"slice_index {slice_index} is out of range for {depth} slices along the last axis.")
        return slice_index % depth
    for reference in references:
        counts = reference.flatten(0, -2).sum(0)  # (D,)
        if counts.any():
            return int(counts.argmax())
    return depth // 2


def _numpy(value: torch.Tensor) -> np.ndarray:
    return value.detach().cpu().numpy()


def save_snapshot(path: str | os.PathLike, snapshot: MapSnapshot) -> pathlib.Path:
    """Save ``snapshot`` as a compressed ``.npz`` file, atomically (see :func:`~monai_protoseg.io.atomic_write_bytes`).

    Args:
        path: the file to write.
        snapshot: the snapshot.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    arrays = {
        "format": np.array(SNAPSHOT_FORMAT),
        "version": np.array(SNAPSHOT_VERSION),
        "case": np.array(snapshot.case),
        "class_name": np.array(snapshot.class_name),
        "layers": np.array(snapshot.layers, dtype=str),
        "image": snapshot.image,
        "prob": snapshot.prob,
        "maps": snapshot.maps,
        "sa": snapshot.sa,
        "reference": np.array(snapshot.reference),
        "spatial_shape": np.array(snapshot.spatial_shape, dtype=np.int64),
    }
    if snapshot.label is not None:
        arrays["label"] = snapshot.label
    if snapshot.slice_index is not None:
        arrays["slice_index"] = np.array(snapshot.slice_index, dtype=np.int64)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return atomic_write_bytes(path, buffer.getvalue())


def read_snapshot(path: str | os.PathLike) -> MapSnapshot:
    """Read a snapshot written by :func:`save_snapshot`.

    Args:
        path: the ``.npz`` file.

    Returns:
        the snapshot.

    Raises:
        FileNotFoundError: no such file.
        ValueError: the file is corrupt, not a snapshot, of a newer format version, or inconsistent; the message
            names the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no snapshot file {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        raise ValueError(f"{path} is not a readable prototype-map snapshot (.npz): {error}") from error
    missing = [key for key in _REQUIRED if key not in arrays]
    if missing or str(arrays["format"]) != SNAPSHOT_FORMAT:
        found = "no format field" if "format" not in arrays else f"format {str(arrays['format'])!r}"
        raise ValueError(f"{path} is not a prototype-map snapshot ({found}; missing fields: {missing or 'none'}).")
    try:
        version = int(arrays["version"])
        if version > SNAPSHOT_VERSION:
            raise ValueError(f"snapshot format version {version}, but this monai_protoseg reads versions up to "
                             f"{SNAPSHOT_VERSION} (upgrade monai_protoseg)")
        return MapSnapshot(
            case=str(arrays["case"]),
            class_name=str(arrays["class_name"]),
            layers=tuple(str(layer) for layer in arrays["layers"]),
            image=arrays["image"],
            prob=arrays["prob"],
            label=arrays.get("label"),
            maps=arrays["maps"],
            sa=arrays["sa"],
            reference=str(arrays["reference"]),
            spatial_shape=tuple(int(n) for n in arrays["spatial_shape"]),
            slice_index=int(arrays["slice_index"]) if "slice_index" in arrays else None,
        )
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: {error}") from error


def plot_prototype_maps(snapshots: MapSnapshot | Sequence[MapSnapshot]) -> Figure:
    """One row per snapshot: the image (first channel), the ground truth, the prediction, then each layer's map.

    The prediction and the maps are foreground probabilities on one colour scale (a colorbar at the right); the white
    outline is the binary map (``> 0.5``). A map's title gives its layer and its SA over the whole case.

    Args:
        snapshots: one snapshot or several (rows may have different layers).

    Returns:
        the figure: ``rows x (3 + most layers)`` panels (unused ones hidden) and one colorbar.

    Raises:
        ValueError: no snapshot.
    """
    from matplotlib.figure import Figure  # here, so that importing the package (and the handler) stays light

    rows = [snapshots] if isinstance(snapshots, MapSnapshot) else list(snapshots)
    if not rows:
        raise ValueError("plot_prototype_maps needs at least one snapshot.")
    columns = 3 + max(len(snapshot.layers) for snapshot in rows)
    figure = Figure(figsize=(1.9 * columns + 0.8, 2.1 * len(rows) + 0.3), layout="constrained")
    axes = figure.subplots(len(rows), columns, squeeze=False)
    for axis in axes.flat:
        axis.set_axis_off()
    mappable = None
    for row, snapshot in zip(axes, rows):
        where = "" if snapshot.slice_index is None else f", slice {snapshot.slice_index}/{snapshot.spatial_shape[-1]}"
        row[0].imshow(snapshot.image[0], cmap="gray")
        row[0].set_title(f"{snapshot.case}{where}\nimage", fontsize=8)
        if snapshot.label is not None:
            row[1].imshow(snapshot.label, cmap="gray", vmin=0, vmax=1)
        else:
            row[1].text(0.5, 0.5, "no ground truth", ha="center", va="center", fontsize=8, transform=row[1].transAxes)
        row[1].set_title(f"{snapshot.class_name}\nground truth", fontsize=8)
        mappable = _probability_panel(row[2], snapshot.prob, "prediction")
        for axis, layer, values, sa in zip(row[3:], snapshot.layers, snapshot.maps, snapshot.sa):
            score = "undefined" if math.isnan(sa) else f"{sa:.3f}"
            vs = "" if snapshot.reference == "label" else " vs pred"
            _probability_panel(axis, values, f"{short_label(layer, 20)}\nSA {score}{vs}")
    figure.colorbar(mappable, ax=axes[:, 2:], shrink=0.8, label="foreground probability")
    return figure


def _probability_panel(axis, values: np.ndarray, title: str):
    """Show a probability map in [0, 1] with its ``0.5`` outline; return the image for the colorbar."""
    image = axis.imshow(values, cmap="viridis", vmin=0, vmax=1)
    if np.nanmin(values, initial=1) < 0.5 < np.nanmax(values, initial=0):
        axis.contour(values, levels=[0.5], colors="white", linewidths=0.8)
    axis.set_title(title, fontsize=8)
    return image


def tile_snapshot(snapshot: MapSnapshot, gap: int = 2) -> np.ndarray:
    """The snapshot's panels side by side in one grey image, for TensorBoard's ``SummaryWriter.add_image``.

    Left to right: the image's first channel scaled to [0, 1], the ground truth (black when absent), the prediction's
    probability, then each layer's prototype map (NaN shown black), separated by ``gap`` white columns.

    Args:
        snapshot: the snapshot.
        gap: the width of the white separators, in pixels.

    Returns:
        ``(1, H, W_total)`` float32 in [0, 1] (``dataformats="CHW"``).

    Example:
        >>> prob = torch.zeros(8, 8); prob[2:6, 2:6] = 1
        >>> tile_snapshot(take_snapshot(prob[None], prob, {"model.0": prob})).shape
        (1, 8, 38)
    """
    image = snapshot.image[0].astype(np.float32)
    low, high = np.nanmin(image), np.nanmax(image)
    image = (image - low) / (high - low) if high > low else np.zeros_like(image)
    label = np.zeros_like(image) if snapshot.label is None else snapshot.label.astype(np.float32)
    panels = [image, label, snapshot.prob, *snapshot.maps]
    separator = np.ones((image.shape[0], gap), dtype=np.float32)
    tiles = [part for panel in panels for part in (separator, np.nan_to_num(panel, nan=0.0))][1:]
    return np.concatenate(tiles, axis=1)[None].astype(np.float32)


def prototype_map_section(run: RunFiles) -> Section | None:
    """The report's section on the prototype maps ``PrototypeMapHandler(output_dir=...)`` saved in
    ``prototype_maps/``: one figure, a row per case and class."""
    paths = sorted((run.run_dir / "prototype_maps").glob("*.npz"))
    if not paths:
        return None
    snapshots = [read_snapshot(path) for path in paths]
    cases = ", ".join(dict.fromkeys(f"`{snapshot.case}`" for snapshot in snapshots))
    return Section(
        "Prototype maps",
        summary=[f"Prototype maps of {len(snapshots[0].layers)} layers are shown for {len(snapshots)} case-class "
                 f"pair(s): {cases}."],
        blocks=[
            Paragraph("Each row: the image, the ground truth, the network's soft prediction, then every probed layer's "
                      "prototype map (soft, with its 0.5 contour: the binary ProtoSeg map) and its SA over the whole "
                      "case. 3D cases show the slice with the most foreground."),
            PNGImage("prototype_maps.png", "prototype maps", figure_png(plot_prototype_maps(snapshots), dpi=80)),
        ],
    )
