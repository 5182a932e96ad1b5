"""The authors' ``ProtoSeg`` module interface, for code ported from the paper's repository."""

from __future__ import annotations

import torch
from torch import nn

from .protoseg import _check_inputs, _Guide, _prepare_features, _prepare_guide, _prototype_logits, _prototypes
from .protoseg import _rescaled_sigmoid, _resize

__all__ = ["ProtoSeg"]


class ProtoSeg(nn.Module):
    """Two-prototype segmentation of features, with the interface and output of the authors' ``ProtoSeg.py``.

    ``forward(xfeat, pred, mask=None)`` returns ``(B, 2, *S)`` probabilities: channel 0 background, channel 1
    foreground, the softmax over the negative squared distances of each feature vector to the background and
    foreground prototypes (the ``pred``- and ``(1 - pred)``-weighted mean features, times ``mask`` where given).
    Binarise with ``argmax(dim=1)`` as the authors' README does. Channel 1 is :func:`~monai_protoseg.prototype_map`;
    the argmax is its binary map except at exact ties, which go to background.

    Unlike the functions of :mod:`monai_protoseg.protoseg`, ``mask`` may hold any finite weights (a soft tissue
    mask), as in the reference. Features may also be on a coarser grid than ``pred``; they are then treated as
    linearly interpolated to it.

    Args:
        ndims: the number of spatial dimensions (1, 2 or 3).

    Example:
        >>> pred = torch.zeros(1, 1, 16, 16); pred[..., 4:12, 4:12] = 1
        >>> out = ProtoSeg(2)(torch.cat([pred, 1 - pred], 1), pred)
        >>> out.shape, bool((out.argmax(dim=1, keepdim=True) == pred).all())
        (torch.Size([1, 2, 16, 16]), True)
    """

    def __init__(self, ndims: int) -> None:
        super().__init__()
        if ndims not in (1, 2, 3):
            raise ValueError(f"ndims must be 1, 2 or 3 (spatial dimensions), got {ndims!r}.")
        self.ndims = ndims

    def forward(self, xfeat: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Background and foreground probabilities.

        Args:
            xfeat: ``(B, C, *S_f)`` features, on the grid of ``pred`` (or coarser).
            pred: ``(B, 1, *S)`` soft foreground prediction in [0, 1].
            mask: optional ``(B, 1, *S)`` weights of the pixels that feed the prototypes (any finite values).

        Returns:
            ``(B, 2, *S)``: background, foreground; NaN for an image whose prototypes do not exist.

        Raises:
            ValueError: a shape does not fit ``ndims``, ``pred`` is outside [0, 1], or ``mask`` is not finite.
        """
        if xfeat.ndim != self.ndims + 2:
            raise ValueError(
                f"ProtoSeg({self.ndims}) needs xfeat of shape (B, C, {self.ndims} spatial dims), got "
                f"{tuple(xfeat.shape)}."
            )
        _check_inputs(xfeat, pred, mask)
        features, _, scale = _prepare_features(xfeat)
        prob = _prepare_guide(pred, None, None, features.dtype)[0]
        weights = None
        if mask is not None:
            weights = mask.as_subclass(torch.Tensor).to(features.dtype)
            if not torch.isfinite(weights).all():
                raise ValueError("mask must hold finite weights, got NaN or Inf values.")
        fg, bg = _prototypes(features, _Guide(prob, weights))
        logits = _resize(_prototype_logits(features, fg, bg, unit_wise=False), prob.shape[2:])
        foreground = _rescaled_sigmoid(logits, scale)
        return torch.cat([1 - foreground, foreground], dim=1)
