"""Weakly supervised lesion masks from a classifier and scores against the true masks (pure tensor math, no I/O).

Every method segments only the images the classifier labels abnormal; an image it labels normal gets an empty mask,
as a clinician would only look for the lesion of an image flagged abnormal. COIN's mask is ``|X - X_cf|``
thresholded and cleaned (:func:`~monai_protoseg.weak.coin.counterfactual_mask` in one call); a heatmap's mask is the
heatmap thresholded (Otsu per image, or a fixed threshold on the [0, 1] map), as in seed 003.

Scores, as seed 004 reports them and per image:

- ``iou``: intersection over union accumulated over the dataset, ``sum |P & T| / sum |P | T|`` over all cases;
- ``dice``: mean per-image Dice over the cases with a lesion (the Dice of a normal case is undefined);
- ``normal_false_positive``: fraction of the normal cases given a non-empty mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attribution.base import check_finite, check_inputs, errors_named
from .heatmaps import HEATMAP_METHODS, classifier_heatmaps
from .masks import _as_mask, clean_mask, threshold_maps

__all__ = [
    "METHOD_TITLES",
    "SUMMARY_COLUMNS",
    "CASE_COLUMNS",
    "FAITHFULNESS_COLUMNS",
    "classify",
    "method_maps",
    "maps_to_masks",
    "per_case_scores",
    "segmentation_scores",
]

METHOD_TITLES = {"coin": "COIN", "gradcam": "Grad-CAM", "scorecam": "Score-CAM", "layercam": "LayerCAM",
                 "rise": "RISE"}
"""Each method's name in tables and figures."""
SUMMARY_COLUMNS = ["method", "threshold", "iou", "dice", "normal_false_positive", "lesion_cases", "normal_cases",
                   "seconds_per_case"]
"""Columns of ``weak_segmentation.csv``: one row per method and threshold."""
CASE_COLUMNS = ["case", "method", "threshold", "image_label", "classified_abnormal", "true_pixels",
                "predicted_pixels", "intersection", "union", "dice"]
"""Columns of ``weak_cases.csv``: one row per case, method and threshold."""
FAITHFULNESS_COLUMNS = ["training_images", "test_images", "accuracy"]
"""Columns of ``faithfulness.csv``: the original classifier, then one retrained on each kind of filtered image."""


@torch.no_grad()
def classify(classifier: nn.Module, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The classifier's predicted class of each image, ``(B,)`` long, in eval mode (its mode restored).

    Args:
        classifier: ``(B, C, *S) -> (B, K)`` logits.
        images: ``(B, C, *S)``.
        batch_size: images per forward pass.

    Returns:
        ``(B,)`` class indices.
    """
    training = classifier.training
    classifier.eval()
    try:
        return torch.cat([classifier(images[first:first + batch_size]).argmax(1)
                          for first in range(0, len(images), batch_size)])
    finally:
        classifier.train(training)


def method_maps(
    method: str,
    images: torch.Tensor,
    classifier: nn.Module,
    *,
    generator: nn.Module | None = None,
    layers: Sequence[str] | None = None,
    abnormal_class: int = 1,
    normal_class: int = 0,
    batch_size: int = 16,
    **options,
) -> torch.Tensor:
    """The map a method's masks are thresholded from: ``|X - X_cf|`` for COIN, the heatmap in [0, 1] otherwise.

    Args:
        method: ``"coin"`` or a heatmap method (``"gradcam"``, ``"layercam"``, ``"scorecam"``, ``"rise"``).
        images: ``(B, C, *S)``, ``B >= 1``, finite.
        classifier: the image classifier ``(B, C, *S) -> (B, K)`` the heatmaps explain.
        generator: COIN's generator ``(images, target_class) -> counterfactuals`` (for ``"coin"``).
        layers: the classifier layers a heatmap method explains (not for COIN and RISE).
        abnormal_class: the class the heatmaps explain.
        normal_class: COIN's target class.
        batch_size: images per call of the method.
        options: further arguments of the heatmap method (``n_masks`` for RISE, ``max_channels`` for Score-CAM).

    Returns:
        ``(B, 1, *S)`` maps.

    Raises:
        ValueError: an unknown method, no generator for COIN, ``images`` not ``(B, C, *S)`` with ``B >= 1`` or not
            finite, counterfactuals not finite (the message names the method and the shape), or an error of the
            heatmap method.

    Example:
        >>> from monai_protoseg.weak import CoinGenerator
        >>> classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 32, 2))
        >>> generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
        >>> method_maps("coin", torch.rand(3, 1, 32, 32), classifier, generator=generator).shape
        torch.Size([3, 1, 32, 32])
    """
    if method != "coin" and method not in HEATMAP_METHODS:
        raise ValueError(f"method must be 'coin' or one of {sorted(HEATMAP_METHODS)}, got {method!r}.")
    if method == "coin" and generator is None:
        raise ValueError("method 'coin' needs the trained generator.")
    with errors_named(f"method_maps({method!r})"):
        check_inputs(images, "images")
    maps = []
    for first in range(0, len(images), batch_size):
        batch = images[first:first + batch_size]
        if method == "coin":
            with errors_named("method_maps('coin')"):
                maps.append(_difference_maps(generator, batch, normal_class))
        else:
            maps.append(classifier_heatmaps(classifier, batch, method, layers, abnormal_class, **options))
    return torch.cat(maps)


def maps_to_masks(
    maps: torch.Tensor,
    abnormal: torch.Tensor,
    threshold: str | float = "otsu",
    open_size: int = 1,
    close_size: int = 1,
    largest_component: bool = False,
) -> torch.Tensor:
    """Masks from maps: thresholded, cleaned (see :func:`~monai_protoseg.weak.masks.clean_mask`), and empty for the
    cases the classifier does not label abnormal.

    Args:
        maps: ``(B, 1, *S)`` from :func:`method_maps`.
        abnormal: ``(B,)`` bool, the cases the classifier labels abnormal (``classify(...) == abnormal_class``).
        threshold: ``"otsu"`` per case or a fixed threshold.
        open_size: opening's structuring element edge (1: none).
        close_size: closing's structuring element edge (1: none).
        largest_component: keep each mask's largest connected component.

    Returns:
        ``(B, 1, *S)`` bool.

    Example:
        >>> maps = torch.tensor([[[[0.1, 0.9]]], [[[0.8, 0.2]]]])
        >>> maps_to_masks(maps, torch.tensor([True, False]), threshold=0.5).flatten(1).tolist()
        [[False, True], [False, False]]
    """
    if abnormal.shape != maps.shape[:1]:
        raise ValueError(f"abnormal has shape {tuple(abnormal.shape)}; expected ({maps.shape[0]},), one flag per case "
                         f"of the maps {tuple(maps.shape)}.")
    masks = clean_mask(threshold_maps(maps, threshold), open_size, close_size, largest_component)
    return masks & abnormal.to(masks.device).reshape(-1, *(1,) * (masks.ndim - 1))


@torch.no_grad()
def _difference_maps(generator: nn.Module, images: torch.Tensor, normal_class: int) -> torch.Tensor:
    """``|X - G(X, normal)|`` summed over channels, in eval mode (the generator's mode restored); ValueError when the
    counterfactuals are not finite."""
    training = generator.training
    generator.eval()
    try:
        target = torch.full((images.shape[0],), normal_class, dtype=torch.long, device=images.device)
        counterfactuals = generator(images, target)
        check_finite(counterfactuals, "the generator's counterfactuals")
        return (images - counterfactuals).abs().sum(1, keepdim=True)
    finally:
        generator.train(training)


def per_case_scores(masks: torch.Tensor, truths: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-case overlap of predicted and true masks.

    Args:
        masks: ``(B, 1, *S)`` predicted, bool or 0/1, 1 to 3 spatial dims.
        truths: ``(B, 1, *S)`` true, bool or 0/1.

    Returns:
        ``{"intersection", "union", "predicted", "true"}`` voxel counts and ``"dice"`` (NaN where both are empty),
        each ``(B,)``.

    Raises:
        ValueError: shapes that differ or are not ``(B, 1, *S)``, or a value other than 0 and 1 (NaN included: it
            would count as foreground).

    Example:
        >>> masks = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 0]]])
        >>> per_case_scores(masks, torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]]]))["dice"]
        tensor([0.5000,    nan], dtype=torch.float64)
    """
    with errors_named("per_case_scores"):
        if masks.shape != truths.shape or masks.ndim < 3 or masks.shape[1] != 1:
            raise ValueError(f"masks {tuple(masks.shape)} and truths {tuple(truths.shape)} must both be (B, 1, *S).")
        masks, truths = _as_mask(masks, "masks").flatten(1), _as_mask(truths, "truths").flatten(1)
    counts = {
        "intersection": (masks & truths).sum(1),
        "union": (masks | truths).sum(1),
        "predicted": masks.sum(1),
        "true": truths.sum(1),
    }
    total = (counts["predicted"] + counts["true"]).double()
    counts["dice"] = torch.where(total > 0, 2 * counts["intersection"] / total.clamp(min=1), torch.nan)
    return counts


def segmentation_scores(masks: torch.Tensor, truths: torch.Tensor) -> dict[str, float]:
    """Dataset IoU, mean per-image Dice of the lesion cases, and the false-positive rate on normal cases.

    Args:
        masks: ``(B, 1, *S)`` predicted, bool or 0/1.
        truths: ``(B, 1, *S)`` true; a case with an empty truth is a normal case.

    Returns:
        ``{"iou", "dice", "normal_false_positive", "lesion_cases", "normal_cases"}``; a score with no case to
        average is NaN.

    Raises:
        ValueError: as :func:`per_case_scores`.

    Example:
        >>> masks = torch.tensor([[[1, 1, 0, 0]], [[0, 0, 0, 1]]])
        >>> scores = segmentation_scores(masks, torch.tensor([[[0, 1, 1, 0]], [[0, 0, 0, 0]]]))
        >>> scores["iou"], scores["dice"], scores["normal_false_positive"]
        (0.25, 0.5, 1.0)
    """
    counts = per_case_scores(masks, truths)
    lesion = counts["true"] > 0
    union = int(counts["union"].sum())
    return {
        "iou": int(counts["intersection"].sum()) / union if union else float("nan"),
        "dice": float(counts["dice"][lesion].mean()) if lesion.any() else float("nan"),
        "normal_false_positive": float((counts["predicted"][~lesion] > 0).double().mean()) if (~lesion).any()
        else float("nan"),
        "lesion_cases": int(lesion.sum()),
        "normal_cases": int((~lesion).sum()),
    }
