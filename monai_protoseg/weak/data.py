"""A seeded, weakly labelled 2D dataset: synthetic lesions pasted into anatomy, image label = lesion present.

Each case is drawn from its own generator (``numpy.random.default_rng([seed, index])``), so a case does not depend on
how many cases are written. The anatomy is one of:

- ``"synthetic"``: MONAI's ``create_test_image_2d`` (random flat discs of intensity 0.5 to 1 over faint noise, rescaled
  to [0, 1]): "organs" that the classifier must learn to ignore.
- ``"mni152"``: an axial slice of the MNI152 2009 T1 template that nilearn ships (optional extra ``examples``), resized
  to the image size, scaled to [0, 1], randomly flipped left-right. There is one template brain, so every split draws
  from the same slices; only the lesions differ.

With probability ``lesion_probability`` (0.65 by default) a lesion is added: a Gaussian blob ``a * t * g`` with
``g = exp(-r^2 / 2)`` for the elliptic radius ``r`` (standard deviations ``LESION_SIGMA`` of the image edge per axis,
random orientation), peak contrast ``a`` in ``LESION_CONTRAST``, and a texture ``t = 1 + s * n`` of smooth noise ``n``
(in [-1, 1]) at strength ``s`` in ``LESION_TEXTURE``. Its centre lies inside the anatomy (where the anatomy is above
its own mean intensity), away from the border. The true mask, kept for evaluation only, is ``g >= 0.5`` (the half
maximum, radius ``1.18`` standard deviations). Every image then gets Gaussian noise of standard deviation
``IMAGE_NOISE``. Image label: 1 (abnormal) when a lesion was added, 0 (normal) otherwise; a normal case's mask is empty.
"""

from __future__ import annotations

import json
import numbers
import os
import pathlib
from functools import lru_cache

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.data.synthetic import create_test_image_2d

from ..io import atomic_write_text

__all__ = ["ANATOMIES", "make_weak_case", "write_weak_dataset"]

ANATOMIES = ("synthetic", "mni152")
"""What a case's lesion is pasted into: synthetic shapes, or axial slices of the MNI152 template (needs nilearn)."""
LESION_SIGMA = (0.04, 0.1)
"""Range of the lesion's standard deviation per axis, as a fraction of the image edge."""
LESION_CONTRAST = (0.4, 1.0)
"""Range of the lesion's peak added intensity (the anatomy is in [0, 1])."""
LESION_TEXTURE = (0.0, 0.5)
"""Range of the texture strength: the blob is modulated by ``1 + s * n``, ``n`` smooth noise in [-1, 1]."""
IMAGE_NOISE = 0.05
"""Standard deviation of the Gaussian noise added to every image."""
MIN_SIZE = 32


def make_weak_case(
    seed: int, index: int, *, size: int = 64, anatomy: str = "synthetic", lesion_probability: float = 0.65
) -> dict:
    """One case: image, image label and the true lesion mask (see the module docstring for the model).

    Args:
        seed: dataset seed, a non-negative integer.
        index: the case's index, a non-negative integer; ``(seed, index)`` fixes the case.
        size: image edge in pixels, at least 32.
        anatomy: ``"synthetic"`` or ``"mni152"`` (needs nilearn).
        lesion_probability: chance that the case gets a lesion, in [0, 1].

    Returns:
        The case, a dict with ``"image"`` (float32, ``(size, size)``), ``"mask"`` (uint8, ``(size, size)``),
        ``"label"`` (0 or 1), ``"contrast"`` and ``"sigma"`` (floats, 0 for a normal case; sigma is the mean of the two
        axes' pixels).

    Example:
        >>> case = make_weak_case(0, 4, size=32)
        >>> case["image"].shape, case["label"], int(case["mask"].sum()) > 0
        ((32, 32), 1, True)
    """
    for name, value in (("seed", seed), ("index", index)):
        if not _is_int(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}.")
    if not _is_int(size) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}.")
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}.")
    if not isinstance(lesion_probability, numbers.Real) or not 0 <= lesion_probability <= 1:
        raise ValueError(f"lesion_probability must be a number in [0, 1], got {lesion_probability!r}.")
    rng = np.random.default_rng([seed, index])
    image = _anatomy(anatomy, size, rng)
    mask = np.zeros((size, size), np.uint8)
    label, contrast, sigma = 0, 0.0, 0.0
    if rng.random() < lesion_probability:
        added, mask, contrast, sigma = _lesion(image, rng)
        image = image + added
        label = 1
    image = image + IMAGE_NOISE * rng.standard_normal(image.shape)
    return {"image": image.astype(np.float32), "mask": mask, "label": label, "contrast": contrast, "sigma": sigma}


def write_weak_dataset(
    root: str | os.PathLike,
    cases: int,
    *,
    size: int = 64,
    seed: int = 0,
    anatomy: str = "synthetic",
    lesion_probability: float = 0.65,
    prefix: str = "case",
) -> list[dict]:
    """Write ``cases`` cases of :func:`make_weak_case` as NIfTI files and a ``dataset.json`` under ``root``.

    Case ``i`` goes to ``{root}/images/{prefix}_{i:04d}.nii.gz`` (float32) and ``{root}/masks/{prefix}_{i:04d}.nii.gz``
    (uint8), each a 2D ``(size, size)`` array with an identity affine, so MONAI's ``LoadImaged(ensure_channel_first=
    True)`` reads them as ``(1, size, size)``. ``{root}/dataset.json`` lists under ``"training"`` one entry per case:
    ``{"image": "./images/...", "mask": "./masks/...", "label": 0 or 1}`` (``label`` is the image-level class, as
    MONAI's classification datalists name it; ``monai.data.load_decathlon_datalist(path, data_list_key="training")``
    resolves the paths). It is written atomically after all images; files of the same names are overwritten.

    Args:
        root: the dataset folder; created if missing.
        cases: number of cases, at least 1.
        size: image edge in pixels.
        seed: dataset seed: cases ``0 .. cases - 1`` of :func:`make_weak_case` with this seed.
        anatomy: ``"synthetic"`` or ``"mni152"``.
        lesion_probability: chance of a lesion per case.
        prefix: file name prefix: letters, digits, ``-`` and ``_``.

    Returns:
        one dict per case: absolute ``image`` and ``mask`` paths, ``label``, ``contrast``, ``sigma``.

    Example:
        >>> import tempfile
        >>> cases = write_weak_dataset(tempfile.mkdtemp(), 4, size=32)
        >>> [case["label"] for case in cases]
        [1, 1, 1, 0]
    """
    if not _is_int(cases) or cases < 1:
        raise ValueError(f"cases must be a positive integer, got {cases!r}.")
    if not isinstance(prefix, str) or not prefix or not all(c.isascii() and (c.isalnum() or c in "-_") for c in prefix):
        raise ValueError(f"prefix must be a non-empty string of letters, digits, '-' and '_', got {prefix!r}.")
    root = pathlib.Path(root).absolute()
    for folder in ("images", "masks"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    written, training = [], []
    for index in range(cases):
        case = make_weak_case(seed, index, size=size, anatomy=anatomy, lesion_probability=lesion_probability)
        name = f"{prefix}_{index:04d}.nii.gz"
        nib.save(nib.Nifti1Image(case["image"], np.eye(4)), root / "images" / name)
        nib.save(nib.Nifti1Image(case["mask"], np.eye(4)), root / "masks" / name)
        training.append({"image": f"./images/{name}", "mask": f"./masks/{name}", "label": case["label"]})
        written.append({"image": str(root / "images" / name), "mask": str(root / "masks" / name),
                        "label": case["label"], "contrast": case["contrast"], "sigma": case["sigma"]})
    description = {
        "name": "monai_protoseg weakly labelled lesions",
        "description": f"Gaussian-blob lesions in {anatomy} anatomy, {size}x{size}, lesion probability "
                       f"{lesion_probability}, seed {seed}; label = lesion present, masks for evaluation only",
        "tensorImageSize": "2D",
        "labels": {"0": "normal", "1": "abnormal"},
        "numTraining": len(training),
        "training": training,
    }
    atomic_write_text(root / "dataset.json", json.dumps(description, indent=2) + "\n")
    return written


def _anatomy(anatomy: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A ``(size, size)`` anatomy image in [0, 1]."""
    if anatomy == "synthetic":
        image, _ = create_test_image_2d(size, size, num_objs=int(rng.integers(3, 7)), rad_max=size // 6,
                                        rad_min=max(2, size // 16), noise_max=0.2,
                                        random_state=np.random.RandomState(int(rng.integers(2**31))))
        return image.astype(np.float64)
    slices = _mni152_slices(size)
    image = slices[int(rng.integers(len(slices)))]
    return image[:, ::-1].copy() if rng.random() < 0.5 else image.copy()


@lru_cache(maxsize=4)
def _mni152_slices(size: int) -> np.ndarray:
    """The MNI152 T1 template's axial slices (those with brain in at least a fifth of the image), ``size`` square."""
    from ..mni152 import mni152_axial_slices

    return mni152_axial_slices(size)["t1"].numpy().astype(np.float64)


def _lesion(image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """A lesion for ``image``: added intensity, true mask (uint8), peak contrast, mean sigma in pixels."""
    size = image.shape[0]
    sigma = rng.uniform(*LESION_SIGMA, size=2) * size
    margin = int(np.ceil(2 * sigma.max()))
    inside = np.zeros_like(image, dtype=bool)
    inside[margin:size - margin, margin:size - margin] = True
    candidates = np.argwhere(inside & (image > image.mean()))
    if len(candidates) == 0:
        candidates = np.argwhere(inside)
    centre = candidates[rng.integers(len(candidates))] + rng.uniform(-0.5, 0.5, size=2)
    angle = rng.uniform(0, np.pi)
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    offset_r, offset_c = rows - centre[0], cols - centre[1]
    along = np.cos(angle) * offset_r + np.sin(angle) * offset_c
    across = -np.sin(angle) * offset_r + np.cos(angle) * offset_c
    blob = np.exp(-0.5 * ((along / sigma[0]) ** 2 + (across / sigma[1]) ** 2))
    contrast = float(rng.uniform(*LESION_CONTRAST))
    texture = 1 + rng.uniform(*LESION_TEXTURE) * _smooth_noise(size, rng)
    return contrast * texture * blob, (blob >= 0.5).astype(np.uint8), contrast, float(sigma.mean())


def _smooth_noise(size: int, rng: np.random.Generator, cells: int = 8) -> np.ndarray:
    """Smooth noise in [-1, 1]: uniform noise on a ``cells`` grid, bilinearly upsampled to ``size``."""
    grid = torch.from_numpy(rng.uniform(-1, 1, size=(1, 1, cells, cells)))
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[0, 0].numpy()


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
