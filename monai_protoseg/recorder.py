"""Which layers to probe, and recording their outputs with forward hooks that always come off again."""

from __future__ import annotations

import contextlib
import difflib
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from types import TracebackType

import torch
import torch.nn.functional as F
from monai.networks.layers import SkipConnection
from monai.networks.nets import (
    UNETR,
    AttentionUnet,
    BasicUNet,
    DiNTS,
    DynUNet,
    FlexibleUNet,
    SegResNet,
    SegResNetDS,
    SwinUNETR,
    UNet,
)
from torch import nn

__all__ = [
    "FeatureRecorder",
    "layer_list",
    "resolve_layers",
    "forward_hooks_suspended",
    "candidate_layers",
    "last_decoder_layers",
    "strip_wrapper_prefixes",
    "unwrap_network",
]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrapper_prefixes(name: str) -> str:
    """``name`` without leading ``module.`` (DataParallel, DistributedDataParallel) or ``_orig_mod.`` (compile)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def unwrap_network(network: nn.Module) -> tuple[nn.Module, str]:
    """The network inside (Distributed)DataParallel and ``torch.compile`` wrappers, and the prefix its submodule names
    carry in the wrapper's ``named_modules()``.

    Example:
        >>> unwrap_network(nn.DataParallel(nn.Conv2d(1, 1, 1)))[1]
        'module.'
    """
    prefix = ""
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(network, "_orig_mod"):
        attribute = "module" if hasattr(network, "module") else "_orig_mod"
        network, prefix = getattr(network, attribute), f"{prefix}{attribute}."
    return network, prefix


def layer_list(layers: Iterable[str], argument: str = "layers") -> list[str]:
    """``layers`` as a list of names, refusing a single string (whose characters would be taken for names).

    Raises:
        TypeError: ``layers`` is a string; the message names ``argument`` and shows the list to write.
    """
    if isinstance(layers, str):
        raise TypeError(f"{argument} must be a list of layer names, got the string {layers!r}: write [{layers!r}].")
    return list(layers)


def resolve_layers(network: nn.Module, layers: Iterable[str]) -> dict[str, nn.Module]:
    """Find the submodules named by ``layers`` in ``network``.

    A name is a qualified name of ``network.named_modules()``; it may carry or lack the ``module.`` prefix of
    (Distributed)DataParallel and the ``_orig_mod.`` prefix of ``torch.compile``.

    Args:
        network: the network to search.
        layers: qualified names of submodules.

    Returns:
        the submodules, keyed by the names as given.

    Raises:
        ValueError: a name matches no submodule; the message lists the closest valid names.

    Example:
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> list(resolve_layers(nn.DataParallel(net), ["model.0"]))
        ['model.0']
    """
    layers = layer_list(layers)
    modules = dict(network.named_modules())
    by_bare_name: dict[str, nn.Module] = {}
    for qualified, module in modules.items():
        by_bare_name.setdefault(strip_wrapper_prefixes(qualified), module)
    found = {}
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r} ({type(name).__name__}).")
        module = modules.get(name, by_bare_name.get(strip_wrapper_prefixes(name)))
        if module is None:
            closest = difflib.get_close_matches(strip_wrapper_prefixes(name), list(by_bare_name), n=5, cutoff=0.4)
            hint = ", ".join(repr(c) for c in closest) if closest else "none close; see network.named_modules()"
            raise ValueError(f"layer {name!r} is not a submodule of {type(network).__name__}; closest names: {hint}.")
        found[name] = module
    return found


class FeatureRecorder:
    """Context manager that records the outputs of named submodules during forward passes.

    Outputs are stored detached (no graph is kept, ``torch.no_grad`` friendly); each forward pass replaces the
    previous one's. The network is never changed: hooks are registered on entry and always removed on exit, also
    when the block raises. A recorded output that a later in-place operation of the network overwrote (for example
    ``ReLU(inplace=True)``) is an error on access unless ``clone=True`` keeps a copy; under
    ``torch.inference_mode``, where tensors track no in-place changes, outputs are always copied.

    Args:
        network: the network whose submodules are recorded.
        layers: qualified submodule names (see :func:`resolve_layers`).
        clone: store a copy of each output instead of a view of it.

    Example:
        >>> net = UNet(2, 1, 1, channels=(4, 8), strides=(2,))
        >>> with FeatureRecorder(net, ["model.0", "model.2"]) as recorder:
        ...     prediction = net(torch.rand(1, 1, 16, 16))
        >>> recorder["model.0"].shape
        torch.Size([1, 4, 8, 8])
    """

    def __init__(self, network: nn.Module, layers: Iterable[str], *, clone: bool = False) -> None:
        self.network = network
        self.modules = resolve_layers(network, layers)
        self.clone = clone
        self._features: dict[str, torch.Tensor] = {}
        self._versions: dict[str, int | None] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._this_pass: set[str] | None = None  # the layers recorded in the network's running forward pass
        self._network_calls = 0
        self._warned_reuse: set[str] = set()

    @property
    def layers(self) -> list[str]:
        """The recorded layer names, as given."""
        return list(self.modules)

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """The outputs of the last forward pass, by layer name (only the layers that ran)."""
        return {name: self[name] for name in self._features}

    def __getitem__(self, layer: str) -> torch.Tensor:
        if layer not in self._features:
            if layer not in self.modules:
                raise KeyError(f"layer {layer!r} is not recorded; recorded layers: {self.layers}.")
            if self._network_calls and _is_compiled(self.network):
                raise KeyError(
                    f"layer {layer!r} recorded nothing although {type(self.network).__name__} ran: the network is "
                    f"compiled (torch.compile), and its compiled graph ignores forward hooks added after its first "
                    f"call. Record the uncompiled module (network._orig_mod), or record before the first call."
                )
            raise KeyError(f"layer {layer!r} was not run in the last forward pass; recorded layers: {self.layers}.")
        output = self._features[layer]
        if self._versions[layer] is not None and output._version != self._versions[layer]:
            raise RuntimeError(
                f"the output of layer {layer!r} was modified in place after it was recorded (an in-place "
                f"operation such as ReLU(inplace=True) follows it); use FeatureRecorder(..., clone=True)."
            )
        return output

    def clear(self) -> None:
        """Forget the recorded outputs."""
        self._features.clear()
        self._versions.clear()

    def __enter__(self) -> FeatureRecorder:
        if self._handles:
            raise RuntimeError("this FeatureRecorder is already active; it cannot be entered twice.")
        self.clear()
        self._network_calls = 0
        try:
            self._handles.append(self.network.register_forward_pre_hook(self._pass_starts))
            self._handles.append(self.network.register_forward_hook(self._pass_ends, always_call=True))
            for name, module in self.modules.items():
                self._handles.append(module.register_forward_hook(self._hook(name)))
        except BaseException:
            self.remove_hooks()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.remove_hooks()

    def remove_hooks(self) -> None:
        """Remove every hook this recorder registered (safe to call more than once)."""
        while self._handles:
            self._handles.pop().remove()

    def _pass_starts(self, module: nn.Module, args: tuple) -> None:
        """Forward pre-hook of the network: a forward pass starts."""
        self._network_calls += 1
        self._this_pass = set()

    def _pass_ends(self, module: nn.Module, args: tuple, output: object) -> None:
        """Forward hook of the network (also when it raises): the pass is over."""
        self._this_pass = None

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            reused = self._this_pass is not None and name in self._this_pass
            if reused and name not in self._warned_reuse:
                self._warned_reuse.add(name)
                warnings.warn(
                    f"layer {name!r} ({type(module).__name__}) ran more than once in one forward pass (the network "
                    f"reuses it): only its last output is recorded. Record a module that runs once per pass.",
                    stacklevel=2,
                )
            if self._this_pass is not None:
                self._this_pass.add(name)
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} ({type(module).__name__}) returned {type(output).__name__}, not a tensor; "
                    f"record one of its submodules instead."
                )
            # Tensors made under torch.inference_mode track no version, so a copy is the only safe record.
            untracked = output.is_inference()
            stored = output.detach().clone() if self.clone or untracked else output.detach()
            self._features[name] = stored
            self._versions[name] = None if untracked else stored._version

        return record


def _is_compiled(network: nn.Module) -> bool:
    """Whether ``network`` or one of its submodules is a ``torch.compile`` wrapper."""
    return any(hasattr(module, "_orig_mod") for module in network.modules())


@contextlib.contextmanager
def forward_hooks_suspended(network: nn.Module) -> Iterator[None]:
    """Suspend every forward hook of ``network`` for an extra pass (a flipped input, an attribution method, a
    masked input), so that no recorder (this handler's or another's) sees it; the hooks are back afterwards."""
    saved = {module: module._forward_hooks for module in network.modules()}
    try:
        for module in saved:
            module._forward_hooks = OrderedDict()
        yield
    finally:
        for module, hooks in saved.items():
            module._forward_hooks = hooks


def candidate_layers(network: nn.Module, *, example_input: torch.Tensor | None = None) -> list[str]:
    """Sensible layers to probe, from the input side through the bottleneck to the output block (the logits).

    Each layer outputs a feature map ``(B, C, *S)`` on the image grid (the input size over a power of two per axis).
    The blocks of MONAI's ``UNet``, ``BasicUNet``, ``SegResNet``, ``SegResNetDS``, ``DynUNet``, ``FlexibleUNet``,
    ``AttentionUnet``, ``SwinUNETR``, ``UNETR`` and ``DiNTS`` are known by name (also wrapped in
    (Distributed)DataParallel or ``torch.compile``); transformer stages, whose outputs are tokens or channels-last,
    are left out. For any other network, the leaf-most blocks (modules whose children are all leaves) whose output
    is a feature map on the input's grid, in forward order: this is measured by running the network twice (see
    ``example_input``) without gradients, in eval mode and with its forward hooks suspended; each module's training
    flag is restored afterwards, and BatchNorm statistics are left as they were.

    Args:
        network: the segmentation network.
        example_input: only for a network not known by name: a batch it accepts. The network also runs on this batch
            doubled along every spatial axis, and a block is kept when both outputs are tensors with the input's
            number of dimensions and batch size whose spatial sizes double too (token and channels-last outputs do
            not). By default zeros ``(1, C, 32, ..., 32)``, ``C`` and the number of spatial dimensions taken from the
            network's first ``nn.ConvNd``.

    Returns:
        qualified names of ``network.named_modules()``, in forward order.

    Raises:
        ValueError: a network not known by name that does not run on the example input or its doubled size.

    Example:
        >>> candidate_layers(UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)))
        ['model.0', 'model.1.submodule.0', 'model.1.submodule.1.submodule', 'model.1.submodule.2', 'model.2']
        >>> tokens = nn.Sequential(nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Flatten(2))  # (B, C, H * W)
        >>> candidate_layers(nn.Sequential(nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()), tokens))
        ['0']
    """
    network, prefix = unwrap_network(network)
    if isinstance(network, UNet):
        names = _unet_layers(network)
    elif isinstance(network, BasicUNet):
        names = [name for name, _ in network.named_children()]
    elif isinstance(network, SegResNet):
        names = [f"down_layers.{i}" for i in range(len(network.down_layers))]
        names += [f"up_layers.{i}" for i in range(len(network.up_layers))] + ["conv_final"]
    elif isinstance(network, SegResNetDS):
        names = _segresnet_ds_layers(network)
    elif isinstance(network, DynUNet):
        names = ["input_block"] + [f"downsamples.{i}" for i in range(len(network.downsamples))] + ["bottleneck"]
        names += [f"upsamples.{i}" for i in range(len(network.upsamples))] + ["output_block"]
    elif isinstance(network, FlexibleUNet):
        names = _flexible_unet_encoder_layers(network)
        names += [f"decoder.blocks.{i}" for i in range(len(network.decoder.blocks))] + ["segmentation_head"]
    elif isinstance(network, AttentionUnet):
        names = _attention_unet_layers(network)
    elif isinstance(network, SwinUNETR):  # not swinViT: its blocks output windows of tokens or channels-last maps
        names = ["encoder1", "encoder2", "encoder3", "encoder4", "encoder10"]
        names += ["decoder5", "decoder4", "decoder3", "decoder2", "decoder1", "out"]
    elif isinstance(network, UNETR):  # vit outputs tokens
        names = ["encoder1", "encoder2", "encoder3", "encoder4", "decoder5", "decoder4", "decoder3", "decoder2", "out"]
    elif isinstance(network, DiNTS):
        names = _dints_layers(network)
    else:
        names = _grid_blocks(network, _leaf_most_blocks(network), example_input)
    return [prefix + name for name in names]


def last_decoder_layers(
    network: nn.Module, count: int = 2, *, example_input: torch.Tensor | None = None
) -> list[str]:
    """The last ``count`` decoder layers before the output block: the default layers of the mean-SA quality estimate.

    The output block itself is left out: its features are the logits, whose SA against the network's own prediction
    is close to 1 whatever the quality. For networks :func:`candidate_layers` does not know by name, the last of
    their candidate layers is taken as the output block.

    Args:
        network: the segmentation network.
        count: how many layers.
        example_input: passed to :func:`candidate_layers`, for a network it does not know by name.

    Returns:
        qualified names, in forward order.

    Example:
        >>> last_decoder_layers(UNet(2, 1, 1, channels=(4, 8, 16, 32), strides=(2, 2, 2)))
        ['model.1.submodule.1.submodule.2', 'model.1.submodule.2']
    """
    names = candidate_layers(network, example_input=example_input)
    if not 1 <= count < len(names):
        raise ValueError(f"count must be between 1 and {len(names) - 1} for this network, got {count}.")
    return names[-count - 1:-1]


def _unet_layers(network: UNet) -> list[str]:
    """MONAI ``UNet`` nests ``Sequential(down, SkipConnection(inner), up)`` down to the bottom block."""
    encoders, decoders = [], []
    block, name = network.model, "model"
    while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
        encoders.append(f"{name}.0")
        decoders.append(f"{name}.2")
        block, name = block[1].submodule, f"{name}.1.submodule"
    return encoders + [name] + decoders[::-1]


def _attention_unet_layers(network: AttentionUnet) -> list[str]:
    """``model`` is ``Sequential(head, AttentionLayer, 1x1 conv)``; an ``AttentionLayer``'s submodule is
    ``Sequential(down ConvBlock, inner AttentionLayer)``, the bottom one's a ``ConvBlock``. Each ``AttentionLayer``
    outputs its decoder level."""
    encoders, decoders = ["model.0"], []
    layer, name = network.model[1], "model.1"
    while isinstance(layer.submodule, nn.Sequential):
        encoders.append(f"{name}.submodule.0")
        decoders.append(name)
        layer, name = layer.submodule[1], f"{name}.submodule.1"
    return encoders + [f"{name}.submodule", name] + decoders[::-1] + ["model.2"]


def _segresnet_ds_layers(network: SegResNetDS) -> list[str]:
    """The encoder levels' blocks, the decoder levels' blocks and the last level's head (the full-size logits); the
    other heads are deep-supervision logits at lower resolutions."""
    names = [f"encoder.layers.{i}.blocks" for i in range(len(network.encoder.layers))]
    names += [f"up_layers.{i}.blocks" for i in range(len(network.up_layers))]
    return names + [f"up_layers.{len(network.up_layers) - 1}.head"]


def _dints_layers(network: DiNTS) -> list[str]:
    """The stem-down blocks (the input at each resolution), the stem-up blocks that run, from the deepest to the
    full-size one (the decoder), then ``stem_finals`` (the logits).

    ``DiNTS`` calls its stems by ``.forward()``, which runs no forward hook, so the layers are the modules those call
    (each stem's ``mod``). The searched cells are left out: each cell's output is one summand of a node, not the
    node's features, and a searched topology has dozens of them (84 for the model zoo's multi-organ topology); name
    ``dints_space.cell_tree.(block, path).op`` explicitly to probe one.
    """
    names = [f"stem_down.{depth}.mod" for depth in range(network.num_depths)]
    # DiNTS.forward runs stem_up from the deepest node active after the last block up to the full size.
    deepest = max(depth for depth in range(network.num_depths) if network.node_a[network.num_blocks][depth])
    return names + [f"stem_up.{depth}.mod" for depth in range(deepest, -1, -1)] + ["stem_finals"]


def _flexible_unet_encoder_layers(network: FlexibleUNet) -> list[str]:
    """The encoder stages whose outputs feed the decoder (ResNet layers or EfficientNet block stacks)."""
    encoder = network.encoder
    if hasattr(encoder, "extract_stacks"):
        return [f"encoder._blocks.{i - 1}" for i in encoder.extract_stacks if i > 0]
    return [name for name in ("encoder.layer1", "encoder.layer2", "encoder.layer3", "encoder.layer4")
            if hasattr(encoder, name.split(".")[1])]


def _leaf_most_blocks(network: nn.Module) -> list[str]:
    """Modules whose children are all leaves; the leaves themselves if there are none."""
    named = list(network.named_modules())
    blocks = [
        name for name, module in named
        if name and any(True for _ in module.children()) and all(not any(c.children()) for c in module.children())
    ]
    return blocks or [name for name, module in named if name and not any(module.children())]


def _grid_blocks(network: nn.Module, names: list[str], example_input: torch.Tensor | None) -> list[str]:
    """The modules among ``names`` whose output is a feature map ``(B, C, *S)`` on the input's grid, in forward
    order: measured on ``example_input`` (see :func:`candidate_layers`) and on it doubled along every spatial axis."""
    if example_input is None:
        conv = next((m for m in network.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None)
        if conv is None:
            raise ValueError(f"candidate_layers does not know {type(network).__name__} and finds no nn.ConvNd to "
                             f"size a dummy input by; pass example_input= or name the layers.")
        spatial_dims = conv.weight.ndim - 2
        example_input = conv.weight.new_zeros(1, conv.in_channels, *(32,) * spatial_dims)
    small = _output_shapes(network, names, example_input)
    large = _output_shapes(network, names, F.interpolate(example_input, scale_factor=2.0, mode="nearest"))
    return [name for name in small if _doubles_with_input(small[name], large.get(name), example_input.shape)]


def _output_shapes(network: nn.Module, names: list[str], inputs: torch.Tensor) -> dict[str, torch.Size | None]:
    """Each named module's output shape (``None`` if no tensor) in one forward pass of ``inputs``, in call order; the
    pass runs without gradients, in eval mode and with the network's forward hooks suspended."""
    shapes: dict[str, torch.Size | None] = {}

    def record(name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            shapes[name] = output.shape if isinstance(output, torch.Tensor) else None

        return hook

    modes = {module: module.training for module in network.modules()}
    with forward_hooks_suspended(network):
        probed = resolve_layers(network, names)
        handles = [module.register_forward_hook(record(name)) for name, module in probed.items()]
        try:
            with torch.no_grad():
                network.eval()
                network(inputs)
        except Exception as error:
            raise ValueError(
                f"candidate_layers does not know {type(network).__name__}, and it failed on an example input of shape "
                f"{tuple(inputs.shape)} ({type(error).__name__}: {error}); pass example_input= (a batch it accepts; "
                f"it must also accept the batch doubled along every spatial axis) or name the layers."
            ) from error
        finally:
            for handle in handles:
                handle.remove()
            for module, training in modes.items():
                module.training = training
    return shapes


def _doubles_with_input(small: torch.Size | None, large: torch.Size | None, inputs: torch.Size) -> bool:
    """Whether a module's output shapes on ``inputs`` and on it doubled are feature maps ``(B, C, *S)``: as many
    dimensions and the same batch size as ``inputs``, the same channels, and every spatial size doubled."""
    if small is None or large is None or not len(small) == len(large) == len(inputs):
        return False
    spatial_doubled = all(2 * s == l for s, l in zip(small[2:], large[2:]))
    return small[0] == large[0] == inputs[0] and small[1] == large[1] and spatial_doubled
