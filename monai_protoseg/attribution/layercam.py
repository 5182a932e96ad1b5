"""LayerCAM for segmentation: every activation weighted by its own positive gradient."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import SegmentationAttribution

__all__ = ["LayerCAM"]


class LayerCAM(SegmentationAttribution):
    """LayerCAM (Jiang et al., IEEE TIP 2021) of the segmentation target, on every chosen layer.

    Each layer's map is ``ReLU(sum_c ReLU(g_c) * A_c)``, position by position, with ``g`` the target score's gradient
    with respect to the layer's output ``A``. Takes the arguments of
    :class:`~monai_protoseg.attribution.SegmentationAttribution`.

    Example:
        >>> from monai.networks.nets import BasicUNet
        >>> network = BasicUNet(2, 1, 2, features=(4, 4, 8, 8, 16, 4))
        >>> result = LayerCAM(network)(torch.rand(1, 1, 32, 32))
        >>> list(result.layer_maps)
        ['upcat_4', 'upcat_3', 'upcat_2', 'upcat_1']
    """

    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        gradients = self.layer_gradients(output, features, region_mask)
        return {layer: F.relu((F.relu(gradient) * features[layer].detach()).sum(1, keepdim=True))
                for layer, gradient in gradients.items()}
