"""Score-CAM for segmentation: channel weights are the target score of the input masked by the channel."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationAttribution, normalise, resize_to

__all__ = ["ScoreCAM"]


class ScoreCAM(SegmentationAttribution):
    """Score-CAM (Wang et al., CVPR Workshops 2020) of the segmentation target, on every chosen layer; no gradients.

    Each channel ``A_k`` of a layer is resized to the input and min-max normalised to a mask ``H_k`` in [0, 1] (a
    constant channel gives an all-zero mask). Its weight is the paper's increase of confidence,
    ``w_k = s(X * H_k) - s(0)``: the target score of the masked input minus that of an all-zero input, both summed
    over the region fixed from the unmasked prediction (so masking cannot move the target). The paper's softmax of
    the weights over channels is not applied: a segmentation score is a sum over a region, in the thousands, and its
    softmax would keep one channel. The map is ``ReLU(sum_k w_k A_k)``. ``use="prob"`` bounds every score by the
    region's size; with ``use="logit"`` (the default) the scores are summed logits.

    The masked inputs are run without gradients, ``batch_size`` at a time (one forward pass per channel and case,
    plus one for the baseline); ``max_channels`` keeps only each case's channels of highest mean activation per
    layer (the others weigh 0) to bound the cost. Other arguments as in
    :class:`~monai_protoseg.attribution.SegmentationAttribution`.

    Args:
        batch_size: masked inputs per forward pass.
        max_channels: channels scored per layer and case; None: all.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
        >>> result = ScoreCAM(network, use="prob", batch_size=8, max_channels=4)(torch.rand(1, 1, 32, 32))
        >>> result.map.shape
        torch.Size([1, 1, 32, 32])
    """

    uses_gradients = False

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] | None = None,
        class_index: int = 1,
        region: str | torch.Tensor = "pred",
        use: str = "logit",
        activation: str | None = "softmax",
        weights: Mapping[str, float] | None = None,
        batch_size: int = 16,
        max_channels: int | None = None,
    ) -> None:
        super().__init__(network, layers, class_index, region, use, activation, weights)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if max_channels is not None and max_channels < 1:
            raise ValueError(f"max_channels must be at least 1 or None, got {max_channels}.")
        self.batch_size = batch_size
        self.max_channels = max_channels

    @torch.no_grad()
    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        batch = inputs.shape[0]
        baseline_output = self.network(torch.zeros_like(inputs[:1])).expand(batch, *output.shape[1:])
        baseline = self.score(baseline_output, region_mask)
        maps = {}
        for layer, activations in features.items():
            channels = activations.shape[1]
            if self.max_channels is not None and self.max_channels < channels:
                spatial_mean = activations.mean(tuple(range(2, activations.ndim)))
                selected = spatial_mean.topk(self.max_channels, dim=1).indices
            else:
                selected = torch.arange(channels, device=activations.device).expand(batch, channels)
            channel_weights = torch.zeros(activations.shape[:2], dtype=activations.dtype, device=activations.device)
            for case in range(batch):
                for chunk in selected[case].split(self.batch_size):
                    masks = normalise(resize_to(activations[case, chunk].unsqueeze(1), inputs.shape[2:]))
                    scores = self.score(self.network(inputs[case:case + 1] * masks),
                                        region_mask[case:case + 1].expand(len(chunk), *region_mask.shape[1:]))
                    channel_weights[case, chunk] = scores - baseline[case]
            channel_weights = channel_weights.reshape(*channel_weights.shape, *(1,) * (activations.ndim - 2))
            maps[layer] = F.relu((channel_weights * activations).sum(1, keepdim=True))
        return maps
