"""An inferer wrapper that also returns whole-image feature maps of the probed layers, sliding windows included."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep, fall_back_tuple

from .protoseg import prototype_map
from .recorder import FeatureRecorder

__all__ = ["ProtoSegInferer"]

_PREDICTION = ""  # the network's own module name; never a submodule's name


class ProtoSegInferer(Inferer):
    """Wrap any MONAI inferer so that one inference also yields the probed layers' features over the whole image.

    With a ``SlidingWindowInferer``, each layer's whole-image feature map is rebuilt at that layer's own resolution
    from the windows, blended exactly as the inferer blends the prediction (MONAI stitches every output of the
    predictor with the same importance map, resized to the output's scale). Otherwise the features come from the
    wrapped inferer's forward pass. The prediction returned is the wrapped inferer's, bit for bit.

    Args:
        inferer: the MONAI inferer to wrap.
        layers: qualified names of the layers to record (see :func:`~monai_protoseg.candidate_layers`).

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 1, channels=(4, 8), strides=(2,)).eval()
        >>> inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16), overlap=0.5), ["model.0"])
        >>> with torch.no_grad():
        ...     prediction = inferer(torch.rand(1, 1, 32, 48), network)
        >>> prediction.shape, inferer.features["model.0"].shape
        (torch.Size([1, 1, 32, 48]), torch.Size([1, 4, 16, 24]))
    """

    def __init__(self, inferer: Inferer, layers: Sequence[str]) -> None:
        super().__init__()
        if isinstance(inferer, SlidingWindowInferer) and getattr(inferer, "buffer_steps", None):
            raise ValueError(
                "ProtoSegInferer cannot wrap a SlidingWindowInferer with buffer_steps: MONAI's buffered stitching "
                "keeps only the first output of the predictor, so layer features would be lost."
            )
        self.inferer = inferer
        self.layers = list(layers)
        self.features: dict[str, torch.Tensor] = {}
        self.prediction: torch.Tensor | None = None

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped inferer and record the layers' features.

        Args:
            inputs: the input batch, as for the wrapped inferer.
            network: the network (an ``nn.Module``, whose submodules ``self.layers`` names).
            args, kwargs: passed on to the wrapped inferer.

        Returns:
            the wrapped inferer's prediction. ``self.features`` holds ``{layer: (B, C, *S_layer)}`` over the whole
            input and ``self.prediction`` the prediction.
        """
        # MONAI weights each window's outputs in place, and a layer's output may be the prediction tensor itself,
        # so windows are recorded as copies.
        sliding = isinstance(self.inferer, SlidingWindowInferer)
        recorder = FeatureRecorder(network, self.layers, clone=sliding)
        with recorder:
            if sliding:
                prediction, self.features = self._sliding_window(inputs, network, recorder, *args, **kwargs)
            else:
                prediction = self.inferer(inputs, network, *args, **kwargs)
                self.features = recorder.features
        self.prediction = prediction
        return prediction

    def _sliding_window(
        self, inputs: torch.Tensor, network: Callable[..., Any], recorder: FeatureRecorder, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Stitch the prediction and every layer's features with the wrapped sliding-window inferer.

        MONAI stitches the predictor's outputs in sorted key order and resizes its importance map in place for each
        output whose size differs from the window, so the keys put the prediction first and then the layers from the
        largest spatial size to the smallest: each resize then goes from a larger map to a smaller one.
        """
        keys: dict[str, str] = {}  # stitching key -> layer
        window_shapes: dict[str, torch.Size] = {}

        def predictor(window: torch.Tensor, *window_args: Any, **window_kwargs: Any) -> dict[str, torch.Tensor]:
            output = network(window, *window_args, **window_kwargs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"ProtoSegInferer needs a network that returns a tensor, got {type(output).__name__}.")
            features = recorder.features
            if not keys:
                by_size = sorted(features, key=lambda layer: -features[layer].shape[2:].numel())
                keys.update({f"{rank:04d}": layer for rank, layer in enumerate(by_size)})
                window_shapes.update({layer: features[layer].shape[2:] for layer in features})
            return {_PREDICTION: output, **{key: features[layer] for key, layer in keys.items()}}

        stitched = self.inferer(inputs, predictor, *args, **kwargs)
        self._check_alignment(inputs.shape[2:], window_shapes)
        features = {layer: stitched[key] for key, layer in keys.items()}
        return stitched[_PREDICTION], {layer: features[layer] for layer in self.layers if layer in features}

    def _check_alignment(self, image_size: Sequence[int], window_shapes: dict[str, torch.Size]) -> None:
        """Every window must start on a whole pixel of every layer, or the stitched features would be shifted."""
        roi_size = fall_back_tuple(self.inferer.roi_size, image_size)
        overlap = ensure_tuple_rep(self.inferer.overlap, len(image_size))
        for layer, window_shape in window_shapes.items():
            for axis, (image, roi, window, axis_overlap) in enumerate(zip(image_size, roi_size, window_shape, overlap)):
                if image <= roi:
                    continue  # one window along this axis
                scale = window / roi
                steps = [max(int(roi * (1 - axis_overlap)), 1), image - roi]
                if any(abs(step * scale - round(step * scale)) > 1e-6 for step in steps):
                    raise ValueError(
                        f"layer {layer!r} is at scale {scale:g} of the window along spatial axis {axis}; window steps "
                        f"{steps} (roi_size {roi}, overlap {axis_overlap}, image {image}) do not fall on its pixels. "
                        f"Choose roi_size, overlap and image size so that step x scale is an integer."
                    )

    def prototype_maps(
        self, prob: torch.Tensor, mask: torch.Tensor | None = None, *, unit_wise: bool = False
    ) -> dict[str, torch.Tensor]:
        """Prototype maps of every recorded layer over the whole image (see :func:`~monai_protoseg.prototype_map`).

        Args:
            prob: ``(B, 1, *S)`` foreground probability, e.g. from the returned prediction.
            mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
            unit_wise: one map per unit instead of one per layer.

        Returns:
            ``{layer: (B, 1 or C, *S)}``.
        """
        if not self.features:
            raise RuntimeError("ProtoSegInferer has no features yet: call it on an input first.")
        return {layer: prototype_map(features, prob, mask, unit_wise=unit_wise)
                for layer, features in self.features.items()}
