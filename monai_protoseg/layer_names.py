"""Readable layer names: an alias for each probed layer, derived from the network's structure, for everything a person
reads (CSV columns, report tables and figures, TensorBoard tags, log lines), and the file that pairs each alias with
its qualified name so that nothing is ambiguous.

For the networks :func:`~monai_protoseg.candidate_layers` knows by name, the candidate layers are named by their role
along the U: ``encoder.1`` ... ``encoder.n`` numbered from the input, ``bottleneck``, ``decoder.m`` ... ``decoder.1``
numbered towards the output (``decoder.1`` is the last decoder block, as in MONAI's ``SwinUNETR`` and
``BasicUNet``), then ``output`` (the block that outputs the logits). ``SwinUNETR`` and ``UNETR`` keep their own
numbers (``encoder2`` is ``encoder.2``). A submodule of such a layer is named after it (``encoder.2.conv``). Any other
layer is named by the shortest dotted suffix of its qualified name that no other module of the network ends with
(and that does not start with a bare index). The aliases depend on the network's structure only, so they are the same
in every run of the same network, whichever layers are probed.
"""

from __future__ import annotations

import os
import pathlib
import re
from collections.abc import Iterable

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

from .io import atomic_write_csv, read_csv
from .recorder import candidate_layers, layer_list, strip_wrapper_prefixes, unwrap_network

__all__ = ["layer_aliases", "role_aliases", "write_layer_names", "read_layer_names", "LAYER_NAMES_FILE"]

LAYER_NAMES_FILE = "layer_names.csv"
"""The file, beside a run's CSV files, with a row per probed layer: ``layer`` (the alias), ``qualified_name``."""

_NUMBERED = re.compile(r"^(encoder|decoder)(\d+)$")


def role_aliases(network: nn.Module) -> dict[str, str]:
    """The role of each candidate layer of a network :func:`~monai_protoseg.candidate_layers` knows by name.

    Args:
        network: the segmentation network (not wrapped).

    Returns:
        ``{qualified name: alias}`` in forward order; empty for a network not known by name.

    Example:
        >>> role_aliases(UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)))  # doctest: +NORMALIZE_WHITESPACE
        {'model.0': 'encoder.1', 'model.1.submodule.0': 'encoder.2', 'model.1.submodule.1.submodule': 'bottleneck',
         'model.1.submodule.2': 'decoder.1', 'model.2': 'output'}
    """
    if isinstance(network, (SwinUNETR, UNETR)):  # encoder1 ... encoder4, [encoder10], decoder5 ... decoder1, out
        names = candidate_layers(network)
        return {name: "bottleneck" if name == "encoder10" else "output" if name == "out"
                else "{}.{}".format(*_NUMBERED.match(name).groups()) for name in names}
    if isinstance(network, (UNet, AttentionUnet, BasicUNet, SegResNet, SegResNetDS, DynUNet, FlexibleUNet, DiNTS)):
        names = candidate_layers(network)
        if isinstance(network, UNet):  # encoders, the bottom block, one decoder fewer (the last is the output block)
            encoders, bottleneck = len(names) // 2, True
        elif isinstance(network, FlexibleUNet):  # the encoder's stages, the deepest the bottleneck
            encoders, bottleneck = sum(name.startswith("encoder.") for name in names) - 1, True
        elif isinstance(network, DiNTS):  # the input at each resolution, the decoder's stems, no bottleneck block
            encoders, bottleneck = network.num_depths, False
        else:  # as many encoders as decoders around the bottleneck
            encoders, bottleneck = len(names) // 2 - 1, True
        return _roles(names, encoders, bottleneck)
    return {}


def _roles(names: list[str], encoders: int, bottleneck: bool) -> dict[str, str]:
    """``names`` (encoders, the bottleneck if any, decoders, the output block) named by their roles."""
    decoders = len(names) - encoders - bottleneck - 1
    aliases = [f"encoder.{i + 1}" for i in range(encoders)] + ["bottleneck"] * bottleneck
    aliases += [f"decoder.{decoders - i}" for i in range(decoders)] + ["output"]
    return dict(zip(names, aliases))


def layer_aliases(network: nn.Module, layers: Iterable[str]) -> dict[str, str]:
    """A readable, unique alias for each of ``layers`` (see the module docstring for the rules).

    Args:
        network: the network the layers belong to (it may be wrapped in (Distributed)DataParallel or
            ``torch.compile``).
        layers: qualified names of its submodules, with or without the wrappers' prefixes.

    Returns:
        ``{layer as given: alias}``, in the order of ``layers``; two layers never share an alias (where the rules
        would give two the same, both keep their qualified names).

    Example:
        >>> layer_aliases(UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)), ["model.1.submodule.1.submodule",
        ...                                                                     "model.1.submodule.0.conv"])
        {'model.1.submodule.1.submodule': 'bottleneck', 'model.1.submodule.0.conv': 'encoder.2.conv'}
    """
    layers = layer_list(layers)
    network, _ = unwrap_network(network)
    roles = role_aliases(network)
    modules = [name for name, _ in network.named_modules() if name]
    aliases = {layer: _alias(strip_wrapper_prefixes(layer), roles, modules) for layer in layers}
    counts: dict[str, int] = {}
    for alias in aliases.values():
        counts[alias] = counts.get(alias, 0) + 1
    return {layer: strip_wrapper_prefixes(layer) if counts[alias] > 1 else alias for layer, alias in aliases.items()}


def _alias(name: str, roles: dict[str, str], modules: list[str]) -> str:
    """The alias of the bare qualified ``name``: its role, that of its nearest ancestor with one, or a short suffix."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        role = roles.get(".".join(parts[:end]))
        if role is not None:
            return ".".join([role, *parts[end:]])
    for start in range(len(parts) - 1, 0, -1):
        if parts[start].isdigit():
            continue
        suffix = parts[start:]
        if not any(other != name and other.split(".")[-len(suffix):] == suffix for other in modules):
            return ".".join(suffix)
    return name


def write_layer_names(folder: str | os.PathLike, aliases: dict[str, str]) -> pathlib.Path:
    """Add ``aliases`` to ``folder/layer_names.csv`` (atomically), keeping the rows of other aliases already there.

    Several handlers writing to one folder each add their layers; an alias written again takes its new qualified name.

    Args:
        folder: the run folder.
        aliases: ``{qualified name: alias}`` (see :func:`layer_aliases`).

    Returns:
        the path of the file.
    """
    path = pathlib.Path(folder) / LAYER_NAMES_FILE
    known = read_layer_names(path) if path.is_file() else {}
    known.update({alias: strip_wrapper_prefixes(layer) for layer, alias in aliases.items()})
    return atomic_write_csv(path, ["layer", "qualified_name"], [[alias, layer] for alias, layer in known.items()])


def read_layer_names(path: str | os.PathLike) -> dict[str, str]:
    """Read a ``layer_names.csv`` (see :func:`write_layer_names`).

    Returns:
        ``{alias: qualified name}``, in the file's order.

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV (see :func:`~monai_protoseg.io.read_csv`).
    """
    table = read_csv(path, ["layer", "qualified_name"])
    return {row["layer"]: row["qualified_name"] for row in table.rows}
