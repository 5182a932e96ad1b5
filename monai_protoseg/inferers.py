"""An inferer wrapper that also gives the probed layers' ProtoSeg over the whole image, sliding windows included:
from stitched whole-image features, or streamed over the windows without them."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from monai.inferers import Inferer, SlidingWindowInferer
from monai.utils import ensure_tuple_rep, fall_back_tuple

from . import protoseg
from .protoseg import _layer_logits, _rescaled_sigmoid, _resize, prototype_map
from .recorder import FeatureRecorder
from .streaming import ShapeRecorder, WindowSource, sa_scores_from_logits, stitched_bytes, streamed_prototype_logits

__all__ = ["ProtoSegInferer", "DEFAULT_MEMORY_BUDGET"]

_PREDICTION = ""  # the network's own module name; never a submodule's name

MODES = ("stitch", "stream", "auto")
"""How :class:`ProtoSegInferer` gets a sliding window's ProtoSeg: from stitched features, streamed, or chosen."""

DEFAULT_MEMORY_BUDGET = 2 * 2**30
"""Bytes of stitched features above which ``mode="auto"`` streams: 2 GiB."""

logger = logging.getLogger(__name__)


class ProtoSegInferer(Inferer):
    """Wrap any MONAI inferer so that one inference also yields the probed layers' ProtoSeg over the whole image.

    With a ``SlidingWindowInferer``, ``mode`` says how:

    - ``"stitch"``: each layer's whole-image feature map is rebuilt at that layer's own resolution from the windows,
      blended exactly as the inferer blends the prediction (MONAI stitches every output of the predictor with the
      same importance map, resized to the output's scale), and kept in ``features``. It costs channels x voxels at
      the layer's scale per layer (about 14 GB for a pancreas CT with ten layers).
    - ``"stream"``: no feature map is built. The call runs the plain sliding window (recording only the first
      window's output shapes) and keeps references to rerun its windows; :meth:`prototype_logits` (and the maps and
      scores on top of it) then runs the windows twice, under the call's autocast and with the network's forward
      hooks suspended: once to accumulate each layer's prototype sums ``(B, 2K, C)``, once to blend each layer's
      one-channel-per-class prototype logits exactly as MONAI blends outputs (:mod:`monai_protoseg.streaming`). The
      results equal those of stitched features to rounding. Extra memory does not grow with the channels: per layer
      ``(B, K, *S_layer)`` logits, per layer scale the ``(B, 2K)`` prototype weights moved there, plus one window
      batch's activations; the time is about three sliding windows. The network must stay unchanged (weights, eval
      mode) until those passes ran.
    - ``"auto"``: stream when the stitched features would exceed ``memory_budget`` bytes, else stitch. The estimate
      comes from the first window (recorded as stitching records it): the sum over layers of ``B x C x`` voxels of
      the layer's padded whole-image grid, times the inputs' element size (MONAI stitches in their dtype). The choice
      is logged (INFO) when it changes.

    Otherwise (another inferer) the features come from the wrapped inferer's forward pass. The prediction returned
    is the wrapped inferer's, bit for bit, in every mode.

    Args:
        inferer: the MONAI inferer to wrap.
        layers: qualified names of the layers to record (see :func:`~monai_protoseg.candidate_layers`).
        mode: ``"stitch"``, ``"stream"`` (a ``SlidingWindowInferer`` only) or ``"auto"``.
        memory_budget: bytes of stitched features above which ``"auto"`` streams; default
            :data:`DEFAULT_MEMORY_BUDGET` (2 GiB).

    Attributes:
        features: stitching, ``{layer: (B, C, *S_layer)}`` of the last call; empty streaming.
        prediction: the last call's prediction.
        streamed: whether the last call streamed.
        logit_scales: ``{layer: (B,)}`` of the last :meth:`prototype_logits` (see there).

    Example:
        >>> from monai.networks.nets import UNet
        >>> network = UNet(2, 1, 1, channels=(4, 8), strides=(2,)).eval()
        >>> inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16), overlap=0.5), ["model.0"])
        >>> with torch.no_grad():
        ...     prediction = inferer(torch.rand(1, 1, 32, 48), network)
        >>> prediction.shape, inferer.features["model.0"].shape
        (torch.Size([1, 1, 32, 48]), torch.Size([1, 4, 16, 24]))
    """

    def __init__(
        self,
        inferer: Inferer,
        layers: Sequence[str],
        *,
        mode: str = "stitch",
        memory_budget: float = DEFAULT_MEMORY_BUDGET,
    ) -> None:
        super().__init__()
        sliding = isinstance(inferer, SlidingWindowInferer)
        if sliding and getattr(inferer, "buffer_steps", None):
            raise ValueError(
                "ProtoSegInferer cannot wrap a SlidingWindowInferer with buffer_steps: MONAI's buffered stitching "
                "keeps only the first output of the predictor, so layer features would be lost."
            )
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
        if mode == "stream" and not sliding:
            raise ValueError(f"mode='stream' reruns the windows of a SlidingWindowInferer, got "
                             f"{type(inferer).__name__}; use mode='stitch' (its features come from one forward pass).")
        if isinstance(memory_budget, bool) or not isinstance(memory_budget, (int, float)) or not (
                0 < memory_budget < math.inf):
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
        self.inferer = inferer
        self.layers = list(layers)
        self.mode = mode
        self.memory_budget = memory_budget
        self.features: dict[str, torch.Tensor] = {}
        self.prediction: torch.Tensor | None = None
        self.streamed = False
        self.logit_scales: dict[str, torch.Tensor] = {}
        self._source: WindowSource | None = None
        self._auto_streams: bool | None = None  # the last choice of mode="auto", logged when it changes

    def __call__(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped inferer and record the layers' features.

        Args:
            inputs: the input batch, as for the wrapped inferer.
            network: the network (an ``nn.Module``, whose submodules ``self.layers`` names).
            args, kwargs: passed on to the wrapped inferer.

        Returns:
            the wrapped inferer's prediction, kept in ``self.prediction``. Stitching, ``self.features`` holds
            ``{layer: (B, C, *S_layer)}`` over the whole input; streaming (``self.streamed``), it is empty and
            :meth:`prototype_logits` reruns the windows.
        """
        self.features, self.prediction, self.logit_scales, self._source = {}, None, {}, None
        if isinstance(self.inferer, SlidingWindowInferer):
            prediction = self._sliding_window(inputs, network, *args, **kwargs)
        else:
            with FeatureRecorder(network, self.layers) as recorder:
                prediction = self.inferer(inputs, network, *args, **kwargs)
            self.features, self.streamed = recorder.features, False
        self.prediction = prediction
        return prediction

    def _sliding_window(self, inputs: torch.Tensor, network: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run the wrapped sliding-window inferer: stitch the prediction and every layer's features, or (streaming)
        the prediction alone, keeping what reruns the windows in ``self._source``.

        MONAI stitches the predictor's outputs in sorted key order and resizes its importance map in place for each
        output whose size differs from the window, so the keys put the prediction first and then the layers from the
        largest spatial size to the smallest: each resize then goes from a larger map to a smaller one. The first
        window is always recorded: it gives the layers' shapes, and the choice of ``mode="auto"``.
        """
        # MONAI weights each window's outputs in place, and a layer's output may be the prediction tensor itself,
        # so windows are recorded as copies; mode="stream" records only the first window's shapes.
        recorder = FeatureRecorder(network, self.layers, clone=True)
        shapes = ShapeRecorder(network, self.layers)
        keys: dict[str, str] = {}  # stitching key -> layer
        first: dict[str, Any] = {}  # of the first window: the prediction's size, the layers' shapes and dtypes

        def predictor(window: torch.Tensor, *window_args: Any, **window_kwargs: Any) -> Any:
            if first:
                recording = contextlib.nullcontext() if self.streamed else recorder
            else:
                recording = contextlib.nullcontext() if self.mode == "stream" else recorder
            with recording, shapes if not first else contextlib.nullcontext():
                output = network(window, *window_args, **window_kwargs)
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"ProtoSegInferer needs a network that returns a tensor, got {type(output).__name__}.")
            features = recorder.features if recording is recorder else {}
            if not first:
                found = shapes.outputs
                by_size = sorted(found, key=lambda layer: -found[layer][0][1:].numel())
                keys.update({f"{rank:04d}": layer for rank, layer in enumerate(by_size)})
                first.update(size=output.shape[2:], shapes={layer: found[layer][0] for layer in by_size},
                             dtypes={layer: found[layer][1] for layer in by_size}, output_layers=shapes.outputs_of(output))
                self.streamed = self._streams(inputs, first["shapes"])
            if self.streamed:
                return output
            return {_PREDICTION: output, **{key: features[layer] for key, layer in keys.items()}}

        stitched = self.inferer(inputs, predictor, *args, **kwargs)
        self._check_alignment(inputs.shape[2:], {layer: shape[1:] for layer, shape in first["shapes"].items()})
        if self.streamed:
            self._source = WindowSource(self.inferer, inputs, network, args, kwargs, first["size"], first["shapes"],
                                        first["dtypes"], _autocast_state(self.inferer.sw_device or inputs.device),
                                        stitched, first["output_layers"])
            return stitched
        features = {layer: stitched[key] for key, layer in keys.items()}
        self.features = {layer: features[layer] for layer in self.layers if layer in features}
        return stitched[_PREDICTION]

    def _streams(self, inputs: torch.Tensor, shapes: dict[str, torch.Size]) -> bool:
        """Whether this call streams: by ``mode``, or for ``"auto"`` by the estimated size of the stitched features
        (logged when the choice changes)."""
        if self.mode != "auto":
            return self.mode == "stream"
        estimate = stitched_bytes(self.inferer, inputs, shapes)
        streams = estimate > self.memory_budget
        if streams != self._auto_streams:
            logger.info(f"ProtoSegInferer(mode='auto'): the stitched features of {len(shapes)} layers would take "
                        f"{estimate / 2**30:.3g} GiB, {'over' if streams else 'within'} the memory budget of "
                        f"{self.memory_budget / 2**30:.3g} GiB: {'streaming' if streams else 'stitching'}.")
            self._auto_streams = streams
        return streams

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

    def prototype_logits(self, prob: torch.Tensor, mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Prototype logits of every recorded layer over the whole image, at the layer's own resolution.

        ``_resize(logits, S) > 0`` is the layer's binary ProtoSeg map, and ``sigmoid(_resize(logits, S) *
        self.logit_scales[layer]**2)`` its prototype map: the logits are ``-||f - c_fg||^2 + ||f - c_bg||^2`` of the
        features divided by a power of two per image (``logit_scales``, set by this call), so that they neither
        overflow nor underflow. Stitching, they come from ``self.features``; streaming, from two passes over the
        windows of the last call (see the class).

        Args:
            prob: ``(B, K, *S)`` foreground probability of each of ``K`` classes (one-vs-rest) in [0, 1], computed
                from the returned prediction.
            mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.

        Returns:
            ``{layer: (B, K, *S_layer)}``, float32 (float64 for float64 features); NaN for an image and class whose
            prototypes do not exist.

        Raises:
            RuntimeError: the inferer has not been called yet.
            TypeError: ``prob`` or ``mask`` is not a tensor.
            ValueError: a shape, batch size, device or value is wrong; the message names the argument (and the layer).
        """
        if self._source is not None:
            logits, self.logit_scales = streamed_prototype_logits(self._source, prob, mask)
            return {layer: logits[layer] for layer in self.layers if layer in logits}
        features = self._recorded_features()
        if not isinstance(prob, torch.Tensor):
            raise TypeError(f"prob must be a torch.Tensor, got {type(prob).__name__}.")
        with torch.no_grad():  # prob and mask are checked and weighted once per dtype
            layers = _layer_logits(features, prob, mask)
        self.logit_scales = {layer: scale for layer, (_, _, _, scale) in layers.items()}
        return {layer: logits for layer, (logits, _, _, _) in layers.items()}

    def prototype_maps(
        self, prob: torch.Tensor, mask: torch.Tensor | None = None, *, unit_wise: bool = False
    ) -> dict[str, torch.Tensor]:
        """Prototype maps of every recorded layer over the whole image (see :func:`~monai_protoseg.prototype_map`).

        Args:
            prob: ``(B, K, *S)`` foreground probability of each of ``K`` classes, e.g. from the returned prediction
                (``K = 1`` unit-wise).
            mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
            unit_wise: one map per unit instead of one per layer (stitching only).

        Returns:
            ``{layer: (B, K, *S)}``, unit-wise ``{layer: (B, C, *S)}``.

        Raises:
            ValueError: ``unit_wise`` while streaming, or as :meth:`prototype_logits`.
        """
        if unit_wise:
            if self._source is not None:
                raise ValueError("unit_wise maps need every channel's map over the whole image, which streaming does "
                                 "not build; use mode='stitch' for unit-wise maps.")
            return {layer: prototype_map(features, prob, mask, unit_wise=True)
                    for layer, features in self._recorded_features().items()}
        return {layer: _rescaled_sigmoid(_resize(logits, prob.shape[2:]), self.logit_scales[layer])
                for layer, logits in self.prototype_logits(prob, mask).items()}

    def sa_scores(
        self,
        prob: torch.Tensor,
        target: torch.Tensor | Sequence[torch.Tensor],
        mask: torch.Tensor | None = None,
        *,
        ignore_empty: bool = True,
    ) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        """Layer-wise SA scores of every recorded layer over the whole image (see :func:`~monai_protoseg.sa_scores`).

        Args:
            prob: ``(B, K, *S)`` foreground probability of each of ``K`` classes, in [0, 1].
            target: binary ``(B, K, *S)`` reference of each class, or a sequence of such references (e.g. the ground
                truth and the network's own prediction).
            mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.
            ignore_empty: empty-target rule of :func:`~monai_protoseg.sa_score`.

        Returns:
            ``{layer: (B, K)}`` for one target, one such dict per target for a sequence; NaN where a prototype does
            not exist.
        """
        if self._source is None:
            return protoseg.sa_scores(self._recorded_features(), prob, target, mask, ignore_empty=ignore_empty)
        return sa_scores_from_logits(self.prototype_logits(prob, mask), target, ignore_empty=ignore_empty)

    def _recorded_features(self) -> dict[str, torch.Tensor]:
        """``self.features``, which a call must have filled."""
        if not self.features:
            raise RuntimeError("ProtoSegInferer has no features yet: call it on an input first.")
        return self.features


def _autocast_state(device: torch.device | str) -> tuple[str, bool, torch.dtype]:
    """``(device type, enabled, dtype)`` of autocast now, for the windows' device."""
    device_type = torch.device(device).type
    return device_type, torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
