"""Attribution for segmentation networks: which input region made the network segment this?

One shared base (:mod:`.base`: the target, the layers, hooks, upsample-normalise-combine) and one short module per
method. Every method explains the sum of one class's logit (or probability) over a region (the predicted mask by
default), on each chosen layer (default: the post-bottleneck decoder layers), in 2D and 3D.
"""

from .base import (
    AttributionResult,
    SegmentationAttribution,
    combine,
    decoder_layers,
    normalise,
    resize_to,
    target_region,
    target_score,
)
from .faithfulness import deletion_insertion, image_preserved, masked_prediction, prediction_preserved
from .figures import plot_attribution_maps
from .gradcam import GradCAM
from .gradcampp import GradCAMpp
from .kwc import KernelWeightedContribution
from .layercam import LayerCAM
from .rise import RISE, rise_masks
from .scorecam import ScoreCAM

__all__ = [
    "AttributionResult",
    "SegmentationAttribution",
    "combine",
    "decoder_layers",
    "normalise",
    "resize_to",
    "target_region",
    "target_score",
    "GradCAM",
    "GradCAMpp",
    "LayerCAM",
    "ScoreCAM",
    "RISE",
    "rise_masks",
    "KernelWeightedContribution",
    "prediction_preserved",
    "image_preserved",
    "masked_prediction",
    "deletion_insertion",
    "plot_attribution_maps",
]
