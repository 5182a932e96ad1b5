"""Checks that stop a bundle run on bad options or bad data with an error naming the option or the file.

MONAI's ``LoadImaged`` reports a file that is truncated inside its compressed body as a bare ``EOFError``, a label
whose shape differs from its image surfaces later as a collate error about tensor sizes, and a grayscale or CMYK
photograph among RGB ones as a shape error of a later transform. None names the file. :class:`CheckedLoadImaged` and
:class:`CheckSpatialShaped` do, so a bundle stops on the first bad case with a message that says which one, before it
writes anything for it.

Bundle configs call :func:`check_bundle_options` first in ``initialize`` and build their data lists with
:func:`pair_files` or :func:`check_datalist`, so that a bad option (zero epochs, a device this machine lacks, an
output folder that cannot be written, an image size the network cannot take) or a file that is missing, empty or
without its partner stops the run before it trains or writes anything, with an error naming the option or the files.
"""

from __future__ import annotations

import copy
import math
import numbers
import os
import pathlib
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ImageMetaKey
from torch import nn

from .io import find_files

__all__ = ["CheckedLoadImaged", "CheckSpatialShaped", "check_bundle_options", "check_datalist", "pair_files"]

PIL_MODES = {"1": "black and white", "L": "grayscale", "LA": "grayscale with alpha", "P": "palette",
             "I": "32-bit grayscale", "I;16": "16-bit grayscale", "F": "floating-point grayscale", "RGB": "RGB",
             "RGBA": "RGB with alpha", "CMYK": "CMYK", "YCbCr": "YCbCr", "LAB": "Lab", "HSV": "HSV"}
"""What the PIL image modes mean, for channel errors about 2D image files."""
LISTED_FILES = 10
"""Errors about many files name this many of them, then give the count of the others."""
MAX_SIZE_STEP = 64
"""When the network cannot take a size, :func:`check_bundle_options` suggests the next one that is a multiple of
2, 4, ..., this, and that the network takes."""


class _FileNamingLoader:
    """Wraps a ``LoadImage``: an error while reading a file is re-raised naming the file."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def __call__(self, filename: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return self.loader(filename, *args, **kwargs)
        except Exception as error:
            name = os.fspath(filename) if isinstance(filename, (str, os.PathLike)) else filename
            raise RuntimeError(f"cannot read image file {name}: {type(error).__name__}: {error}") from error

    def __getattr__(self, name: str) -> Any:  # image_only, register, readers, ...: the wrapped loader's
        return getattr(self.loader, name)


class CheckedLoadImaged(LoadImaged):
    """MONAI's ``LoadImaged`` (same arguments), whose errors name the file that could not be read: a missing file,
    an unknown format, or a file truncated or corrupt anywhere in it; and, with ``channels``, a file with another
    number of channels than its key needs (a grayscale or CMYK photograph among RGB ones, a 3D volume where a
    4-modality one belongs).

    Args:
        keys: keys of the files to load.
        args: the other arguments of ``LoadImaged``.
        channels: the number of channels the image under each key must have, such as ``{"image": 3, "label": 1}``;
            counted as the reader finds them (the channel dimension it reports: an image without one, such as a
            grayscale JPEG or a 3D NIfTI volume, has 1). Keys left out are not checked.
        kwargs: the other keyword arguments of ``LoadImaged``.

    Raises:
        RuntimeError: ``"cannot read image file PATH: ..."``, with the reader's own error chained.
        ValueError: a file has another number of channels than ``channels`` asks; the message names the file, both
            counts and, for a 2D image file, its colour mode.
    """

    def __init__(
        self, keys: KeysCollection, *args: Any, channels: Mapping[str, int] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(keys, *args, **kwargs)
        self._loader = _FileNamingLoader(self._loader)
        self.channels = dict(channels or {})

    def __call__(self, data: Any, reader: Any = None) -> dict[Hashable, Any]:
        d = super().__call__(data, reader)
        for key, expected in self.channels.items():
            found = _channel_count(d[key], self._loader.ensure_channel_first) if key in d else expected
            if found != expected:
                raise ValueError(_channel_error(key, d[key], found, expected))
        return d


class CheckSpatialShaped(MapTransform):
    """Checks that the images under ``keys`` have the spatial shape of the one under ``reference_key``.

    Place it after the channel dimension is first (``LoadImaged(ensure_channel_first=True)`` or
    ``EnsureChannelFirstd``) and before any spatial transform: a label drawn on another grid than its image would
    otherwise be resampled or cropped into a silently wrong target, or fail later without naming the case.

    Args:
        keys: keys of the images to check (typically the label).
        reference_key: key of the image they must match.
        allow_missing_keys: skip keys that are absent (inference data without labels).

    Raises:
        ValueError: a spatial shape differs; the message names both files (from the MetaTensor meta data) and shapes.
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.reference_key not in d:
            raise KeyError(f"CheckSpatialShaped: the reference key {self.reference_key!r} is not in the data.")
        reference = d[self.reference_key]
        for key in self.key_iterator(d):
            if tuple(d[key].shape[1:]) != tuple(reference.shape[1:]):
                raise ValueError(
                    f"the {key!r} image {_source(d[key])} has spatial shape {tuple(d[key].shape[1:])}, but its "
                    f"{self.reference_key!r} image {_source(reference)} has {tuple(reference.shape[1:])}."
                )
        return d


def check_bundle_options(
    *,
    counts: Mapping[str, Any] | None = None,
    min_counts: Mapping[str, int] | None = None,
    fractions: Mapping[str, Any] | None = None,
    sizes: Mapping[str, Any] | None = None,
    network: nn.Module | None = None,
    in_channels: int = 1,
    spatial_dims: int | None = None,
    min_size: int = 1,
    device: Any = None,
    dataset_dir: Any = None,
    output_dir: Any = None,
) -> None:
    """Check a bundle's options before it runs; the first bad one raises an error naming it, its value and what is
    allowed. Bundle configs call it first in ``initialize``, so that nothing is trained or written on a bad option.

    The output folder is checked last: it is created (as the run would) and a temporary file is written in it.

    Args:
        counts: options that are whole numbers >= 1 by name (``{"epochs": 40, "val_interval": 10}``).
        min_counts: a higher minimum for some of ``counts`` (``{"validation_cases": 3}``).
        fractions: options that are numbers in (0, 1) by name (``{"val_fraction": 0.2}``).
        sizes: options that are spatial sizes by name: an integer (the same along each of ``spatial_dims``) or one
            integer per spatial dimension, each at least ``min_size``; with ``network``, sizes it runs on.
        network: the network that takes inputs of ``sizes``; it is tried once on each (a copy on PyTorch's ``meta``
            device: no memory, no computation), so that an image size too small or not a multiple it can take
            stops the run here. A network that cannot run on ``meta`` (``NotImplementedError``) is not tried.
        in_channels: the input channels of ``network``.
        spatial_dims: the number of spatial dimensions of ``sizes``; ``None`` takes sequences of any length and
            refuses integers.
        min_size: the smallest size allowed along each dimension (such as the smallest image a data writer makes).
        device: the device to run on (a ``torch.device`` or its name): it must exist on this machine.
        dataset_dir: a folder the run reads its data from: it must exist.
        output_dir: the folder the run writes to: it must be a folder this process can create and write in.

    Raises:
        ValueError: ``"bad option --NAME VALUE: WHAT IS ALLOWED"``.
    """
    for name, value in (counts or {}).items():
        low = (min_counts or {}).get(name, 1)
        if not _is_int(value) or value < low:
            raise _bad_option(name, value, f"must be an integer >= {low}")
    for name, value in (fractions or {}).items():
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not 0 < value < 1:
            raise _bad_option(name, value, "must be a number between 0 and 1 (both excluded)")
    for name, value in (sizes or {}).items():
        size = _spatial_size(name, value, spatial_dims, min_size)
        if network is not None:
            _check_network_input(network, in_channels, size, name, value)
    if device is not None:
        _check_device(device)
    if dataset_dir is not None and not pathlib.Path(dataset_dir).is_dir():
        what = "is a file, not a folder" if pathlib.Path(dataset_dir).exists() else "does not exist"
        raise _bad_option("dataset_dir", dataset_dir, f"{what}: give the folder of the dataset", shown=dataset_dir)
    if output_dir is not None:
        try:
            pathlib.Path(output_dir).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=output_dir):
                pass
        except OSError as error:
            raise _bad_option("output_dir", output_dir, f"cannot create or write to this folder ({_reason(error)})",
                              shown=output_dir) from error


def check_datalist(
    datalist: Sequence[Mapping[str, Any]], keys: Sequence[str] | None = None, source: str = "the data list"
) -> list[dict[str, Any]]:
    """Check that a data list has cases and that every file it names exists and is not empty.

    Args:
        datalist: ``[{"image": path, "label": path, ...}, ...]``, such as ``monai.data.load_decathlon_datalist``
            returns.
        keys: the keys whose values are file paths (default: ``image`` and ``label``, where present).
        source: where the list comes from (a ``dataset.json``, a folder), for the messages.

    Returns:
        the data list, as a list of dicts.

    Raises:
        ValueError: the list is empty, or files are missing or empty (0 bytes); the message names them (the first
            ``LISTED_FILES``) and counts them.
    """
    datalist = [dict(item) for item in datalist]
    if not datalist:
        raise ValueError(f"{source} lists no cases.")
    keys = ("image", "label") if keys is None else keys
    files = [str(item[key]) for item in datalist for key in keys if key in item]
    missing, empty = [], []
    for path in files:
        if not os.path.isfile(path):
            missing.append(path)
        elif os.path.getsize(path) == 0:
            empty.append(path)
    problems = [f"{len(found)} of its {len(files)} files {what}: {_listing(found)}"
                for found, what in ((missing, "do not exist"), (empty, "are empty (0 bytes)")) if found]
    if problems:
        raise ValueError(f"{source}: {'; '.join(problems)}.")
    return datalist


def pair_files(
    image_dir: str | os.PathLike, image_pattern: str, label_dir: str | os.PathLike, label_pattern: str
) -> list[dict[str, str]]:
    """Pair the images of a folder with their labels by case name: what the ``*`` of each pattern stands for.

    For ISIC 2018, ``pair_files(inputs, "ISIC_*.jpg", ground_truth, "ISIC_*_segmentation.png")`` pairs
    ``ISIC_0000000.jpg`` with ``ISIC_0000000_segmentation.png``. An image without a label, or a label without an
    image (its image deleted or misnamed), stops with an error naming them, instead of a case silently left out.

    Args:
        image_dir: the folder of the images.
        image_pattern: the glob pattern of the image files, with one ``*`` standing for the case name.
        label_dir: the folder of the labels (may be ``image_dir``).
        label_pattern: the glob pattern of the label files, with one ``*`` standing for the case name.

    Returns:
        ``[{"image": path, "label": path}, ...]``, sorted by case name.

    Raises:
        FileNotFoundError: a folder does not exist, or no file matches a pattern in it.
        ValueError: a pattern does not have exactly one ``*``; files without a partner (the message names them and
            the partner each one lacks), or empty files (see :func:`check_datalist`).
    """
    images, labels = _cases(image_dir, image_pattern), _cases(label_dir, label_pattern)
    problems = []
    for kind, files, partners, partner_pattern, partner_dir in (
            ("image", images, labels, label_pattern, label_dir), ("label", labels, images, image_pattern, image_dir)):
        alone = [files[case] for case in sorted(files.keys() - partners.keys())]
        if alone:
            problems.append(f"{len(alone)} {kind}(s) without a partner {partner_pattern} in {partner_dir}: "
                            f"{_listing(alone)}")
    if problems:
        raise ValueError(f"cannot pair images and labels by case name: {'; '.join(problems)}.")
    datalist = [{"image": images[case], "label": labels[case]} for case in sorted(images)]
    return check_datalist(datalist, source=f"the pairs of {os.path.join(image_dir, image_pattern)} and "
                                           f"{os.path.join(label_dir, label_pattern)}")


def _cases(folder: str | os.PathLike, pattern: str) -> dict[str, str]:
    """``{case name: path}`` of the files in ``folder`` matching ``pattern`` (one ``*``: the case name)."""
    if pattern.count("*") != 1:
        raise ValueError(f"the file pattern {pattern!r} must have exactly one '*', standing for the case name.")
    prefix, suffix = pattern.split("*")
    return {os.path.basename(path)[len(prefix):len(os.path.basename(path)) - len(suffix)]: path
            for path in find_files(folder, pattern)}


def _channel_count(image: Any, channel_first: bool) -> int:
    """The channels of a loaded image: its first dimension once channel-first, else the reader's channel dimension
    (1 where the reader found none)."""
    if channel_first:
        return int(image.shape[0])
    channel_dim = image.meta.get("original_channel_dim") if isinstance(image, MetaTensor) else None
    if channel_dim in (None, "no_channel") or (isinstance(channel_dim, float) and math.isnan(channel_dim)):
        return 1
    return int(image.shape[int(channel_dim)])


def _channel_error(key: str, image: Any, found: int, expected: int) -> str:
    """The message for a file with ``found`` channels where ``key`` needs ``expected``."""
    mode = image.meta.get("mode") if isinstance(image, MetaTensor) else None
    kind = f" ({PIL_MODES.get(mode, mode)}, PIL mode {mode!r})" if isinstance(mode, str) else ""
    wanted = {1: " (grayscale)", 3: " (RGB)"}.get(expected, "") if kind else ""
    return (f"the {key!r} file {_source(image)} has {found} channel(s){kind}, but {expected}{wanted} are expected: "
            f"convert it, or leave it out of the dataset.")


def _spatial_size(name: str, value: Any, spatial_dims: int | None, min_size: int) -> tuple[int, ...]:
    """``value`` as one size per spatial dimension, checked (see :func:`check_bundle_options`)."""
    allowed = f"a list of integers >= {min_size}" if spatial_dims is None else \
        f"an integer >= {min_size}, or a list of {spatial_dims} of them"
    size = (value,) * spatial_dims if spatial_dims is not None and _is_int(value) else value
    is_list = isinstance(size, Sequence) and not isinstance(size, str) and len(size) > 0
    if (not is_list or (spatial_dims is not None and len(size) != spatial_dims)
            or not all(_is_int(edge) and edge >= min_size for edge in size)):
        raise _bad_option(name, value, f"must be {allowed}")
    return tuple(int(edge) for edge in size)


def _is_int(value: Any) -> bool:
    """Whether ``value`` is an integer (``True`` and ``False`` are not)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_network_input(network: nn.Module, in_channels: int, size: tuple[int, ...], name: str, value: Any) -> None:
    """Raise if ``network`` does not run on a ``(1, in_channels, *size)`` input, suggesting a size it runs on."""
    model = copy.deepcopy(network).to("meta").eval()

    def failure(shape: tuple[int, ...]) -> Exception | None:
        try:
            with torch.no_grad():
                model(torch.zeros((1, in_channels, *shape), device="meta"))
        except NotImplementedError:  # an operation without a meta kernel: the network cannot be tried here
            return None
        except Exception as error:  # too small, or not a multiple of what its strides need
            return error
        return None

    error = failure(size)
    if error is None:
        return
    steps = (2**k for k in range(1, int(math.log2(MAX_SIZE_STEP)) + 1))
    larger = (tuple(-(-edge // step) * step for edge in size) for step in steps)
    suggestion = next((shape for shape in larger if failure(shape) is None), None)
    hint = f"; the next larger size it takes is {list(suggestion)}" if suggestion else ""
    first_line = str(error).partition("\n")[0]
    raise _bad_option(name, value, f"the network ({type(network).__name__}) does not run on inputs of spatial size "
                                   f"{list(size)}, too small or not a multiple it can take ({type(error).__name__}: "
                                   f"{first_line}){hint}") from error


def _check_device(device: Any) -> None:
    """Raise if ``device`` is not a device this machine has."""
    try:
        torch.empty(0, device=torch.device(device))
    except Exception as error:  # a bad name, or no such device here (torch without CUDA raises AssertionError)
        available = ["cpu", *(f"cuda:{index}" for index in range(torch.cuda.device_count()))]
        if torch.backends.mps.is_available():
            available.append("mps")
        raise _bad_option("device", device, f"this machine cannot use it ({type(error).__name__}: {_reason(error)}); "
                                            f"available: {', '.join(available)}", shown=device) from error


def _bad_option(name: str, value: Any, allowed: str, shown: Any = None) -> ValueError:
    """``ValueError("bad option --NAME VALUE: ALLOWED")``; ``shown`` is printed as text (paths, devices), else the
    value's ``repr``."""
    return ValueError(f"bad option --{name} {value!r}: {allowed}." if shown is None else
                      f"bad option --{name} {shown}: {allowed}.")


def _reason(error: BaseException) -> str:
    """An error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__


def _listing(paths: Sequence[str]) -> str:
    """The first ``LISTED_FILES`` paths, then how many more."""
    more = len(paths) - LISTED_FILES
    return ", ".join(paths[:LISTED_FILES]) + (f" and {more} more" if more > 0 else "")


def _source(image: Any) -> str:
    """The file an image was read from, or a placeholder when it carries no meta data."""
    if isinstance(image, MetaTensor):
        return str(image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "(unknown file)"))
    return "(unknown file)"
