"""What every segmentation attribution method shares: the target, the layers, hooks, and upsample-normalise-combine.

A segmentation network has no single class score to explain, so the target is the sum of one class's logit (or
probability) over a region: the network's own binarised prediction of the class by default, the ground truth, or
any user mask. Each method computes one raw map per chosen layer (default: the post-bottleneck decoder layers, see
:func:`decoder_layers`); every map is resized to the input, min-max normalised to [0, 1], and the maps are combined
by a weighted sum (equal weights by default) and normalised again, as in Visual attribution for deep learning
segmentation in medical imaging (SPIE Medical Imaging 2022). 2D and 3D share every line.

The network is left exactly as it was: :class:`SegmentationAttribution` switches it to eval mode for the call and
restores every module's mode, every parameter's ``requires_grad`` and ``.grad`` (gradients are taken with
``torch.autograd.grad``, which never accumulates into ``.grad``), and its hooks come off even when the call raises.
Gradients are enabled locally, so a call works under ``torch.no_grad()`` and ``torch.inference_mode()`` (inside an
evaluator, for example).

Faulty values are refused, never explained: a call checks its inputs (``(B, C, *S)``, ``B >= 1``, finite), every
network output it computes (finite, also those of masked or perturbed inputs), every recorded layer output and raw
layer map (finite), and the region or label (shape, binary values or class indices). A NaN patch in an image would
otherwise spread to an empty predicted region and an all-zero map, which scores best on Image Preserved. The
ValueError names the method, the argument and its shape. A case whose region is empty has nothing to explain: its
maps are NaN (undefined), which the faithfulness metrics turn into NaN scores.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from monai.utils import convert_to_tensor
from torch import nn

from ..layer_names import role_aliases
from ..recorder import FeatureRecorder, candidate_layers, resolve_layers, unwrap_network

__all__ = [
    "decoder_layers",
    "target_region",
    "target_score",
    "normalise",
    "resize_to",
    "combine",
    "AttributionResult",
    "SegmentationAttribution",
]

ACTIVATIONS = ("softmax", "sigmoid", None)
USES = ("logit", "prob")


def decoder_layers(
    network: nn.Module, *, include_output: bool = False, example_input: torch.Tensor | None = None
) -> list[str]:
    """The post-bottleneck decoder layers: the candidate layers after the bottleneck, the output block left out.

    The bottleneck is the candidate layer (see :func:`~monai_protoseg.candidate_layers`) with the smallest spatial
    output, the deepest one if several share it. The networks whose layers' roles
    :func:`~monai_protoseg.layer_names.role_aliases` knows with a bottleneck (MONAI's ``UNet``, ``AttentionUnet``,
    ``BasicUNet``, ``SegResNet``, ``SegResNetDS``, ``DynUNet``, ``FlexibleUNet``, ``SwinUNETR``) are known without
    running them; any other network needs ``example_input``, a batch the network
    accepts, to measure each candidate layer's output (one forward pass without gradients, in eval mode, restored).

    The output block (the last candidate layer: MONAI ``UNet``'s top up-sampling block, ``BasicUNet.final_conv``,
    ``SegResNet.conv_final``, ``DynUNet.output_block``, ``FlexibleUNet.segmentation_head``) is left out by default:
    its output is the logits, so its Grad-CAM only restates the prediction.

    Args:
        network: the segmentation network.
        include_output: also return the output block.
        example_input: a batch for the shape probe of networks not known by their structure.

    Returns:
        qualified layer names, in forward order.

    Raises:
        ValueError: the network is not known and no ``example_input`` is given, or no layer is left.

    Example:
        >>> from monai.networks.nets import UNet
        >>> decoder_layers(UNet(2, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2)))
        ['model.1.submodule.1.submodule.2', 'model.1.submodule.2']
    """
    names = candidate_layers(network)
    if example_input is not None:
        bottleneck = _probe_bottleneck(network, names, example_input)
    else:
        bottleneck = _known_bottleneck(network, names)
    layers = names[bottleneck + 1:] if include_output else names[bottleneck + 1:-1]
    if not layers:
        raise ValueError(
            f"{type(network).__name__} has no decoder layer between its bottleneck {names[bottleneck]!r} and its "
            f"output block {names[-1]!r}; use include_output=True or name the layers."
        )
    return layers


def target_region(
    output: torch.Tensor,
    region: str | torch.Tensor = "pred",
    class_index: int = 1,
    activation: str | None = "softmax",
    label: torch.Tensor | None = None,
) -> torch.Tensor:
    """The region whose class score is explained, as a float 0/1 mask (empty where nothing is predicted or labelled).

    Args:
        output: ``(B, K, *S)`` network output (logits; probabilities when ``activation`` is None).
        region: ``"pred"``: the network's binarised prediction of the class (argmax for softmax, probability
            ``> 0.5`` otherwise); ``"label"``: where ``label`` is the class; or a user mask ``(B, 1, *S)`` (bool or
            0/1).
        class_index: the explained channel of ``output``.
        activation: ``"softmax"``, ``"sigmoid"`` or None (``output`` is already a probability).
        label: for ``region="label"``: class indices ``(B, 1, *S)`` (integers in ``[0, K)``), or one-hot /
            multi-label ``(B, K, *S)`` (binary).

    Returns:
        ``(B, 1, *S)`` float mask on ``output``'s device.

    Raises:
        ValueError: ``output`` is not finite (see :func:`check_output`); the region or the label has the wrong
            shape, a mask or one-hot label is not binary, or class indices are not integers in ``[0, K)``.

    Example:
        >>> logits = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])  # (1, 2, 1, 2)
        >>> target_region(logits, "pred", class_index=1)
        tensor([[[[1., 0.]]]])
    """
    check_output(output, class_index, activation)
    expected = (output.shape[0], 1, *output.shape[2:])
    if isinstance(region, torch.Tensor):
        return checked_mask(region, expected, "region").to(device=output.device, dtype=output.dtype)
    if region == "pred":
        output = output.detach()
        if activation == "softmax":
            mask = output.argmax(1, keepdim=True) == class_index
        else:
            threshold = 0.0 if activation == "sigmoid" else 0.5  # sigmoid(x) > 0.5 exactly when x > 0
            mask = output[:, class_index:class_index + 1] > threshold
    elif region == "label":
        if label is None:
            raise ValueError('region="label" needs a label.')
        label = convert_to_tensor(label, track_meta=False).to(output.device)
        if label.ndim != output.ndim or label.shape[0] != output.shape[0] or label.shape[2:] != output.shape[2:]:
            raise ValueError(f"the label has shape {tuple(label.shape)}; expected (B, 1 or K, *S) with B, S as the "
                             f"output's {tuple(output.shape)}.")
        if label.shape[1] == output.shape[1]:  # one-hot or multi-label, also a single-channel binary label
            check_binary(label, "label")
            mask = label[:, class_index:class_index + 1] > 0.5
        elif label.shape[1] == 1:
            _check_class_indices(label, output.shape[1])
            mask = label == class_index
        else:
            raise ValueError(f"the label has {label.shape[1]} channels; expected 1 (class indices) or "
                             f"{output.shape[1]} (one-hot or multi-label, like the network output).")
    else:
        raise ValueError(f'region must be "pred", "label" or a (B, 1, *S) mask tensor, got {region!r}.')
    return mask.to(output.dtype)


def target_score(
    output: torch.Tensor,
    region_mask: torch.Tensor,
    class_index: int = 1,
    use: str = "logit",
    activation: str | None = "softmax",
) -> torch.Tensor:
    """The explained score: the sum over the region of the class's logit or probability, per case.

    Args:
        output: ``(B, K, *S)`` network output (logits; probabilities when ``activation`` is None).
        region_mask: ``(B, 1, *S)`` 0/1 mask, see :func:`target_region`.
        class_index: the explained channel of ``output``.
        use: ``"logit"`` (the raw output) or ``"prob"`` (softmax or sigmoid of the output by ``activation``).
        activation: ``"softmax"``, ``"sigmoid"`` or None (``output`` is already a probability).

    Returns:
        ``(B,)``, differentiable with respect to ``output``; 0 for an empty region.

    Raises:
        ValueError: ``output`` is not finite (see :func:`check_output`), or ``region_mask`` is not a binary
            ``(B, 1, *S)`` mask.

    Example:
        >>> logits = torch.tensor([[[[0.0, 2.0]], [[1.0, 1.0]]]])
        >>> target_score(logits, torch.tensor([[[[1.0, 0.0]]]]), class_index=1)
        tensor([1.])
    """
    check_output(output, class_index, activation)
    if use not in USES:
        raise ValueError(f'use must be "logit" or "prob", got {use!r}.')
    checked_mask(region_mask, (output.shape[0], 1, *output.shape[2:]), "region_mask")
    if use == "prob" and activation == "softmax":
        output = torch.softmax(output, dim=1)
    elif use == "prob" and activation == "sigmoid":
        output = torch.sigmoid(output)
    channel = output[:, class_index:class_index + 1]
    return (channel * region_mask.to(channel)).flatten(1).sum(1)


def normalise(maps: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each case of ``maps`` to [0, 1]; a constant map (no evidence anywhere) becomes zeros.

    Args:
        maps: ``(B, ...)``, finite.

    Returns:
        the normalised maps, same shape and dtype.

    Raises:
        ValueError: a NaN or infinite value (it would otherwise turn its whole case into zeros).

    Example:
        >>> normalise(torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]]))
        tensor([[0.0000, 1.0000, 0.5000],
                [0.0000, 0.0000, 0.0000]])
    """
    check_finite(maps, "maps")
    flat = maps.flatten(1)
    low, high = flat.amin(1, keepdim=True), flat.amax(1, keepdim=True)
    span = high - low
    scaled = torch.where(span > 0, (flat - low) / torch.where(span > 0, span, 1), 0)
    return scaled.reshape(maps.shape)


def resize_to(maps: torch.Tensor, spatial_size: Sequence[int]) -> torch.Tensor:
    """Resize ``(B, 1, *s)`` maps to ``(B, 1, *S)`` by linear interpolation (``align_corners=False``).

    Args:
        maps: ``(B, 1, *s)``, 1 to 3 spatial dimensions.
        spatial_size: ``S``.

    Returns:
        ``(B, 1, *S)``.

    Example:
        >>> resize_to(torch.rand(2, 1, 4, 4, 4), (16, 16, 16)).shape
        torch.Size([2, 1, 16, 16, 16])
    """
    spatial_size = tuple(int(s) for s in spatial_size)
    if len(spatial_size) != maps.ndim - 2 or not 1 <= len(spatial_size) <= 3:
        raise ValueError(f"maps of shape {tuple(maps.shape)} cannot be resized to spatial size {spatial_size}.")
    mode = ("linear", "bilinear", "trilinear")[len(spatial_size) - 1]
    return F.interpolate(maps, size=spatial_size, mode=mode, align_corners=False)


def combine(
    layer_maps: Mapping[str, torch.Tensor],
    spatial_size: Sequence[int],
    weights: Mapping[str, float] | None = None,
) -> torch.Tensor:
    """Weighted sum of the layers' maps, each resized to ``spatial_size`` and normalised, normalised again.

    Args:
        layer_maps: raw ``(B, 1, *s)`` map of each layer (any ``s`` per layer).
        spatial_size: ``S``, the input's spatial size.
        weights: non-negative weight of each layer, exactly the layers of ``layer_maps``, not all zero (divided
            by their sum); None: equal weights.

    Returns:
        ``(B, 1, *S)`` in [0, 1].

    Raises:
        ValueError: no layer map, a layer map that is not finite (the message names the layer), or bad weights.

    Example:
        >>> maps = {"up1": torch.rand(1, 1, 8, 8), "up2": torch.rand(1, 1, 16, 16)}
        >>> combine(maps, (32, 32), weights={"up1": 1.0, "up2": 3.0}).shape
        torch.Size([1, 1, 32, 32])
    """
    if not layer_maps:
        raise ValueError("combine needs at least one layer map.")
    for layer, maps in layer_maps.items():
        check_finite(maps, f"the map of layer {layer!r}")
    weights = _checked_weights(weights, list(layer_maps))
    total = sum(weights.values())
    combined = sum(weights[layer] / total * normalise(resize_to(maps, spatial_size))
                   for layer, maps in layer_maps.items())
    return normalise(combined)


@dataclass
class AttributionResult:
    """What a :class:`SegmentationAttribution` call returns.

    Attributes:
        map: ``(B, 1, *S)`` combined attribution map in [0, 1], at the input's spatial size; NaN throughout for a
            case whose region is empty (nothing to explain: undefined).
        layer_maps: raw ``(B, 1, *s)`` map of each layer, at the layer's resolution (before resize and normalise);
            NaN for a case whose region is empty.
        region: ``(B, 1, *S)`` 0/1 mask of the explained region.
        score: ``(B,)`` target score of the unmodified input (0 for an empty region).

    Example:
        >>> result = AttributionResult(torch.zeros(1, 1, 4, 4), {}, torch.zeros(1, 1, 4, 4), torch.zeros(1))
        >>> result.map.shape
        torch.Size([1, 1, 4, 4])
    """

    map: torch.Tensor
    layer_maps: dict[str, torch.Tensor]
    region: torch.Tensor
    score: torch.Tensor


class SegmentationAttribution:
    """Base of the attribution methods: a subclass only computes one raw map per layer in :meth:`layer_maps`.

    A call puts the network in eval mode, runs it once with the layers recorded (with gradients enabled when
    :attr:`uses_gradients`, even under ``torch.no_grad()`` or ``torch.inference_mode()``), fixes the region and the
    target score from that output, asks :meth:`layer_maps` for the raw maps and combines them (see :func:`combine`).
    The network is left exactly as it was: every module's training mode, every parameter's ``requires_grad`` and
    ``.grad``, no hook left. A case whose region is empty gets a zero score and NaN maps (undefined: there is no
    target to explain, and an all-zero map would score best on Image Preserved), not an error. Faulty values are
    refused with a ValueError naming the method (see the module docstring).

    Args:
        network: the segmentation network, ``(B, C_in, *S) -> (B, K, *S)``.
        layers: qualified names of the layers to explain; None: :func:`decoder_layers`.
        class_index: the explained output channel.
        region: the default region, see :func:`target_region`: ``"pred"``, ``"label"`` or a ``(B, 1, *S)`` mask.
        use: the target score sums the class's ``"logit"`` or ``"prob"`` over the region.
        activation: the network's output activation: ``"softmax"``, ``"sigmoid"`` or None (already probabilities).
        weights: weight of each layer in the combined map; None: equal weights.

    Example:
        >>> from monai.networks.nets import UNet
        >>> from monai_protoseg.attribution import GradCAM
        >>> network = UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))
        >>> result = GradCAM(network, layers=["model.1.submodule.2"])(torch.rand(1, 1, 32, 32))
        >>> result.map.shape, list(result.layer_maps)
        (torch.Size([1, 1, 32, 32]), ['model.1.submodule.2'])
    """

    uses_gradients: ClassVar[bool] = True
    """Whether the recorded forward pass keeps an autograd graph (set False in gradient-free subclasses)."""

    def __init__(
        self,
        network: nn.Module,
        layers: Sequence[str] | None = None,
        class_index: int = 1,
        region: str | torch.Tensor = "pred",
        use: str = "logit",
        activation: str | None = "softmax",
        weights: Mapping[str, float] | None = None,
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f'activation must be "softmax", "sigmoid" or None, got {activation!r}.')
        if use not in USES:
            raise ValueError(f'use must be "logit" or "prob", got {use!r}.')
        self.network = network
        self.layers = list(decoder_layers(network) if layers is None else layers)
        if not self.layers:
            raise ValueError("layers must name at least one layer.")
        resolve_layers(network, self.layers)  # an unknown name fails here, listing the closest names
        self.class_index = class_index
        self.region = region
        self.use = use
        self.activation = activation
        self.weights = None if weights is None else _checked_weights(weights, self.layers)

    def __call__(
        self, inputs: torch.Tensor, label: torch.Tensor | None = None, region: str | torch.Tensor | None = None
    ) -> AttributionResult:
        """Explain the network's segmentation of ``inputs``.

        Args:
            inputs: ``(B, C_in, *S)`` batch, ``B >= 1``, finite.
            label: the ground truth, for ``region="label"`` (see :func:`target_region`).
            region: overrides the default region for this call.

        Returns:
            the combined map, the raw layer maps, the region and the score; the maps of a case whose region is empty
            are NaN.

        Raises:
            ValueError: the message starts with the method's name and names the argument and its shape: ``inputs``
                not ``(B, C_in, *S)`` with ``B >= 1`` or not finite; a layer's output, the network output (also of a
                masked or perturbed input) or a raw layer map not finite; a region or label of the wrong shape or
                with bad values (see :func:`target_region`).
        """
        with errors_named(type(self).__name__):
            inputs = check_inputs(inputs)
            region = self.region if region is None else region
            grad_mode = torch.enable_grad() if self.uses_gradients else torch.no_grad()
            with network_kept_as_is(self.network), torch.inference_mode(False), grad_mode:
                self.network.eval()
                if inputs.is_inference():  # made under inference_mode: autograd cannot save it; a copy can
                    inputs = inputs.clone()
                if self.uses_gradients:
                    recorder = _GraphRecorder(self.network, self.layers)
                else:  # a copy survives a later in-place operation of the network
                    recorder = FeatureRecorder(self.network, self.layers, clone=True)
                with recorder:
                    output = self.network(inputs.requires_grad_(self.uses_gradients))
                    features = {layer: recorder[layer] for layer in self.layers}
                for layer, values in features.items():
                    check_finite(values, f"the output of layer {layer!r}")
                inputs = inputs.detach()
                region_mask = target_region(output, region, self.class_index, self.activation, label)
                score = target_score(output.detach(), region_mask, self.class_index, self.use, self.activation)
                layer_maps = {layer: maps.detach() for layer, maps in
                              self.layer_maps(inputs, output, features, region_mask).items()}
            combined = combine(layer_maps, inputs.shape[2:], self.weights)
        undefined = ~region_mask.flatten(1).any(1)
        return AttributionResult(_nan_where(combined, undefined),
                                 {layer: _nan_where(maps, undefined) for layer, maps in layer_maps.items()},
                                 region_mask, score)

    def layer_maps(
        self,
        inputs: torch.Tensor,
        output: torch.Tensor,
        features: dict[str, torch.Tensor],
        region_mask: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """The raw map of every layer; what a subclass implements.

        Args:
            inputs: ``(B, C_in, *S)`` the explained batch (detached).
            output: ``(B, K, *S)`` the network's output, attached to the graph when :attr:`uses_gradients`.
            features: each layer's ``(B, C, *s)`` output, attached to the graph when :attr:`uses_gradients`.
            region_mask: ``(B, 1, *S)`` the fixed region.

        Returns:
            ``(B, 1, *s)`` raw map of each layer of :attr:`layers`.
        """
        raise NotImplementedError

    def score(self, output: torch.Tensor, region_mask: torch.Tensor) -> torch.Tensor:
        """This method's target score of ``output`` (any batch size) over ``region_mask``, ``(B,)``."""
        return target_score(output, region_mask, self.class_index, self.use, self.activation)

    def layer_gradients(
        self, output: torch.Tensor, features: dict[str, torch.Tensor], region_mask: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Gradients of each case's target score with respect to each layer's output.

        The cases' scores are summed before differentiating: a network in eval mode treats cases independently, so
        each case's gradient is its own score's. Nothing is retained and nothing accumulates into ``.grad``.

        Args:
            output: ``(B, K, *S)`` the output, attached to the graph.
            features: each layer's output, attached to the graph.
            region_mask: ``(B, 1, *S)`` the fixed region.

        Returns:
            ``(B, C, *s)`` gradient of each layer's output (zeros where the score does not depend on it).
        """
        layers = list(features)
        gradients = torch.autograd.grad(
            self.score(output, region_mask).sum(), [features[layer] for layer in layers], allow_unused=True
        )
        return {layer: torch.zeros_like(features[layer]) if gradient is None else gradient
                for layer, gradient in zip(layers, gradients)}


class _GraphRecorder(FeatureRecorder):
    """A :class:`FeatureRecorder` whose recorded outputs stay attached to the autograd graph."""

    def __getitem__(self, layer: str) -> torch.Tensor:
        try:
            return super().__getitem__(layer)
        except RuntimeError as error:  # the only RuntimeError: a later in-place operation changed the output
            raise RuntimeError(
                f"the output of layer {layer!r} is modified in place by the network after it is produced (for "
                f"example by ReLU(inplace=True)), so no gradient can be taken with respect to it; explain the layer "
                f"after the in-place operation instead."
            ) from error

    def _hook(self, name: str):
        record_detached = super()._hook(name)

        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            record_detached(module, args, output)  # checks the type, notes the version (shared with ``output``)
            self._features[name] = output

        return record


@contextmanager
def network_kept_as_is(network: nn.Module) -> Iterator[None]:
    """Restore every module's training mode and every parameter's ``requires_grad`` and ``.grad`` on exit."""
    modes = [(module, module.training) for module in network.modules()]
    parameters = [(parameter, parameter.requires_grad, parameter.grad) for parameter in network.parameters()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
        for parameter, requires_grad, grad in parameters:
            parameter.requires_grad_(requires_grad)
            parameter.grad = grad


@contextmanager
def errors_named(caller: str) -> Iterator[None]:
    """Start the message of every ValueError raised inside with ``caller``, so that it names the method or function.

    Args:
        caller: the method's class name or the function's name.

    Raises:
        ValueError: ``f"{caller}: {message}"``, chained to the original error.
    """
    try:
        yield
    except ValueError as error:
        raise ValueError(f"{caller}: {error}") from error


def check_finite(values: torch.Tensor, name: str) -> None:
    """Refuse NaN and infinite values.

    Args:
        values: any tensor (bool and integer tensors are always finite).
        name: what ``values`` are, for the message (the argument's name).

    Raises:
        ValueError: naming ``name``, its shape, how many values are NaN and infinite, and the index of the first.
    """
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        nan = int(values.isnan().sum())
        first = tuple((~finite).nonzero()[0].tolist())
        raise ValueError(f"{name} of shape {tuple(values.shape)} holds {nan} NaN and {int((~finite).sum()) - nan} "
                         f"infinite value(s), the first at {first}.")


def check_inputs(inputs: torch.Tensor, name: str = "inputs") -> torch.Tensor:
    """``inputs`` as a plain detached tensor, checked: ``(B, C, *S)`` with ``B >= 1``, 1 to 3 spatial dimensions, no
    empty axis, finite.

    Args:
        inputs: the batch.
        name: the argument's name, for the message.

    Returns:
        the plain tensor (a MetaTensor's data, without meta data).

    Raises:
        ValueError: naming ``name`` and its shape.
    """
    inputs = convert_to_tensor(inputs, track_meta=False).detach()
    if not 3 <= inputs.ndim <= 5 or inputs.numel() == 0:
        raise ValueError(f"{name} must be (B, C, *S) with B >= 1 and 1 to 3 non-empty spatial dimensions, got shape "
                         f"{tuple(inputs.shape)}.")
    check_finite(inputs, name)
    return inputs


def check_output(output: torch.Tensor, class_index: int, activation: str | None) -> None:
    """Check a network output ``(B, C, *S)``: its shape, finite values, ``class_index`` and ``activation``.

    Raises:
        ValueError: naming the problem (a non-finite output: its shape and how many values are NaN or infinite).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f'activation must be "softmax", "sigmoid" or None, got {activation!r}.')
    if output.ndim < 3:
        raise ValueError(f"the output must be (B, K, *S) with 1 to 3 spatial dimensions, got {tuple(output.shape)}.")
    check_finite(output, "the network output")
    channels = output.shape[1]
    if isinstance(class_index, bool) or not isinstance(class_index, int) or not 0 <= class_index < channels:
        hint = "; a single-channel sigmoid output is class_index=0" if channels == 1 else ""
        raise ValueError(f"class_index {class_index!r} is out of range for a network output with {channels} "
                         f"channel(s){hint}.")


def checked_mask(mask: torch.Tensor, expected: tuple[int, ...], name: str) -> torch.Tensor:
    """``mask`` as a plain tensor of shape ``expected`` and binary values; ValueError naming ``name`` otherwise."""
    mask = convert_to_tensor(mask, track_meta=False)
    if tuple(mask.shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}; expected (B, 1, *S) = {tuple(expected)}.")
    check_binary(mask, name)
    return mask


def check_binary(mask: torch.Tensor, name: str) -> None:
    """Refuse a mask with a value other than 0 and 1 (NaN included); ValueError naming ``name``, its shape and one of
    the other values."""
    if mask.dtype != torch.bool:
        other = ~((mask == 0) | (mask == 1))
        if bool(other.any()):
            raise ValueError(f"{name} must be binary (bool or 0/1); shape {tuple(mask.shape)} holds "
                             f"{int(other.sum())} other value(s), such as {mask[other][0].item()}.")


def _check_class_indices(label: torch.Tensor, classes: int) -> None:
    """Refuse a ``(B, 1, *S)`` label of class indices with a value that is not an integer in ``[0, classes)``."""
    values = label.double()
    other = ~((values == values.round()) & (values >= 0) & (values < classes))
    if bool(other.any()):
        raise ValueError(f"label of shape {tuple(label.shape)} holds class indices, which must be integers in "
                         f"[0, {classes}); {int(other.sum())} other value(s), such as {values[other][0].item()}.")


def _nan_where(maps: torch.Tensor, undefined: torch.Tensor) -> torch.Tensor:
    """``maps`` ``(B, ...)`` with the cases where ``undefined`` (``(B,)`` bool) is True set to NaN."""
    return maps.masked_fill(undefined.reshape(-1, *(1,) * (maps.ndim - 1)), float("nan"))


def _checked_weights(weights: Mapping[str, float] | None, layers: list[str]) -> dict[str, float]:
    if weights is None:
        return dict.fromkeys(layers, 1.0)
    missing, extra = [n for n in layers if n not in weights], [n for n in weights if n not in layers]
    if missing or extra:
        raise ValueError(f"weights must name exactly the layers {layers}; missing {missing}, unknown {extra}.")
    weights = {layer: float(weights[layer]) for layer in layers}
    if any(not w >= 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"weights must be non-negative and not all zero, got {weights}.")
    return weights


def _known_bottleneck(network: nn.Module, names: list[str]) -> int:
    """Index in ``names`` (``candidate_layers(network)``) of the bottleneck of a network whose layers'
    roles :func:`~monai_protoseg.layer_names.role_aliases` knows by its structure."""
    roles = list(role_aliases(unwrap_network(network)[0]).values())
    if "bottleneck" not in roles or len(roles) != len(names):
        raise ValueError(f"decoder_layers does not know {type(unwrap_network(network)[0]).__name__}; pass "
                         "example_input for a shape probe, or name the layers.")
    return roles.index("bottleneck")


def _probe_bottleneck(network: nn.Module, names: list[str], example_input: torch.Tensor) -> int:
    """Index of the last of the candidate layers with the smallest spatial output, measured on ``example_input``."""
    with network_kept_as_is(network), torch.no_grad(), FeatureRecorder(network, names) as recorder:
        network.eval()
        network(example_input)
        sizes = [recorder[name].shape[2:].numel() for name in names]
    smallest = min(sizes)
    return max(i for i, size in enumerate(sizes) if size == smallest)
