"""Streaming ProtoSeg over sliding windows: every probed layer's prototype logits over the whole image, blended as a
``SlidingWindowInferer`` blends its outputs, without ever building a layer's whole-image C-channel features.

MONAI stitches a layer's features at the layer's own scale as ``F(p) = sum_w imp_w(p) f_w(p) / count(p)``: ``f_w`` the
window's features, ``imp_w`` the importance map resized to the layer's scale and placed on the window, ``count`` the
sum of the windows' importance at ``p``. ProtoSeg needs two things of ``F``, both linear in it:

- the prototypes' weighted sums ``sum_p W(p) F(p) = sum_w sum_p [W(p) / count(p)] imp_w(p) f_w(p)``, ``W`` the weights
  ``prob`` and ``1 - prob`` (times the mask) moved to the layer's grid by the transpose of the interpolation: a first
  pass over the windows accumulates them, ``(B, 2K, C)`` per layer;
- the prototype logits ``delta . F - offset = sum_w imp_w (delta . f_w - offset) / count`` (the blending weights at a
  pixel sum to one): a second pass blends each window's one-channel-per-class logits exactly as MONAI blends outputs.

The windows, their batches, the padding, the importance maps (MONAI resizes the map from one output's size to the
next, in its stitching order), the window positions and count maps at each layer's scale and the final crop are
MONAI's (``monai.inferers.utils.sliding_window_inference``, unbuffered). Each image's features are translated by the
mean of its first window's features (float32 sums then keep the features' spread, as ``_prepare_features`` does with
the image mean), window sums are accumulated in float64, and the logits are divided by a power of two per image (the
scale ``_rescaled_sigmoid`` takes) so that they neither overflow nor underflow.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from monai.data.utils import compute_importance_map, dense_patch_slices, get_valid_patch_size
from monai.inferers import SlidingWindowInferer
from monai.inferers.utils import _get_scan_interval
from monai.utils import (
    PytorchPadMode,
    convert_data_type,
    ensure_tuple,
    ensure_tuple_rep,
    fall_back_tuple,
    look_up_option,
)
from torch import nn

from .protoseg import _count, _map_scores, _prepare_guide, _resize_transpose
from .recorder import forward_hooks_suspended, resolve_layers

__all__ = ["WindowSource", "ShapeRecorder", "streamed_prototype_logits", "sa_scores_from_logits", "stitched_bytes",
           "CHUNK_ELEMENTS"]

CHUNK_ELEMENTS = 2**18
"""A window's features are translated, weighted and turned into logits in blocks of rows of at most this many elements
(1 MiB of float32), so the extra memory of streaming grows neither with the layers' channels nor with the window."""

_MONAI_CALL_KEYWORDS = ("device", "buffer_steps", "buffer_dim")
"""Keyword arguments that ``SlidingWindowInferer.__call__`` takes for itself and never passes to the network."""


@dataclass
class WindowSource:
    """What a streaming :class:`~monai_protoseg.ProtoSegInferer` keeps of its sliding-window call to run the same
    windows again: references and the shapes of one window's outputs, no feature map.

    Args:
        inferer: the wrapped sliding-window inferer.
        inputs: the input batch (a reference, not a copy).
        network: the network.
        args: positional arguments the network was given after the window.
        kwargs: keyword arguments given to the inferer (MONAI's own and ``condition`` are set apart on use).
        prediction_size: spatial size of the network's output for one window.
        layers: ``{layer: (C, *window size at the layer's scale)}`` in MONAI's stitching order: from the largest
            window size to the smallest, ties in forward order (see ``ProtoSegInferer._sliding_window``).
        dtypes: each layer's output dtype.
        autocast: ``(device type, enabled, dtype)`` of the call, restored when the windows run again.
        prediction: the call's stitched prediction ``(B, C, *S)``.
        output_layers: the layers whose output is the network's output itself (the same tensor, unchanged after the
            layer ran, in the first window): their stitched features are the prediction, so their logits are made
            from it instead of being blended over the windows.
    """

    inferer: SlidingWindowInferer
    inputs: torch.Tensor
    network: nn.Module
    args: tuple
    kwargs: dict[str, Any]
    prediction_size: torch.Size
    layers: dict[str, torch.Size]
    dtypes: dict[str, torch.dtype]
    autocast: tuple[str, bool, torch.dtype]
    prediction: torch.Tensor
    output_layers: frozenset[str] = frozenset()


class ShapeRecorder:
    """Context manager that records the output shapes and dtypes of named layers in a forward pass, and no tensor:
    what streaming needs of the first window (hooks on entry, always removed on exit), and which layers' output is the
    network's output (:meth:`outputs_of`).

    Args:
        network: the network.
        layers: qualified submodule names (see :func:`~monai_protoseg.resolve_layers`).
    """

    def __init__(self, network: nn.Module, layers: Sequence[str]) -> None:
        self.modules = resolve_layers(network, layers)
        self.outputs: dict[str, tuple[torch.Size, torch.dtype]] = {}  # (C, *S) and dtype of each layer that ran
        self._returned: dict[str, tuple[weakref.ref, int]] = {}  # each layer's output (weakly) and its version
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ShapeRecorder:
        self.outputs.clear()
        self._returned.clear()
        self._handles = [module.register_forward_hook(self._hook(layer)) for layer, module in self.modules.items()]
        return self

    def __exit__(self, *exc_info: object) -> None:
        while self._handles:
            self._handles.pop().remove()

    def _hook(self, layer: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(f"layer {layer!r} ({type(module).__name__}) returned {type(output).__name__}, not a "
                                f"tensor; record one of its submodules instead.")
            self.outputs.pop(layer, None)  # a layer that runs twice counts where it ran last, as FeatureRecorder
            self.outputs[layer] = output.shape[1:], output.dtype
            self._returned[layer] = weakref.ref(output), output._version

        return record

    def outputs_of(self, output: torch.Tensor) -> frozenset[str]:
        """The layers whose recorded output is ``output`` itself (the same tensor object), not changed in place since
        the layer returned it."""
        return frozenset(layer for layer, (reference, version) in self._returned.items()
                         if reference() is output and output._version == version)


def stitched_bytes(
    inferer: SlidingWindowInferer, inputs: torch.Tensor, layers: Mapping[str, Sequence[int]]
) -> int:
    """Bytes of the stitched whole-image features of ``layers`` for ``inputs``, as MONAI allocates them.

    Args:
        inferer: the sliding-window inferer.
        inputs: the input batch ``(B, C_in, *S)``.
        layers: ``{layer: (C, *window size at the layer's scale)}``, from one window.

    Returns:
        the sum over layers of ``B x C x`` the voxels of the layer's padded whole-image grid, times the bytes of the
        inputs' dtype (MONAI stitches in it).
    """
    image_size = tuple(inputs.shape[2:])
    roi_size = fall_back_tuple(inferer.roi_size, image_size)
    padded = [max(image, roi) for image, roi in zip(image_size, roi_size)]
    total = 0
    for channels, *window in layers.values():
        total += channels * math.prod(int(p * w / r) for p, w, r in zip(padded, window, roi_size))
    return inputs.shape[0] * total * inputs.element_size()


@dataclass
class _LayerGrid:
    """One layer's share of the sliding-window geometry, at the layer's scale.

    Args:
        importance: ``(1, 1, *window)`` importance map, in the inputs' dtype on the windows' device.
        slices: each window's position on the padded grid.
        grid: the padded whole-image grid.
        crop: the slices that remove the padding (MONAI's), or None without padding.
    """

    importance: torch.Tensor
    slices: list[tuple[slice, ...]]
    grid: tuple[int, ...]
    crop: tuple[slice, ...] | None

    @property
    def size(self) -> tuple[int, ...]:
        """The layer's whole-image grid: the padded grid, cropped."""
        if self.crop is None:
            return self.grid
        return tuple(len(range(*axis.indices(n))) for axis, n in zip(self.crop, self.grid))

    def count(self, device: torch.device) -> torch.Tensor:
        """``(1, 1, *grid)`` sum of the windows' importance at each pixel, as MONAI accumulates it (made on demand:
        streaming needs it only before and after its passes)."""
        count = torch.zeros((1, 1, *self.grid), dtype=self.importance.dtype, device=device)
        importance = self.importance.to(device)
        for window_slices in self.slices:
            count[(slice(None), slice(None), *window_slices)] += importance
        return count


class _WindowGrid:
    """MONAI's sliding-window geometry for one input: the padding, the windows and their batches, and each layer's
    :class:`_LayerGrid` (layers with the same window size and importance map share one).

    Args:
        source: the call to rerun.
    """

    def __init__(self, source: WindowSource) -> None:
        inferer, inputs = source.inferer, source.inputs
        spatial_dims = inputs.ndim - 2
        image_size = tuple(inputs.shape[2:])
        self.roi_size = fall_back_tuple(inferer.roi_size, image_size)
        padded = tuple(max(image, roi) for image, roi in zip(image_size, self.roi_size))
        self.pad_size: list[int] = []  # F.pad order: the last axis first
        for axis in reversed(range(spatial_dims)):
            difference = max(self.roi_size[axis] - image_size[axis], 0)
            self.pad_size += [difference // 2, difference - difference // 2]
        overlap = ensure_tuple_rep(inferer.overlap, spatial_dims)
        self.slices = dense_patch_slices(padded, self.roi_size,
                                         _get_scan_interval(padded, self.roi_size, spatial_dims, overlap))
        self.sw_device = torch.device(inferer.sw_device or inputs.device)
        weight = self._importance_map(inferer, padded, inputs.dtype)
        self.layers: dict[str, _LayerGrid] = {}
        shared: list[_LayerGrid] = []
        outputs = [("", source.prediction_size), *((layer, shape[1:]) for layer, shape in source.layers.items())]
        for name, window in outputs:
            if tuple(window) != self.roi_size:  # MONAI resizes the map it used last, as each output needs
                weight = F.interpolate(weight, tuple(window), mode="nearest-exact")
            if not name:
                self.prediction_importance = weight  # the map MONAI blends the prediction with
                continue
            same = [grid for grid in shared if grid.importance.shape == weight.shape
                    and torch.equal(grid.importance, weight.to(grid.importance.device))]
            if same:
                self.layers[name] = same[0]
            else:
                shared.append(self._layer_grid(weight, padded, image_size))
                self.layers[name] = shared[-1]

    def _importance_map(
        self, inferer: SlidingWindowInferer, padded: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """The window's importance map ``(1, 1, *roi_size)`` on the windows' device, as ``sliding_window_inference``
        makes it."""
        valid_size = get_valid_patch_size(padded, self.roi_size)
        if valid_size == self.roi_size and inferer.roi_weight_map is not None:
            importance = inferer.roi_weight_map
        else:
            importance = compute_importance_map(ensure_tuple(valid_size), mode=inferer.mode,
                                                sigma_scale=inferer.sigma_scale, device=self.sw_device, dtype=dtype)
        importance = convert_data_type(importance, torch.Tensor, device=self.sw_device, dtype=dtype)[0]
        return importance.view(1, 1, *importance.shape[-len(padded):])

    def _layer_grid(
        self, importance: torch.Tensor, padded: tuple[int, ...], image_size: tuple[int, ...]
    ) -> _LayerGrid:
        """The geometry at the scale of a layer whose window importance map is ``importance``."""
        window = tuple(importance.shape[2:])
        importance = importance.to(self.sw_device)
        if window == self.roi_size:
            grid, slices = padded, list(self.slices)
        else:
            zoom = [w / float(r) for w, r in zip(window, self.roi_size)]
            grid = tuple(int(p * z) for p, z in zip(padded, zoom))
            slices = [tuple(slice(int(s.start * z), int(s.stop * z)) for s, z in zip(window_slices, zoom))
                      for window_slices in self.slices]
        crop = None
        if any(self.pad_size):  # MONAI's crop, its zoom taken from the padded grid over the window
            zoom = [g / r for g, r in zip(grid, self.roi_size)]
            crop = tuple(slice(int(round(self.pad_size[2 * (len(grid) - 1 - axis)] * zoom[axis])),
                               int(round((self.pad_size[2 * (len(grid) - 1 - axis)] + image_size[axis]) * zoom[axis])))
                         for axis in range(len(grid)))
        return _LayerGrid(importance, slices, grid, crop)

    def batches(self, images: int, sw_batch_size: int) -> Iterator[tuple[list[int], list[int]]]:
        """The window batches of ``sliding_window_inference``: each batch's images and window indices."""
        windows = len(self.slices)
        total = windows * images
        for start in range(0, total, sw_batch_size):
            indices = range(start, min(start + sw_batch_size, total))
            yield [index // windows for index in indices], [index % windows for index in indices]


_Consumer = Callable[[str, torch.Tensor, list[int], list[int]], None]
"""Takes a layer's output for one window batch, with the batch's images and window indices."""


def _run_windows(source: WindowSource, grid: _WindowGrid, consume: _Consumer) -> None:
    """Run the network on every window batch as ``sliding_window_inference`` does, without gradients and under the
    call's autocast, and hand each probed layer's output to ``consume`` as the layer returns it.

    The network's own forward hooks are suspended (no recorder sees these passes); the padding is MONAI's.

    Raises:
        RuntimeError: a layer does not run exactly once per window batch, or returns another shape than it did.
    """
    inferer = source.inferer
    pad_mode = look_up_option(inferer.padding_mode, PytorchPadMode)
    kwargs = {key: value for key, value in source.kwargs.items() if key not in _MONAI_CALL_KEYWORDS}
    condition = kwargs.pop("condition", None)
    inputs = convert_data_type(source.inputs, torch.Tensor)[0]
    if any(grid.pad_size):
        inputs = F.pad(inputs, pad=grid.pad_size, mode=pad_mode, value=inferer.cval)
        if condition is not None:
            condition = F.pad(condition, pad=grid.pad_size, mode=pad_mode, value=inferer.cval)
    batch: dict[str, list[int]] = {}
    ran: set[str] = set()

    def hook_of(layer: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if layer in ran:
                raise RuntimeError(f"layer {layer!r} ran more than once in one forward pass; streaming needs layers "
                                   f"that run once (or mode='stitch', which keeps the last output).")
            if not isinstance(output, torch.Tensor) or output.shape[1:] != source.layers[layer]:
                raise RuntimeError(f"layer {layer!r} returned {getattr(output, 'shape', type(output).__name__)} for "
                                   f"a window batch, not (N, {tuple(source.layers[layer])}) as in the call.")
            ran.add(layer)
            consume(layer, output.detach(), batch["images"], batch["windows"])

        return hook

    device_type, enabled, dtype = source.autocast
    with (forward_hooks_suspended(source.network), torch.no_grad(),
          torch.autocast(device_type, dtype=dtype, enabled=enabled)):
        modules = resolve_layers(source.network, list(source.layers))
        handles = [module.register_forward_hook(hook_of(layer)) for layer, module in modules.items()]
        try:
            for images, windows in grid.batches(inputs.shape[0], inferer.sw_batch_size):
                coordinates = [[slice(image, image + 1), slice(None), *grid.slices[window]]
                               for image, window in zip(images, windows)]
                window_data = torch.cat([inputs[tuple(c)] for c in coordinates]).to(grid.sw_device)
                if condition is not None:
                    kwargs["condition"] = torch.cat([condition[tuple(c)] for c in coordinates]).to(grid.sw_device)
                batch.update(images=images, windows=windows)
                ran.clear()
                leading = (coordinates,) if inferer.with_coord else ()
                source.network(window_data, *leading, *source.args, **kwargs)
                missing = [layer for layer in source.layers if layer not in ran]
                if missing:
                    raise RuntimeError(f"layers {missing} did not run on a window batch, though they ran in the call.")
        finally:
            for handle in handles:
                handle.remove()


def _feature_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype ProtoSeg computes a layer in: float64 for float64 features, else float32 (as ``_prepare_features``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class _LayerState:
    """One layer's streamed quantities, on the windows' device: everything is ``(B, ., C)`` or smaller.

    Each image's features are translated by a reference, the mean of its first window's features, so float32 sums
    keep the features' spread instead of their magnitude (as ``_prepare_features`` translates by the image mean).
    A window's features are translated a block of rows at a time (:data:`CHUNK_ELEMENTS`).

    Args:
        channels: the layer's channels ``C``.
        guide_totals: ``(B, 2K, 1)`` total weights of the guide: a prototype does not exist where its total is zero.
        dtype: the dtype the layer is computed in.
        device: the windows' device.
    """

    def __init__(self, channels: int, guide_totals: torch.Tensor, dtype: torch.dtype, device: torch.device) -> None:
        batch, classes = guide_totals.shape[0], guide_totals.shape[1] // 2
        self.guide_totals = guide_totals
        self.dtype = dtype
        self.reference = torch.zeros(batch, channels, dtype=dtype, device=device)
        self.referenced = [False] * batch
        self.sums = torch.zeros(batch, 2 * classes, channels, dtype=torch.float64, device=device)
        self.totals = torch.zeros(batch, 2 * classes, dtype=torch.float64, device=device)
        self.largest = torch.zeros(batch, dtype=torch.float64, device=device)  # of |f - reference|; NaN propagates
        self.coefficients: torch.Tensor | None = None  # (B, K, C): delta / scale**2
        self.offsets: torch.Tensor | None = None  # (B, K, 1): delta . middle / scale**2, middle from the reference

    def blocks(
        self, features: torch.Tensor, image: int, slices: tuple[slice, ...]
    ) -> Iterator[tuple[slice, tuple[slice, ...], torch.Tensor]]:
        """One window's ``(C, *window)`` features minus the reference of its image (set here if it has none), in
        blocks of rows along the first spatial axis, each at most :data:`CHUNK_ELEMENTS` (with ``2K`` channels for
        the weights, if more than ``C``).

        Args:
            features: the window's features.
            image: the window's image.
            slices: the window's position on the layer's padded grid.

        Yields:
            ``(rows, position, block)``: the block's rows in the window, its position on the padded grid, and the
            translated features ``(C, rows x the other axes)`` in ``dtype``.
        """
        if not self.referenced[image]:
            self.reference[image] = features.flatten(1).mean(1, dtype=self.dtype)
            self.referenced[image] = True
        plane = features[0, 0].numel()
        step = max(1, CHUNK_ELEMENTS // (max(features.shape[0], self.sums.shape[1]) * plane))
        for start in range(0, features.shape[1], step):
            rows = slice(start, min(start + step, features.shape[1]))
            position = (slice(slices[0].start + rows.start, slices[0].start + rows.stop), *slices[1:])
            block = features[:, rows].flatten(1).to(self.dtype) - self.reference[image, :, None]
            yield rows, position, block

    def finish(self) -> torch.Tensor:
        """The logit coefficients from the accumulated sums; returns each image's power-of-two scale ``(B,)``.

        Raises:
            ValueError: the features contain NaN or Inf values.
        """
        if not torch.isfinite(self.largest).all():
            raise ValueError("features contain NaN or Inf values.")
        means = self.sums / self.totals[..., None]
        means = means.masked_fill(self.guide_totals.to(means.device) == 0, float("nan"))  # no prototype: as protoseg
        fg, bg = means.chunk(2, dim=1)
        exponent = torch.frexp(self.largest).exponent - 1
        scale = torch.where(self.largest > 0, torch.ldexp(torch.ones_like(self.largest), exponent),
                            torch.ones_like(self.largest))
        delta = 2 * (fg - bg) / scale.view(-1, 1, 1) / scale.view(-1, 1, 1)
        self.coefficients = delta.to(self.dtype)
        self.offsets = (delta * (fg + bg) / 2).sum(-1, keepdim=True).to(self.dtype)
        return scale


def streamed_prototype_logits(
    source: WindowSource, prob: torch.Tensor, mask: torch.Tensor | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Prototype logits of every layer of ``source`` over the whole image, from two passes over its windows.

    They equal (to rounding) those of the layers' stitched features: ``_resize(logits, S) > 0`` is the binary
    ProtoSeg map and ``sigmoid(_resize(logits, S) * scale**2)`` the prototype map (``_rescaled_sigmoid``).

    Args:
        source: the sliding-window call to rerun.
        prob: ``(B, K, *S)`` foreground probability of each of ``K`` classes, in [0, 1].
        mask: optional binary ``(B, 1, *S)`` mask restricting the pixels that feed the prototypes.

    Returns:
        ``(logits, scales)``: ``{layer: (B, K, *S_layer)}`` in float32 (float64 for float64 features), on ``prob``'s
        device, NaN for an image and class whose prototypes do not exist; and ``{layer: (B,)}`` each image's
        power-of-two scale of the features.

    Raises:
        TypeError: ``prob`` or ``mask`` is not a tensor.
        ValueError: ``prob`` or ``mask`` has a wrong shape, batch size, device or value; the features contain NaN or
            Inf values (the message names the layer).
        RuntimeError: a layer does not run once per window batch as it did in the call.
    """
    _check_guide(prob, mask, source.inputs)
    device = prob.device
    grid = _WindowGrid(source)
    sw_device = grid.sw_device
    states, blend_weights = _guided_states(source, grid, prob, mask)

    def accumulate(layer: str, features: torch.Tensor, images: list[int], windows: list[int]) -> None:
        """Add each window's weighted feature sums: its share of the weights, ``W / count x importance``, times its
        features."""
        state, layer_grid = states[layer], grid.layers[layer]
        weights = blend_weights[(id(layer_grid), state.dtype)]
        for window_features, image, window in zip(features, images, windows):
            for rows, position, block in state.blocks(window_features, image, layer_grid.slices[window]):
                share = weights[(image, slice(None), *position)].to(sw_device) * layer_grid.importance[0, :, rows]
                share = share.flatten(1)  # (2K, rows x the other axes)
                block_largest = torch.maximum(block.amax(), -block.amin())  # NaN propagates
                state.largest[image] = torch.maximum(state.largest[image], block_largest.double())
                state.totals[image] += share.sum(1).double()
                state.sums[image] += (share @ block.T).double()

    _run_windows(source, grid, accumulate)
    blend_weights.clear()  # the full-size weights go before the logits come
    scales = {}
    for layer, state in states.items():
        try:
            scales[layer] = state.finish().to(device)
        except ValueError as error:
            raise ValueError(f"layer {layer!r}: {error}") from error
    prediction = source.prediction.as_subclass(torch.Tensor)
    direct = {layer for layer in source.output_layers  # stitched, their features would be the prediction
              if grid.layers[layer].size == tuple(prediction.shape[2:]) and torch.equal(
                  grid.layers[layer].importance, grid.prediction_importance.to(grid.layers[layer].importance.device))}
    outputs = {layer: torch.zeros(prob.shape[0], prob.shape[1], *grid.layers[layer].grid, dtype=state.dtype,
                                  device=device) for layer, state in states.items() if layer not in direct}

    def blend(layer: str, features: torch.Tensor, images: list[int], windows: list[int]) -> None:
        """Add each window's prototype logits ``delta . f - offset`` times its importance, as MONAI blends."""
        if layer in direct:
            return
        state, layer_grid = states[layer], grid.layers[layer]
        for window_features, image, window in zip(features, images, windows):
            for rows, position, block in state.blocks(window_features, image, layer_grid.slices[window]):
                logits = torch.addmm(state.offsets[image], state.coefficients[image], block, beta=-1)
                logits = logits.view(-1, *window_features[:, rows].shape[1:]).mul_(layer_grid.importance[0, :, rows])
                outputs[layer][(image, slice(None), *position)] += logits.to(device)

    _run_windows(source, grid, blend)
    logits, counts = {}, {}
    for layer in source.layers:
        if layer in direct:
            logits[layer] = _logits_of_stitched(prediction, states[layer], sw_device).to(device)
            continue
        layer_grid = grid.layers[layer]
        if id(layer_grid) not in counts:
            counts[id(layer_grid)] = layer_grid.count(device)
        output = outputs.pop(layer).div_(counts[id(layer_grid)])
        if layer_grid.crop is not None:
            output = output[(slice(None), slice(None), *layer_grid.crop)].clone()
        logits[layer] = output
    return logits, scales


def _logits_of_stitched(features: torch.Tensor, state: _LayerState, sw_device: torch.device) -> torch.Tensor:
    """Prototype logits ``delta . f - offset`` of a layer's stitched ``(B, C, *S)`` features (the prediction, for a
    layer whose output is the network's), a block of rows at a time: ``(B, K, *S)`` on ``sw_device``."""
    batch, classes, size = features.shape[0], state.coefficients.shape[1], features.shape[2:]
    logits = torch.empty(batch, classes, *size, dtype=state.dtype, device=sw_device)
    whole = tuple(slice(0, n) for n in size)
    for image in range(batch):
        for rows, _, block in state.blocks(features[image].to(sw_device), image, whole):
            values = torch.addmm(state.offsets[image], state.coefficients[image], block, beta=-1)
            logits[image, :, rows] = values.view(classes, -1, *size[1:])
    return logits


def _guided_states(
    source: WindowSource, grid: _WindowGrid, prob: torch.Tensor, mask: torch.Tensor | None
) -> tuple[dict[str, _LayerState], dict[tuple[int, torch.dtype], torch.Tensor | _GuideBlocks]]:
    """Each layer's :class:`_LayerState`, and the prototype weights ``W / count`` of each layer geometry and dtype.

    The ``(B, 2K, *S)`` weights of the guide never exist at once: they are made one class at a time to sum them and
    move them to the layers' grids (:func:`_class_weights`), and on the guide's own grid without padding they are
    made a block at a time as the windows need them (:class:`_GuideBlocks`).
    """
    states: dict[str, _LayerState] = {}
    blend_weights: dict[tuple[int, torch.dtype], torch.Tensor | _GuideBlocks] = {}
    size = tuple(prob.shape[2:])
    for dtype in {_feature_dtype(value) for value in source.dtypes.values()}:
        guide, guide_mask = _prepare_guide(prob, mask, None, dtype)[:2]
        layers = [layer for layer in source.layers if _feature_dtype(source.dtypes[layer]) == dtype]
        grids = {id(grid.layers[layer]): grid.layers[layer] for layer in layers}
        lazy = {key for key, layer_grid in grids.items() if layer_grid.size == size and layer_grid.crop is None}
        totals, moved = _class_weights(guide, guide_mask, [grids[key] for key in grids if key not in lazy])
        for layer in layers:
            states[layer] = _LayerState(source.layers[layer][0], totals, dtype, grid.sw_device)
        for key, layer_grid in grids.items():
            count = layer_grid.count(guide.device)
            if key in lazy:
                blend_weights[(key, dtype)] = _GuideBlocks(guide, guide_mask, count)
            elif layer_grid.crop is None:
                blend_weights[(key, dtype)] = moved.pop(key).div_(count)
            else:  # zero in the padding
                weights = moved[key].new_zeros(*moved[key].shape[:2], *layer_grid.grid)
                crop = (slice(None), slice(None), *layer_grid.crop)
                weights[crop] = moved.pop(key) / count[crop]
                blend_weights[(key, dtype)] = weights
    return states, blend_weights


def _class_weights(
    prob: torch.Tensor, mask: torch.Tensor | None, grids: Sequence[_LayerGrid]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """The totals of the prototype weights ``(B, 2K, 1)`` (the foreground's ``prob x mask`` of each class, then the
    background's ``(1 - prob) x mask``) and the weights moved to each grid by the transpose of the interpolation,
    ``{id(grid): (B, 2K, *grid size)}``, made one class at a time: ``(B, 2, *S)`` at most exists at once."""
    classes = prob.shape[1]
    totals, moved = [], {id(layer_grid): [] for layer_grid in grids}
    for k in range(classes):
        weights = torch.cat([prob[:, k:k + 1], prob[:, k:k + 1]], dim=1)  # foreground, background
        weights[:, 1:].neg_().add_(1)
        if mask is not None:
            weights.mul_(mask)
        totals.append(weights.flatten(2).sum(-1, keepdim=True))
        for layer_grid in grids:
            moved[id(layer_grid)].append(_resize_transpose(weights, layer_grid.size))
    order = [*range(0, 2 * classes, 2), *range(1, 2 * classes, 2)]  # the classes' foregrounds, then backgrounds

    def joined(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts, dim=1)[:, order]

    return joined(totals), {key: joined(parts) for key, parts in moved.items()}


class _GuideBlocks:
    """The prototype weights divided by the count map on the guide's own grid (a layer at full resolution, no
    padding), made a block at a time: ``self[(image, slice(None), *position)]`` is ``(2K, *block)``, the foreground
    weights of the ``K`` classes then the background ones, as the whole weights would hold them."""

    def __init__(self, prob: torch.Tensor, mask: torch.Tensor | None, count: torch.Tensor) -> None:
        self.prob, self.mask, self.count = prob, mask, count

    def __getitem__(self, index: tuple) -> torch.Tensor:
        image, _, *position = index
        prob = self.prob[(image, slice(None), *position)]
        weights = torch.cat([prob, 1 - prob])
        if self.mask is not None:
            weights = weights * self.mask[(image, slice(None), *position)]
        return weights / self.count[(0, slice(None), *position)]


def _check_guide(prob: torch.Tensor, mask: torch.Tensor | None, inputs: torch.Tensor) -> None:
    """Check the types, shapes and devices of ``prob`` and ``mask`` against the inputs of the call.

    Raises:
        TypeError: ``prob`` or ``mask`` is not a tensor.
        ValueError: a shape, batch size or device is wrong; the message names the argument.
    """
    for name, value in (("prob", prob), ("mask", mask)):
        if value is not None and not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
    if prob.ndim != inputs.ndim or prob.shape[0] != inputs.shape[0] or prob.shape[1] == 0 or 0 in prob.shape[2:]:
        raise ValueError(f"prob must have shape (B, K, *S) with the {inputs.shape[0]} images and {inputs.ndim - 2} "
                         f"spatial dims of the inputs {tuple(inputs.shape)}, got {tuple(prob.shape)}.")
    if mask is not None:
        if mask.shape != (prob.shape[0], 1, *prob.shape[2:]):
            raise ValueError(f"mask must have shape (B, 1, *S) = {(prob.shape[0], 1, *prob.shape[2:])} as prob "
                             f"{tuple(prob.shape)}, got {tuple(mask.shape)}.")
        if mask.device != prob.device:
            raise ValueError(f"mask is on {mask.device} but prob is on {prob.device}.")


def sa_scores_from_logits(
    logits: Mapping[str, torch.Tensor], target: torch.Tensor | Sequence[torch.Tensor], *, ignore_empty: bool = True
) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
    """SA scores from prototype logits: Dice of each binary map ``_resize(logits, S) > 0`` against ``target``.

    Args:
        logits: ``{layer: (B, K, *S_layer)}`` prototype logits (``ProtoSegInferer.prototype_logits``).
        target: binary ``(B, K, *S)`` reference of each class, or a sequence of such references.
        ignore_empty: empty-target rule of :func:`~monai_protoseg.sa_score`.

    Returns:
        ``{layer: (B, K)}`` for one target, one such dict per target for a sequence. NaN where the logits are (no
        prototype).

    Raises:
        ValueError: a target is not binary or its shape does not match the logits; the message names it.
    """
    several = not isinstance(target, torch.Tensor)
    targets = list(target) if several else [target]
    if not targets:
        raise ValueError("target is an empty sequence: give at least one (B, K, *S) reference.")
    prepared = []
    for index, value in enumerate(targets):
        name = f"target[{index}]" if several else "target"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}.")
        if value.shape != targets[0].shape:
            raise ValueError(f"{name} must have the shape of target[0] {tuple(targets[0].shape)}, got "
                             f"{tuple(value.shape)}.")
        if value.dtype != torch.bool and not ((value == 0) | (value == 1)).all():
            raise ValueError(f"{name} must be binary (bool or 0/1 values), got other values.")
        prepared.append(value.as_subclass(torch.Tensor).bool().flatten(2))
    truths = [_count(value) for value in prepared]
    size = targets[0].shape[2:]
    per_target: list[dict[str, torch.Tensor]] = [{} for _ in targets]
    for layer, values in logits.items():
        if values.shape[:2] != targets[0].shape[:2] or values.ndim != targets[0].ndim:
            raise ValueError(f"layer {layer!r}: logits {tuple(values.shape)} and target {tuple(targets[0].shape)} "
                             f"must have the same batch size, classes and spatial dims.")
        if values.device != targets[0].device:
            raise ValueError(f"layer {layer!r}: logits are on {values.device} but target is on {targets[0].device}.")
        undefined = values.flatten(2).isnan().any(-1)
        scores = _map_scores(values, prepared, truths, size, ignore_empty)
        for result, score in zip(per_target, scores):
            result[layer] = score.masked_fill(undefined, float("nan"))
    return per_target if several else per_target[0]
