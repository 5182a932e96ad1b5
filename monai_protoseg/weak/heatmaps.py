"""Classifier heatmaps (seed 003): the attribution methods of :mod:`monai_protoseg.attribution` on an image classifier.

A classifier's output ``(B, K)`` is one score per class, not a map; :class:`ClassScoreMap` shows it to the attribution
methods as a segmentation of a single pixel, ``(B, K, 1, ..., 1)``, and the explained region is that pixel: the target
score is the class's logit (Grad-CAM, LayerCAM, Score-CAM) or probability (RISE), as for any classifier. Every map is
resized to the image and normalised to [0, 1] by the shared attribution base.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..attribution import RISE, GradCAM, LayerCAM, ScoreCAM, SegmentationAttribution
from ..attribution.base import check_finite, check_inputs, errors_named

__all__ = ["HEATMAP_METHODS", "ClassScoreMap", "classifier_heatmaps", "heatmap_filtered"]

HEATMAP_METHODS: dict[str, type[SegmentationAttribution]] = {
    "gradcam": GradCAM,
    "layercam": LayerCAM,
    "scorecam": ScoreCAM,
    "rise": RISE,
}
"""The classifier heatmap methods by name; RISE perturbs the input and records no layer."""


class ClassScoreMap(nn.Module):
    """A classifier seen as a one-pixel segmentation network: ``(B, K)`` logits become ``(B, K, 1, ..., 1)``.

    The classifier is held, not copied: its layers are ``"classifier." + name``.

    Args:
        classifier: ``(B, C, *S) -> (B, K)``.
        spatial_dims: the images' spatial dimensions.

    Example:
        >>> wrapped = ClassScoreMap(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), spatial_dims=2)
        >>> wrapped(torch.rand(3, 1, 4, 4)).shape
        torch.Size([3, 2, 1, 1])
    """

    def __init__(self, classifier: nn.Module, spatial_dims: int = 2) -> None:
        super().__init__()
        self.classifier = classifier
        self.spatial_dims = spatial_dims

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The class scores of ``images`` as ``(B, K, 1, ..., 1)``."""
        scores = self.classifier(images)
        if scores.ndim != 2:
            raise ValueError(f"the classifier must return (B, K) class scores, got shape {tuple(scores.shape)}.")
        return scores.reshape(*scores.shape, *(1,) * self.spatial_dims)


def classifier_heatmaps(
    classifier: nn.Module,
    images: torch.Tensor,
    method: str = "gradcam",
    layers: Sequence[str] | None = None,
    class_index: int = 1,
    **options,
) -> torch.Tensor:
    """Heatmaps of ``class_index`` for ``images`` by one method of :data:`HEATMAP_METHODS`.

    Args:
        classifier: ``(B, C, *S) -> (B, K)`` logits (softmax over the classes).
        images: ``(B, C, *S)``, ``B >= 1``, finite.
        method: ``"gradcam"``, ``"layercam"``, ``"scorecam"`` or ``"rise"``.
        layers: the classifier's layers to explain (names in ``classifier.named_modules()``), required by every
            method but RISE; several layers are combined with equal weights.
        class_index: the explained class (1: abnormal).
        options: further arguments of the method's class (for example ``n_masks`` for RISE).

    Returns:
        ``(B, 1, *S)`` heatmaps in [0, 1].

    Raises:
        ValueError: an unknown method, no layers for a method that needs them, ``images`` not ``(B, C, *S)`` with
            ``B >= 1`` or not finite (the message names the method and the shape), or an error of the method (see
            :class:`~monai_protoseg.attribution.SegmentationAttribution`).

    Example:
        >>> from monai.networks.nets import ResNet
        >>> classifier = ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 32], spatial_dims=2, n_input_channels=1,
        ...                     num_classes=2)
        >>> classifier_heatmaps(classifier, torch.rand(2, 1, 32, 32), "gradcam", ["layer3"]).shape
        torch.Size([2, 1, 32, 32])
    """
    if method not in HEATMAP_METHODS:
        raise ValueError(f"method must be one of {sorted(HEATMAP_METHODS)}, got {method!r}.")
    with errors_named(f"classifier_heatmaps({method!r})"):
        images = check_inputs(images, "images")
    spatial_dims = images.ndim - 2
    wrapped = ClassScoreMap(classifier, spatial_dims)
    region = torch.ones(images.shape[0], 1, *(1,) * spatial_dims, device=images.device)
    if method == "rise":
        explainer = RISE(wrapped, class_index=class_index, region=region, **options)
    else:
        if not layers:
            raise ValueError(f"{method} needs the classifier layers to explain, for example ['layer4'] for a MONAI "
                             f"ResNet; got {layers!r}.")
        explainer = HEATMAP_METHODS[method](wrapped, [f"classifier.{layer}" for layer in layers],
                                            class_index=class_index, region=region, **options)
    return explainer(images).map


def heatmap_filtered(images: torch.Tensor, heatmaps: torch.Tensor, keep: bool = True) -> torch.Tensor:
    """Images filtered by their heatmaps (seed 003's faithfulness check): ``X * H``, or ``X * (1 - H)``.

    Args:
        images: ``(B, C, *S)``, ``B >= 1``, finite.
        heatmaps: ``(B, 1, *S)`` in [0, 1].
        keep: True keeps what the heatmap highlights; False keeps the rest (its "dark regions").

    Returns:
        ``(B, C, *S)``.

    Raises:
        ValueError: ``images`` not finite, ``heatmaps`` of another shape, not finite or out of [0, 1] (a NaN
            heatmap would make a NaN training image).

    Example:
        >>> heatmap_filtered(torch.ones(1, 1, 2), torch.tensor([[[0.25, 1.0]]]), keep=False)
        tensor([[[0.7500, 0.0000]]])
    """
    with errors_named("heatmap_filtered"):
        check_inputs(images, "images")
        if heatmaps.shape[0] != images.shape[0] or heatmaps.shape[1] != 1 or heatmaps.shape[2:] != images.shape[2:]:
            raise ValueError(f"heatmaps of shape {tuple(heatmaps.shape)} do not fit images of shape "
                             f"{tuple(images.shape)}; expected (B, 1, *S).")
        check_finite(heatmaps, "heatmaps")
        if not bool(((heatmaps >= 0) & (heatmaps <= 1)).all()):
            raise ValueError(f"heatmaps of shape {tuple(heatmaps.shape)} must be in [0, 1], got values from "
                             f"{heatmaps.min().item()} to {heatmaps.max().item()}.")
    return images * (heatmaps if keep else 1 - heatmaps)
