"""Real brain anatomy with nothing to download: the MNI152 2009 template that nilearn ships, as labelled axial slices.

nilearn's wheel contains the ICBM 2009a nonlinear symmetric T1 template (brain extracted) and its grey- and
white-matter probability maps (``nilearn.datasets.MNI152_FILE_PATH``, ``GM_MNI152_FILE_PATH``,
``WM_MNI152_FILE_PATH``): 197 x 233 x 189 voxels of 1 mm, uint8 values 0 to 255, in MNI space. nilearn is an optional
dependency (the extra ``examples``) and is imported only when the files are read.

- **Field of view.** A 192 mm square in the axial plane (``FIELD_OF_VIEW_MM``), voxels ``x`` in [2, 194) and ``y`` in
  [21, 213) (``FIELD_OF_VIEW_START``): centred on the template's tissue (``gm + wm > 0`` spans ``x`` 25 to 171, ``y`` 26
  to 209), which it contains whole. No padding is needed.
- **Resampling.** T1, grey and white matter are each averaged over the pixels of the target grid (``torch``'s
  ``F.interpolate(mode="area")``): the square to ``size`` x ``size`` pixels (``192 / size`` mm each), and along ``z``
  over slabs of ``slice_thickness`` consecutive 1 mm slices (the top slices that do not fill a slab are dropped).
  Averaging probabilities gives the probability of the tissue in the larger pixel.
- **Layout.** Slice arrays are ``(row, column)`` = (anterior to posterior, subject's left to right): an axial view in
  the neurological convention, so ``image[:, ::-1]`` flips left and right. ``mni152_grid_affine`` maps
  ``(row, column, slab)`` to MNI millimetres; the written NIfTI files carry it.
- **Label rule.** ``tissue_labels``: per pixel of the resampled maps, ``argmax(1 - gm - wm, gm, wm)``, the first on
  ties: 0 background (outside the brain and cerebrospinal fluid), 1 grey matter, 2 white matter.
- **Split rule.** ``split_by_blocks``: slabs are cut into blocks of ``block_size`` consecutive slabs, and whole blocks
  go to the splits by a seeded permutation. Where the split changes from one block to the next, the first ``gap``
  slabs of the later block go to no split. Two slabs of different splits are therefore at least ``gap + 1`` slabs
  apart: adjacent slabs never straddle a split.

The template is one (average) brain: a train/validation split by slabs measures how a network generalises along
``z`` within that anatomy, not across subjects.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

from .io import atomic_write_text

__all__ = [
    "FIELD_OF_VIEW_MM",
    "FIELD_OF_VIEW_START",
    "HELD_OUT_FRACTIONS",
    "MNI152_SHAPE",
    "TISSUE_CLASSES",
    "load_mni152",
    "mni152_axial_slices",
    "mni152_grid_affine",
    "split_by_blocks",
    "tissue_labels",
    "write_mni152_tissue_dataset",
]

MNI152_SHAPE = (197, 233, 189)
"""Voxels ``(x, y, z)`` of nilearn's MNI152 2009 files, 1 mm each."""

FIELD_OF_VIEW_MM = 192
"""Edge of the square axial field of view, in mm (1 mm voxels of the template)."""

FIELD_OF_VIEW_START = (2, 21)
"""Voxel ``(x, y)`` of the field of view's first corner: the 192 mm square centred on the template's tissue."""

TISSUE_CLASSES = ("background", "grey_matter", "white_matter")
"""The labels of ``tissue_labels``, by value."""

HELD_OUT_FRACTIONS = MappingProxyType({"validation": 0.25, "test": 0.125})
"""``split_by_blocks``' default: the fraction of the blocks each held-out split gets (the rest is ``"train"``)."""

INSTALL_HINT = 'pip install -c constraints.txt -e ".[examples]"'
"""How to get nilearn with this package (from the repository root)."""

_TEMPLATE_AFFINE = np.array([[1.0, 0, 0, -98], [0, 1, 0, -134], [0, 0, 1, -72], [0, 0, 0, 1]])
"""Voxel to MNI mm of nilearn's MNI152 2009 files (``load_mni152`` checks that the files have it)."""

_NILEARN_FILES = {"t1": "MNI152_FILE_PATH", "gm": "GM_MNI152_FILE_PATH", "wm": "WM_MNI152_FILE_PATH"}


def load_mni152() -> dict[str, Any]:
    """The MNI152 2009 T1 template and its grey- and white-matter probability maps, read from nilearn's files.

    Returns:
        ``{"t1", "gm", "wm"}``: float32 tensors ``(197, 233, 189)`` (``x``, ``y``, ``z``), the file values divided by
        255 (T1 scaled to [0, 1], probabilities in [0, 1]), and ``"affine"``: the ``(4, 4)`` voxel to MNI mm matrix.

    Raises:
        ImportError: nilearn is not installed (the message says how to install it).
        FileNotFoundError: a template file is missing from the nilearn installation (the message names it).
        ValueError: a file does not hold a 197 x 233 x 189 volume with the template's affine (the message names it,
            its shape and affine).
    """
    try:
        import nilearn.datasets
    except ImportError as error:
        raise ImportError(
            f"the MNI152 template comes with nilearn, which is not installed: {INSTALL_HINT} "
            f'(or pip install "nilearn>=0.10")'
        ) from error
    volumes: dict[str, Any] = {}
    for key, attribute in _NILEARN_FILES.items():
        path = pathlib.Path(getattr(nilearn.datasets, attribute))
        if not path.is_file():
            raise FileNotFoundError(f"nilearn {nilearn.__version__} has no MNI152 file {path} ({attribute}).")
        image = nib.load(path)
        if image.shape != MNI152_SHAPE or not np.allclose(image.affine, _TEMPLATE_AFFINE):
            raise ValueError(f"{path} holds a volume of shape {image.shape} and affine {image.affine.tolist()}, "
                             f"expected {MNI152_SHAPE} and {_TEMPLATE_AFFINE.tolist()}.")
        volumes[key] = torch.from_numpy(np.asarray(image.dataobj, dtype=np.float32) / 255)
    volumes["affine"] = _TEMPLATE_AFFINE.copy()
    return volumes


def tissue_labels(gm: torch.Tensor, wm: torch.Tensor) -> torch.Tensor:
    """The tissue label of every pixel: ``argmax(1 - gm - wm, gm, wm)``, the first maximum on ties.

    0 is background (outside the brain and cerebrospinal fluid), 1 grey matter, 2 white matter (``TISSUE_CLASSES``).

    Args:
        gm: grey-matter probability, any shape, values in [0, 1].
        wm: white-matter probability, the shape of ``gm``.

    Returns:
        uint8 labels, the shape of ``gm``.

    Example:
        >>> tissue_labels(torch.tensor([0.1, 0.5, 0.3, 0.4]), torch.tensor([0.2, 0.1, 0.6, 0.4]))
        tensor([0, 1, 2, 1], dtype=torch.uint8)
    """
    if gm.shape != wm.shape:
        raise ValueError(f"gm and wm must have the same shape, got {tuple(gm.shape)} and {tuple(wm.shape)}.")
    return torch.stack([1 - gm - wm, gm, wm]).argmax(dim=0).to(torch.uint8)


def mni152_grid_affine(size: int, slice_thickness: int = 1) -> np.ndarray:
    """The ``(4, 4)`` matrix from ``(row, column, slab)`` of ``mni152_axial_slices(size, slice_thickness)`` to MNI mm.

    A pixel's coordinates are those of the centre of the template voxels it averages.

    Example:
        >>> affine = mni152_grid_affine(96, 2)
        >>> affine[:3, :3].tolist()  # rows go posterior (-y), columns go right (+x), slabs go up (+z), 2 mm each
        [[0.0, 2.0, 0.0], [-2.0, 0.0, 0.0], [0.0, 0.0, 2.0]]
    """
    size, slice_thickness = _check_positive_int(size, "size"), _check_positive_int(slice_thickness, "slice_thickness")
    step = FIELD_OF_VIEW_MM / size
    x0, y0 = FIELD_OF_VIEW_START
    to_voxel = np.array(
        [
            [0.0, step, 0.0, x0 + step / 2 - 0.5],
            [-step, 0.0, 0.0, y0 + (size - 0.5) * step - 0.5],
            [0.0, 0.0, slice_thickness, slice_thickness / 2 - 0.5],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    return _TEMPLATE_AFFINE @ to_voxel


def mni152_axial_slices(
    size: int = 64, *, slice_thickness: int = 1, min_brain_fraction: float = 0.2
) -> dict[str, torch.Tensor]:
    """Axial slices of the MNI152 template, resampled, labelled, keeping those with enough brain.

    See the module docstring for the field of view, resampling, layout and label rule.

    Args:
        size: edge of the square slices in pixels; a pixel is ``192 / size`` mm.
        slice_thickness: slab thickness in 1 mm slices (each slab is the mean of that many slices).
        min_brain_fraction: keep the slabs where at least this fraction of the pixels is grey or white matter
            (label 1 or 2), in [0, 1]; 0 keeps every slab.

    Returns:
        ``{"t1", "gm", "wm"}``: float32 ``(S, size, size)`` in [0, 1]; ``"label"``: uint8 ``(S, size, size)``
        (``tissue_labels``); ``"z"``: int64 ``(S,)``, the slab index of each slice (``mni152_grid_affine``'s third
        coordinate), increasing.

    Raises:
        ImportError: nilearn is not installed.
        ValueError: an argument is out of range, or no slab has enough brain (the message names the argument).
    """
    size, slice_thickness = _check_positive_int(size, "size"), _check_positive_int(slice_thickness, "slice_thickness")
    if not isinstance(min_brain_fraction, numbers.Real) or not 0 <= min_brain_fraction <= 1:
        raise ValueError(f"min_brain_fraction must be a number in [0, 1], got {min_brain_fraction!r}.")
    slabs = MNI152_SHAPE[2] // slice_thickness
    if slabs < 1:
        raise ValueError(f"slice_thickness must be at most {MNI152_SHAPE[2]}, got {slice_thickness}.")
    volumes = load_mni152()
    x0, y0 = FIELD_OF_VIEW_START
    window = (slice(x0, x0 + FIELD_OF_VIEW_MM), slice(y0, y0 + FIELD_OF_VIEW_MM), slice(0, slabs * slice_thickness))
    stacked = torch.stack([volumes[key][window] for key in ("t1", "gm", "wm")])  # (3, X, Y, Z)
    resampled = F.interpolate(stacked[None], size=(size, size, slabs), mode="area")[0]
    # (3, x, y, slab) -> (3, slab, row = y from anterior, column = x)
    t1, gm, wm = resampled.permute(0, 3, 2, 1).flip(2)
    label = tissue_labels(gm, wm)
    kept = (label > 0).flatten(1).float().mean(1) >= min_brain_fraction
    if not kept.any():
        raise ValueError(f"no slab has a brain fraction of min_brain_fraction={min_brain_fraction} or more.")
    return {
        "t1": t1[kept].contiguous(),
        "gm": gm[kept].contiguous(),
        "wm": wm[kept].contiguous(),
        "label": label[kept],
        "z": torch.arange(slabs)[kept],
    }


def split_by_blocks(
    z: Sequence[int],
    *,
    block_size: int = 8,
    gap: int = 2,
    fractions: Mapping[str, float] = HELD_OUT_FRACTIONS,
    seed: int = 0,
) -> list[str | None]:
    """Assign slabs to splits by blocks of consecutive slabs, so that adjacent slabs never straddle a split.

    Slab ``z`` lies in block ``(z - min(z)) // block_size``. The blocks that hold slabs are permuted with
    ``numpy.random.default_rng(seed)``; each split of ``fractions`` in turn takes the next ``round(fraction *
    blocks)`` blocks (at least one for a fraction above 0), and ``"train"`` takes the rest (at least one block). Then
    the first ``gap`` slabs of every block whose preceding block (``block - 1``) holds slabs of another split get no
    split (``None``). Slabs of different splits are thus at least ``gap + 1`` apart.

    Args:
        z: slab indices, distinct non-negative integers in any order.
        block_size: slabs per block, at least 2.
        gap: slabs left out at a change of split, at least 1 and less than ``block_size``.
        fractions: the held-out splits and the fraction of blocks each gets, in [0, 1); not ``"train"``.
        seed: permutation seed.

    Returns:
        the split of each slab of ``z`` (in the order given), or ``None`` for a slab left out.

    Raises:
        ValueError: an argument is out of range, or the blocks are too few for every split to get one.

    Example:
        >>> split_by_blocks(range(8), block_size=2, gap=1, fractions={"validation": 0.25}, seed=0)
        ['train', 'train', 'train', 'train', None, 'validation', None, 'train']
    """
    block_size, gap = _check_positive_int(block_size, "block_size"), _check_positive_int(gap, "gap")
    if gap >= block_size:
        raise ValueError(f"gap must be less than block_size, got gap={gap} and block_size={block_size}.")
    z = [int(index) for index in z]
    if not z or len(set(z)) != len(z) or min(z) < 0:
        raise ValueError(f"z must be distinct non-negative slab indices, at least one, got {z!r}.")
    if "train" in fractions or not all(isinstance(f, numbers.Real) and 0 <= f < 1 for f in fractions.values()):
        raise ValueError(f"fractions must map held-out split names (not 'train') to numbers in [0, 1), got "
                         f"{dict(fractions)!r}.")
    blocks = sorted({(index - min(z)) // block_size for index in z})
    order = [blocks[i] for i in np.random.default_rng(seed).permutation(len(blocks))]
    split_of_block, start = {}, 0
    for name, fraction in fractions.items():
        count = max(1, round(fraction * len(blocks))) if fraction > 0 else 0
        split_of_block.update({block: name for block in order[start:start + count]})
        start += count
    if start >= len(blocks):
        raise ValueError(f"{len(blocks)} block(s) of {block_size} slabs cannot give {start} held-out block(s) "
                         f"({dict(fractions)}) and keep one for training; use smaller blocks or fractions.")
    split_of_block.update({block: "train" for block in order[start:]})
    splits: list[str | None] = []
    for index in z:
        block, position = divmod(index - min(z), block_size)
        changes = block - 1 in split_of_block and split_of_block[block - 1] != split_of_block[block]
        splits.append(None if position < gap and changes else split_of_block[block])
    return splits


def write_mni152_tissue_dataset(
    root: str | os.PathLike,
    *,
    image_size: int = 96,
    slice_thickness: int = 1,
    min_brain_fraction: float = 0.1,
    block_size: int = 8,
    gap: int = 2,
    validation_fraction: float = 0.25,
    test_fraction: float = 0.125,
    seed: int = 0,
) -> list[dict]:
    """Write the MNI152 tissue dataset: labelled axial slabs as 2D NIfTI files, split by blocks of slabs.

    The slabs are those of ``mni152_axial_slices(image_size, slice_thickness=..., min_brain_fraction=...)``, split by
    ``split_by_blocks`` (``fractions={"validation": validation_fraction, "test": test_fraction}``). Slab ``z`` of
    split ``s`` goes to ``{root}/{s}/imagesTr/mni152_z{z:03d}.nii.gz`` (T1, float32 in [0, 1]) and
    ``{root}/{s}/labelsTr/mni152_z{z:03d}.nii.gz`` (uint8: 0 background, 1 grey matter, 2 white matter), each
    ``(image_size, image_size)`` with the slab's MNI affine (``mni152_grid_affine`` moved to slab ``z``). Each split's
    ``{root}/{s}/dataset.json`` lists its slabs under ``"training"`` with relative paths, as
    ``monai.data.load_decathlon_datalist`` expects (the layout of ``monai_protoseg.synthetic.write_dataset``); it is
    written atomically after the images. Existing files of the same names are overwritten.

    Args:
        root: the dataset folder; created if missing.
        image_size: slice edge in pixels (``192 / image_size`` mm per pixel).
        slice_thickness: slab thickness in 1 mm slices.
        min_brain_fraction: keep the slabs where at least this fraction of the pixels is grey or white matter.
        block_size: slabs per block of the split.
        gap: slabs left out where the split changes.
        validation_fraction: fraction of the blocks for ``validation``, in (0, 1).
        test_fraction: fraction of the blocks for ``test``, in [0, 1); 0 writes no ``test`` split.
        seed: seed of the block permutation.

    Returns:
        one dict per slab written, by increasing ``z``: ``{"image", "label"}`` (absolute paths), ``"split"``, ``"z"``,
        and ``"grey_matter"``, ``"white_matter"`` (pixel counts of the label).

    Raises:
        ImportError: nilearn is not installed.
        ValueError: an argument is out of range (the message names it).
    """
    if not isinstance(validation_fraction, numbers.Real) or not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must be a number in (0, 1), got {validation_fraction!r}.")
    fractions = {"validation": validation_fraction, "test": test_fraction}
    if test_fraction == 0:
        fractions.pop("test")
    slices = mni152_axial_slices(image_size, slice_thickness=slice_thickness, min_brain_fraction=min_brain_fraction)
    splits = split_by_blocks(slices["z"].tolist(), block_size=block_size, gap=gap, fractions=fractions, seed=seed)
    affine = mni152_grid_affine(image_size, slice_thickness)
    root = pathlib.Path(root).absolute()
    written: list[dict] = []
    lists: dict[str, list[dict]] = {name: [] for name in ("train", *fractions)}
    for i, split in enumerate(splits):
        if split is None:
            continue
        z = int(slices["z"][i])
        slab_affine = affine.copy()
        slab_affine[:, 3] += z * affine[:, 2]
        name = f"mni152_z{z:03d}.nii.gz"
        paths = {"image": root / split / "imagesTr" / name, "label": root / split / "labelsTr" / name}
        for key, array in (("image", slices["t1"][i].numpy()), ("label", slices["label"][i].numpy())):
            paths[key].parent.mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, slab_affine), paths[key])
        lists[split].append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        counts = torch.bincount(slices["label"][i].flatten().long(), minlength=3).tolist()
        written.append({"image": str(paths["image"]), "label": str(paths["label"]), "split": split, "z": z,
                        "grey_matter": counts[1], "white_matter": counts[2]})
    step = FIELD_OF_VIEW_MM / image_size
    for split, training in lists.items():
        description = {
            "name": f"monai_protoseg MNI152 tissue ({split})",
            "description": f"axial slabs of the MNI152 2009 template (nilearn), {image_size}x{image_size} pixels of "
                           f"{step:g} mm, {slice_thickness} mm thick; label argmax(1 - gm - wm, gm, wm); split by "
                           f"blocks of {block_size} slabs with gaps of {gap}, seed {seed}",
            "tensorImageSize": "2D",
            "modality": {"0": "T1"},
            "labels": dict(enumerate(TISSUE_CLASSES)),
            "numTraining": len(training),
            "numTest": 0,
            "training": training,
            "test": [],
        }
        atomic_write_text(root / split / "dataset.json", json.dumps(description, indent=2) + "\n")
    return written


def _check_positive_int(value: object, name: str) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
    return int(value)
