"""Seeded synthetic 2D segmentation cases of graded difficulty, for the demo bundle, the benchmarks and notebooks.

A case's anatomy is MONAI's ``create_test_image_2d``: random circles (the label: foreground > 0) of intensity 0.5 to
1 over faint uniform background noise, fixed by its source seed. This is the clean image (difficulty 0). One
degradation, scaled by a difficulty in [0, 1], then makes it harder to segment: additive Gaussian noise, Gaussian
blur, a smooth multiplicative bias field, or a fading foreground-background contrast. The label never changes, so
cases that share a source seed can be grouped (and kept on one side of a validation / test split). The random pattern
of a degradation (noise field, bias field, fill values) depends only on the source seed and the degradation; only its
strength grows with the difficulty, so image quality falls monotonically with difficulty.

The strengths at difficulty 1 are set so that a small UNet trained on difficulties up to 0.2 goes from a Dice near 1
on clean images to about 0.3 (contrast) to 0.7 (bias) at difficulty 1 (``benchmarks/bench_quality.py``).

Pure numpy and MONAI's data helpers (no torch, no ignite); ``write_dataset`` saves NIfTI files with nibabel and a
Medical Segmentation Decathlon style ``dataset.json``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import pathlib
from collections.abc import Sequence

import nibabel as nib
import numpy as np
from monai.data.synthetic import create_test_image_2d

from .io import atomic_write_text

__all__ = ["DEGRADATIONS", "MIN_SIZE", "case_plan", "make_case", "write_dataset"]

DEGRADATIONS = ("noise", "blur", "bias", "contrast")
"""The degradations ``make_case`` applies; with ``degradation=None`` source seed ``s`` gets ``DEGRADATIONS[s % 4]``."""

MIN_SIZE = 16
"""Smallest image edge ``make_case`` accepts (room for circles of a few pixels' radius)."""

BACKGROUND_NOISE = 0.2
"""``noise_max`` of ``create_test_image_2d``: the clean background is uniform noise in [0, 0.2) of the raw intensities,
which MONAI then rescales so that the brightest circle is 1 (the background stays below 0.4, the circles above 0.5)."""

NOISE_STD = 3.0
"""Standard deviation of the additive Gaussian noise at difficulty 1 (foreground intensities are in [0.5, 1])."""

BLUR_SIGMA = 0.25
"""Gaussian blur sigma at difficulty 1, as a fraction of the image edge (16 pixels for 64 x 64)."""

BIAS_RANGE = 64.0
"""Multiplicative bias at difficulty 1 spans ``[1 / BIAS_RANGE, BIAS_RANGE]`` over the image."""

CONTRAST_EXPONENT = 3
"""At difficulty ``d`` the foreground keeps ``(1 - d) ** CONTRAST_EXPONENT`` of its contrast: a segmentation network
copes with faint contrast until very little is left, so a linear fade would leave nearly all cases easy."""

_SEED_LIMIT = 2**32  # numpy.random.RandomState accepts seeds in [0, 2**32)


def make_case(
    seed: int, size: int = 64, difficulty: float = 0.0, degradation: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic case: random circles from source ``seed``, degraded by ``degradation`` at ``difficulty``.

    The degradations, with ``d = difficulty``:

    - ``"noise"``: additive Gaussian noise of standard deviation ``d * NOISE_STD``;
    - ``"blur"``: Gaussian blur of sigma ``d * BLUR_SIGMA * size`` pixels (reflected borders);
    - ``"bias"``: multiplication by ``BIAS_RANGE ** (d * field)``, ``field`` a smooth random quadratic surface with
      maximum absolute value 1;
    - ``"contrast"``: each foreground pixel becomes ``k * value + (1 - k) * fill`` with ``k = (1 - d) **
      CONTRAST_EXPONENT`` and ``fill`` drawn from the image's own background pixels, so the foreground-background
      contrast shrinks to 0 and at ``d = 1`` the circles are background.

    Args:
        seed: source seed in [0, 2**32); it alone fixes the circles (the label), and the random pattern of the noise
            and bias fields.
        size: edge of the square image in pixels, at least ``MIN_SIZE``.
        difficulty: strength of the degradation in [0, 1]; 0 gives the clean image.
        degradation: one of ``DEGRADATIONS``, or ``None`` for ``DEGRADATIONS[seed % len(DEGRADATIONS)]``.

    Returns:
        ``(image, label)``: the image ``(1, size, size)`` float32 and the label ``(1, size, size)`` uint8 in {0, 1}.

    Raises:
        ValueError: an argument has the wrong type or is out of range (the message names it).

    Example:
        >>> image, label = make_case(seed=3, size=32, difficulty=0.5, degradation="noise")
        >>> image.shape, image.dtype, label.shape, label.dtype
        ((1, 32, 32), dtype('float32'), (1, 32, 32), dtype('uint8'))
        >>> clean, same_label = make_case(seed=3, size=32)
        >>> bool((label == same_label).all())  # the same circles whatever the degradation
        True
        >>> bool(clean[label == 0].max() < 0.4 < 0.5 < clean[label == 1].min())  # clean: faint background noise
        True
    """
    seed, size = _check_seed(seed), _check_size(size)
    difficulty = _check_difficulty(difficulty, "difficulty")
    if degradation is None:
        degradation = DEGRADATIONS[seed % len(DEGRADATIONS)]
    elif degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be None or one of {DEGRADATIONS}, got {degradation!r}.")

    rad_min = max(2, size // 16)
    image, labels = create_test_image_2d(
        size,
        size,
        num_objs=max(3, size // 10),
        rad_max=max(rad_min + 1, size // 5),
        rad_min=rad_min,
        noise_max=BACKGROUND_NOISE,
        num_seg_classes=1,
        random_state=np.random.RandomState(seed),
    )
    label = (labels > 0).astype(np.uint8)

    if difficulty > 0:
        rng = np.random.default_rng([seed, DEGRADATIONS.index(degradation)])
        image = _degrade(image, label, degradation, difficulty, rng)
    return image[None].astype(np.float32), label[None]


def case_plan(cases: int, *, seed: int = 0, difficulties: Sequence[float] = (0.0,)) -> list[dict]:
    """Which source seed, difficulty and degradation each of ``cases`` cases gets (as ``write_dataset`` writes them).

    Case ``i`` comes from source seed ``seed + i // len(difficulties)`` at difficulty
    ``difficulties[i % len(difficulties)]``: each source image appears at every difficulty in turn, always with its
    own degradation ``DEGRADATIONS[source % 4]``, so consecutive sources cycle through the four degradations.

    Args:
        cases: number of cases, at least 1.
        seed: source seed of the first case, >= 0.
        difficulties: the difficulty levels in [0, 1], at least one; the default gives clean cases, one per source.

    Returns:
        One dict per case: ``{"source": int, "difficulty": float, "degradation": str}``.

    Raises:
        ValueError: an argument has the wrong type or is out of range (the message names it).

    Example:
        >>> [tuple(c.values()) for c in case_plan(4, seed=10, difficulties=(0.0, 0.5))]
        [(10, 0.0, 'bias'), (10, 0.5, 'bias'), (11, 0.0, 'contrast'), (11, 0.5, 'contrast')]
    """
    if not _is_int(cases) or cases < 1:
        raise ValueError(f"cases must be an integer >= 1, got {cases!r}.")
    seed = _check_seed(seed)
    if isinstance(difficulties, (str, bytes)) or not isinstance(difficulties, Sequence) or not difficulties:
        raise ValueError(f"difficulties must be a non-empty sequence of numbers in [0, 1], got {difficulties!r}.")
    levels = [_check_difficulty(d, "difficulties") for d in difficulties]
    plan = []
    for i in range(cases):
        source = _check_seed(seed + i // len(levels))
        plan.append(
            {
                "source": source,
                "difficulty": levels[i % len(levels)],
                "degradation": DEGRADATIONS[source % len(DEGRADATIONS)],
            }
        )
    return plan


def write_dataset(
    root: str | os.PathLike,
    cases: int,
    *,
    size: int = 64,
    seed: int = 0,
    difficulties: Sequence[float] = (0.0,),
    prefix: str = "case",
) -> list[dict]:
    """Write ``cases`` synthetic cases as NIfTI files with a Decathlon-style ``dataset.json`` under ``root``.

    The cases are those of ``case_plan(cases, seed=seed, difficulties=difficulties)``. Case ``i`` goes to
    ``{root}/imagesTr/{prefix}_{i:03d}.nii.gz`` (float32) and ``{root}/labelsTr/{prefix}_{i:03d}.nii.gz`` (uint8),
    each a 2D ``(size, size)`` array with an identity affine, so MONAI's
    ``LoadImaged(keys=["image", "label"], ensure_channel_first=True)`` reads them back as ``(1, size, size)``.
    ``{root}/dataset.json`` lists them under ``"training"`` with relative paths (``"./imagesTr/..."``), as
    ``monai.data.load_decathlon_datalist`` expects; it is written atomically, after all the images. Existing files
    of the same names are overwritten.

    Args:
        root: the dataset folder; created if missing.
        cases: number of cases, at least 1.
        size: image edge in pixels, at least ``MIN_SIZE``.
        seed: source seed of the first case.
        difficulties: the difficulty levels, used in turn for each source (see ``case_plan``).
        prefix: file name prefix: letters, digits, ``-`` and ``_``.

    Returns:
        One dict per case: ``{"image": absolute path, "label": absolute path, "source": source seed,
        "difficulty": float, "degradation": str}``.

    Raises:
        ValueError: an argument has the wrong type or is out of range (the message names it).

    Example:
        >>> import tempfile
        >>> from monai.data import load_decathlon_datalist
        >>> root = tempfile.mkdtemp()
        >>> cases = write_dataset(root, 4, size=32, difficulties=(0.0, 1.0))
        >>> [(c["source"], c["difficulty"], c["degradation"]) for c in cases]
        [(0, 0.0, 'noise'), (0, 1.0, 'noise'), (1, 0.0, 'blur'), (1, 1.0, 'blur')]
        >>> load_decathlon_datalist(f"{root}/dataset.json")[3]["label"] == cases[3]["label"]
        True
    """
    if not isinstance(prefix, str) or not prefix or not all(c.isascii() and (c.isalnum() or c in "-_") for c in prefix):
        raise ValueError(f"prefix must be a non-empty string of letters, digits, '-' and '_', got {prefix!r}.")
    size = _check_size(size)
    plan = case_plan(cases, seed=seed, difficulties=difficulties)
    root = pathlib.Path(root).absolute()
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    written, training = [], []
    for i, spec in enumerate(plan):
        image, label = make_case(spec["source"], size, spec["difficulty"], spec["degradation"])
        name = f"{prefix}_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(image[0], np.eye(4)), root / "imagesTr" / name)
        nib.save(nib.Nifti1Image(label[0], np.eye(4)), root / "labelsTr" / name)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        written.append({"image": str(root / "imagesTr" / name), "label": str(root / "labelsTr" / name), **spec})
    description = {
        "name": "monai_protoseg synthetic",
        "description": f"random circles (monai.data.create_test_image_2d), {size}x{size}, graded degradations",
        "tensorImageSize": "2D",
        "modality": {"0": "synthetic"},
        "labels": {"0": "background", "1": "foreground"},
        "numTraining": len(training),
        "numTest": 0,
        "training": training,
        "test": [],
    }
    atomic_write_text(root / "dataset.json", json.dumps(description, indent=2) + "\n")
    return written


def _degrade(
    image: np.ndarray, label: np.ndarray, degradation: str, difficulty: float, rng: np.random.Generator
) -> np.ndarray:
    """``image`` degraded by ``degradation`` at ``difficulty`` (see ``make_case``), drawing from ``rng``."""
    if degradation == "noise":
        return image + difficulty * NOISE_STD * rng.standard_normal(image.shape)
    if degradation == "blur":
        return _gaussian_blur(image, difficulty * BLUR_SIGMA * image.shape[0])
    if degradation == "bias":
        return image * BIAS_RANGE ** (difficulty * _smooth_field(image.shape[0], rng))
    kept = (1 - difficulty) ** CONTRAST_EXPONENT  # contrast
    fill = rng.choice(image[label == 0], size=image.shape)
    return np.where(label == 1, kept * image + (1 - kept) * fill, image)


def _gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of a 2D array with reflected borders (kernel truncated at 3 sigma)."""
    radius = math.ceil(3 * sigma)
    offsets = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        padding = [(radius, radius) if a == axis else (0, 0) for a in (0, 1)]
        padded = np.pad(image, padding, mode="reflect")
        image = np.lib.stride_tricks.sliding_window_view(padded, kernel.size, axis=axis) @ kernel
    return image


def _smooth_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """A random quadratic surface over the image, scaled to a maximum absolute value of 1."""
    y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    field = np.tensordot(rng.standard_normal(5), np.stack([x, y, x * x, y * y, x * y]), axes=1)
    return field / np.abs(field).max()


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_seed(seed: object) -> int:
    if not _is_int(seed) or not 0 <= seed < _SEED_LIMIT:
        raise ValueError(f"seed must be an integer in [0, 2**32), got {seed!r}.")
    return int(seed)


def _check_size(size: object) -> int:
    if not _is_int(size) or size < MIN_SIZE:
        raise ValueError(f"size must be an integer >= {MIN_SIZE}, got {size!r}.")
    return int(size)


def _check_difficulty(value: object, name: str) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}.")
    return float(value)
