"""Grad-CAM++ for segmentation: channel weights from the closed-form alphas of the gradients' powers."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SegmentationAttribution

__all__ = ["GradCAMpp"]

EPSILON = 1e-6
"""Added to the alphas' denominator, as pytorch-grad-cam does."""


class GradCAMpp(SegmentationAttribution):
    """Grad-CAM++ (Chattopadhay et al., WACV 2018) of the segmentation target, on every chosen layer.

    With ``g`` the target score's gradient with respect to a layer's output ``A`` (channel ``c``, position ``i``),
    ``alpha_ci = g_ci^2 / (2 g_ci^2 + (sum_j A_cj) g_ci^3 + 1e-6)`` (0 where ``g_ci = 0``), the closed form of the
    paper's equation 19 as pytorch-grad-cam computes it; ``w_c = sum_i alpha_ci ReLU(g_ci)`` and the map is
    ``ReLU(sum_c w_c A_c)``. Takes the arguments of :class:`~monai_protoseg.attribution.SegmentationAttribution`.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))
        >>> GradCAMpp(network)(torch.rand(1, 1, 16, 16, 16)).map.shape
        torch.Size([1, 1, 16, 16, 16])
    """

    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        gradients = self.layer_gradients(output, features, region_mask)
        maps = {}
        for layer, gradient in gradients.items():
            activations = features[layer].detach()
            spatial = tuple(range(2, gradient.ndim))
            squared = gradient**2
            alphas = squared / (2 * squared + activations.sum(spatial, keepdim=True) * squared * gradient + EPSILON)
            alphas = torch.where(gradient != 0, alphas, 0)
            weights = (alphas * F.relu(gradient)).sum(spatial, keepdim=True)
            maps[layer] = F.relu((weights * activations).sum(1, keepdim=True))
        return maps
