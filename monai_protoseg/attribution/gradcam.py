"""Grad-CAM for segmentation: channel weights are the spatial mean of the target score's gradients."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SegmentationAttribution

__all__ = ["GradCAM"]


class GradCAM(SegmentationAttribution):
    """Grad-CAM (Selvaraju et al., ICCV 2017) of the segmentation target, on every chosen layer.

    Each layer's map is ``ReLU(sum_c w_c A_c)``, with ``A_c`` the layer's channel ``c`` and ``w_c`` the spatial mean
    of the target score's gradient with respect to ``A_c``. The layers' maps are resized, normalised and combined as
    described in :class:`~monai_protoseg.attribution.SegmentationAttribution`, whose arguments it takes.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
        >>> result = GradCAM(network)(torch.rand(2, 1, 32, 32))  # the decoder layers, the predicted region
        >>> result.map.shape, result.layer_maps["model.1.submodule.2"].shape
        (torch.Size([2, 1, 32, 32]), torch.Size([2, 1, 16, 16]))
    """

    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        gradients = self.layer_gradients(output, features, region_mask)
        maps = {}
        for layer, gradient in gradients.items():
            weights = gradient.mean(dim=tuple(range(2, gradient.ndim)), keepdim=True)
            maps[layer] = F.relu((weights * features[layer].detach()).sum(1, keepdim=True))
        return maps
