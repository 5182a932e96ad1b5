"""Kernel-Weighted Contribution: decoder kernels weighted by the prediction lost without them and kept by them alone."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .base import SegmentationAttribution
from ..recorder import resolve_layers

__all__ = ["KernelWeightedContribution"]


class KernelWeightedContribution(SegmentationAttribution):
    """Kernel-Weighted Contribution (Visual attribution for deep learning segmentation in medical imaging, SPIE
    Medical Imaging 2022) of the segmentation target, on every chosen layer; no gradients.

    A layer's kernel ``k`` is its output channel ``A_k``. With ``s`` the target score (the class probability summed
    over the region fixed from the unmasked prediction) and ``s_full`` its value for the unmodified network:

    - dependent contribution ``d_k = (s_full - s(A_k = 0)) / s_full``: the fraction of the prediction lost when
      kernel ``k`` is emptied;
    - independent contribution ``i_k = s(A_j = 0 for all j != k) / s_full``: the fraction kept when only ``k``
      remains of the layer;
    - the layer's map ``sum_k max((d_k + i_k) / 2, 0) * ReLU(A_k)``: the kernels' activations weighted by both
      contributions (a kernel whose removal raises the prediction and which alone keeps nothing weighs 0).

    Both contributions are 0 when ``s_full`` is 0 (for an empty region the maps are then NaN, undefined, as for every
    method). The layers' maps are resized, normalised and combined as in
    :class:`~monai_protoseg.attribution.SegmentationAttribution`. Kernels are emptied by
    a forward hook that multiplies the layer's output channels by 0 or 1, never by editing weights: each forward
    pass runs ``batch_size`` copies of one case, each copy with its own kernel emptied (or kept alone), two copies per
    kernel. ``max_kernels`` keeps only each case's kernels of highest mean positive activation per layer (the others
    weigh 0: their ``ReLU(A_k)`` is smallest), to bound the cost at ``2 * max_kernels`` forward copies per layer and
    case. The hooks come off when the call returns or raises. The score always uses probabilities (``use="prob"``),
    so contributions are fractions of the prediction; other arguments as in the base class.

    Args:
        batch_size: network copies per forward pass.
        max_kernels: kernels probed per layer and case; None: all.

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2))
        >>> result = KernelWeightedContribution(network, max_kernels=2, batch_size=8)(torch.rand(1, 1, 32, 32))
        >>> result.map.shape, result.layer_maps["model.1.submodule.2"].shape
        (torch.Size([1, 1, 32, 32]), torch.Size([1, 1, 16, 16]))
    """

    uses_gradients = False

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] | None = None,
        class_index: int = 1,
        region: str | torch.Tensor = "pred",
        activation: str | None = "softmax",
        weights: Mapping[str, float] | None = None,
        batch_size: int = 16,
        max_kernels: int | None = 16,
    ) -> None:
        super().__init__(network, layers, class_index, region, "prob", activation, weights)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
        if max_kernels is not None and max_kernels < 1:
            raise ValueError(f"max_kernels must be at least 1 or None, got {max_kernels}.")
        self.batch_size = batch_size
        self.max_kernels = max_kernels

    @torch.no_grad()
    def layer_maps(
        self, inputs: torch.Tensor, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        full = self.score(output, region_mask)
        weights = {layer: torch.zeros(activations.shape[:2], dtype=full.dtype, device=full.device)
                   for layer, activations in features.items()}
        keep: dict[str, torch.Tensor] = {}  # the channel multipliers of the forward pass under way, by layer
        handles = [module.register_forward_hook(_channel_gate(layer, keep))
                   for layer, module in resolve_layers(self.network, self.layers).items()]
        try:
            for case in range(inputs.shape[0]):
                variants = [(layer, int(kernel), alone) for layer, activations in features.items()
                            for kernel in self._kernels(activations[case]) for alone in (False, True)]
                for first in range(0, len(variants), self.batch_size):
                    chunk = variants[first:first + self.batch_size]
                    keep.clear()
                    for copy, (layer, kernel, alone) in enumerate(chunk):
                        gates = keep.setdefault(layer, inputs.new_ones(len(chunk), features[layer].shape[1]))
                        gates[copy] = 0.0 if alone else 1.0
                        gates[copy, kernel] = 1.0 if alone else 0.0
                    copies = inputs[case:case + 1].expand(len(chunk), *inputs.shape[1:])
                    scores = self.score(self.network(copies),
                                        region_mask[case:case + 1].expand(len(chunk), *region_mask.shape[1:]))
                    for (layer, kernel, alone), score in zip(chunk, scores):
                        contribution = score if alone else full[case] - score  # i_k or d_k, times s_full
                        weights[layer][case, kernel] += contribution / 2
        finally:
            keep.clear()
            for handle in handles:
                handle.remove()
        maps = {}
        for layer, activations in features.items():
            kernel_weights = torch.where(full[:, None] > 0, weights[layer] / full[:, None], 0).clamp(min=0)
            kernel_weights = kernel_weights.reshape(*kernel_weights.shape, *(1,) * (activations.ndim - 2))
            maps[layer] = (kernel_weights * F.relu(activations)).sum(1, keepdim=True)
        return maps

    def _kernels(self, activations: torch.Tensor) -> torch.Tensor:
        """The probed kernels of one case's ``(C, *s)`` layer output: the ``max_kernels`` of highest mean ReLU."""
        channels = activations.shape[0]
        if self.max_kernels is None or self.max_kernels >= channels:
            return torch.arange(channels)
        return F.relu(activations).flatten(1).mean(1).topk(self.max_kernels).indices


def _channel_gate(layer: str, keep: dict[str, torch.Tensor]):
    """A forward hook multiplying the layer's output channels by ``keep[layer]`` (``(B, C)``), when it is set."""

    def gate(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        gates = keep.get(layer)
        if gates is None:
            return None
        if not isinstance(output, torch.Tensor) or output.shape[:2] != gates.shape:
            shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
            raise ValueError(f"layer {layer!r} gave {shape}; KernelWeightedContribution needs a (B, C, *s) tensor "
                             f"with B, C = {tuple(gates.shape)}.")
        return output * gates.reshape(*gates.shape, *(1,) * (output.ndim - 2)).to(output.dtype)

    return gate
