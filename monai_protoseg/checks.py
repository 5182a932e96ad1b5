"""Dictionary transforms that stop a run on bad data with an error naming the file.

MONAI's ``LoadImaged`` reports a file that is truncated inside its compressed body as a bare ``EOFError``, and a label
whose shape differs from its image surfaces later as a collate error about tensor sizes. Neither names the file.
:class:`CheckedLoadImaged` and :class:`CheckSpatialShaped` do, so a bundle stops on the first bad case with a message
that says which one, before it writes anything for it.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping
from typing import Any

from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import LoadImaged, MapTransform
from monai.utils import ImageMetaKey

__all__ = ["CheckedLoadImaged", "CheckSpatialShaped"]


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
    an unknown format, or a file truncated or corrupt anywhere in it.

    Raises:
        RuntimeError: ``"cannot read image file PATH: ..."``, with the reader's own error chained.
    """

    def __init__(self, keys: KeysCollection, *args: Any, **kwargs: Any) -> None:
        super().__init__(keys, *args, **kwargs)
        self._loader = _FileNamingLoader(self._loader)


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


def _source(image: Any) -> str:
    """The file an image was read from, or a placeholder when it carries no meta data."""
    if isinstance(image, MetaTensor):
        return str(image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "(unknown file)"))
    return "(unknown file)"
