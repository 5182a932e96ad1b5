"""Which layers to probe, and recording their outputs with forward hooks that always come off again."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from types import TracebackType

import torch
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, DynUNet, FlexibleUNet, SegResNet, UNet
from torch import nn

__all__ = ["FeatureRecorder", "resolve_layers", "candidate_layers", "last_decoder_layers"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrapper_prefixes(name: str) -> str:
    """``name`` without leading ``module.`` (DataParallel, DistributedDataParallel) or ``_orig_mod.`` (compile)."""
    while name.startswith(_WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


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
    modules = dict(network.named_modules())
    by_bare_name: dict[str, nn.Module] = {}
    for qualified, module in modules.items():
        by_bare_name.setdefault(_strip_wrapper_prefixes(qualified), module)
    found = {}
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {name!r} ({type(name).__name__}).")
        module = modules.get(name, by_bare_name.get(_strip_wrapper_prefixes(name)))
        if module is None:
            closest = difflib.get_close_matches(_strip_wrapper_prefixes(name), list(by_bare_name), n=5, cutoff=0.4)
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
            state = "was not run in the last forward pass" if layer in self.modules else "is not recorded"
            raise KeyError(f"layer {layer!r} {state}; recorded layers: {self.layers}.")
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
        try:
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

    def _hook(self, name: str):
        def record(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
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


def candidate_layers(network: nn.Module) -> list[str]:
    """Sensible layers to probe, from encoder through bottleneck and decoder to the output block.

    Knows MONAI's ``UNet``, ``BasicUNet``, ``SegResNet``, ``DynUNet`` and ``FlexibleUNet`` (also wrapped in
    (Distributed)DataParallel or ``torch.compile``); for any other network, every leaf-most block (a module whose
    children are all leaves), in registration order.

    Args:
        network: the segmentation network.

    Returns:
        qualified names of ``network.named_modules()``.

    Example:
        >>> candidate_layers(UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)))
        ['model.0', 'model.1.submodule.0', 'model.1.submodule.1.submodule', 'model.1.submodule.2', 'model.2']
    """
    prefix = ""
    while isinstance(network, (nn.DataParallel, nn.parallel.DistributedDataParallel)) or hasattr(network, "_orig_mod"):
        attribute = "module" if hasattr(network, "module") else "_orig_mod"
        network, prefix = getattr(network, attribute), f"{prefix}{attribute}."
    if isinstance(network, UNet):
        names = _unet_layers(network)
    elif isinstance(network, BasicUNet):
        names = [name for name, _ in network.named_children()]
    elif isinstance(network, SegResNet):
        names = [f"down_layers.{i}" for i in range(len(network.down_layers))]
        names += [f"up_layers.{i}" for i in range(len(network.up_layers))] + ["conv_final"]
    elif isinstance(network, DynUNet):
        names = ["input_block"] + [f"downsamples.{i}" for i in range(len(network.downsamples))] + ["bottleneck"]
        names += [f"upsamples.{i}" for i in range(len(network.upsamples))] + ["output_block"]
    elif isinstance(network, FlexibleUNet):
        names = _flexible_unet_encoder_layers(network)
        names += [f"decoder.blocks.{i}" for i in range(len(network.decoder.blocks))] + ["segmentation_head"]
    else:
        names = _leaf_most_blocks(network)
    return [prefix + name for name in names]


def last_decoder_layers(network: nn.Module, count: int = 2) -> list[str]:
    """The last ``count`` decoder layers before the output block: the default layers of the mean-SA quality estimate.

    The output block itself is left out: its features are the logits, whose SA against the network's own prediction
    is close to 1 whatever the quality. For networks :func:`candidate_layers` does not know, the last leaf-most block
    is taken as the output block.

    Args:
        network: the segmentation network.
        count: how many layers.

    Returns:
        qualified names, in forward order.

    Example:
        >>> last_decoder_layers(UNet(2, 1, 1, channels=(4, 8, 16, 32), strides=(2, 2, 2)))
        ['model.1.submodule.1.submodule.2', 'model.1.submodule.2']
    """
    names = candidate_layers(network)
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
