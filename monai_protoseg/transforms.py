"""MONAI transforms: network logits to per-class foreground probabilities, and input-image ProtoSeg on a data dict.

MONAI transforms see one item at a time, channel-first without a batch dimension: logits and probabilities are
``(K, *S)``, images ``(C, *S)``, with 1 to 3 spatial dimensions. The math is :mod:`monai_protoseg.protoseg`'s,
called once per class on a batch of one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data.meta_obj import get_track_meta
from monai.transforms import MapTransform, Transform
from monai.utils import TransformBackends, convert_to_dst_type, convert_to_tensor, ensure_tuple

from .protoseg import GUIDES, prototype_map, sa_score

__all__ = ["ForegroundProbability", "ForegroundProbabilityd", "ProtoSegd"]

_ACTIVATIONS = ("softmax", "sigmoid", None)


class ForegroundProbability(Transform):
    """Per-class foreground probabilities ``(K', *S)`` from a network output ``(K, *S)``, one channel per class.

    Class channels follow MONAI's ``DiceMetric`` and :class:`~monai_protoseg.SAScoreHandler`: channel 0 is the
    background and is dropped unless ``include_background=True``, whatever the activation; a single-channel output
    is always kept (it is the one class). Set ``include_background=True`` for multi-label sigmoid networks whose
    channel 0 is a class too (BraTS TC/WT/ET).

    Args:
        activation: ``"softmax"`` (over the channels; needs at least 2), ``"sigmoid"`` (per channel) or ``None``
            (the input holds probabilities already; they are checked to be in [0, 1]).
        include_background: keep channel 0 when there are several channels.

    Raises:
        ValueError: ``activation`` is not one of the above.

    Example:
        >>> ForegroundProbability("softmax")(torch.zeros(3, 4, 4)).shape  # background dropped
        torch.Size([2, 4, 4])
    """

    backend = [TransformBackends.TORCH]

    def __init__(self, activation: str | None = "softmax", include_background: bool = False) -> None:
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be 'softmax', 'sigmoid' or None, got {activation!r}.")
        self.activation = activation
        self.include_background = include_background

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        """Probabilities of the class channels of ``img``.

        Args:
            img: ``(K, *S)`` logits (probabilities when ``activation=None``); a tensor, MetaTensor or array.

        Returns:
            ``(K', *S)`` float32 (float64 for float64 input), a MetaTensor with ``img``'s meta data when meta data
            is tracked (MONAI's default).

        Raises:
            ValueError: ``img`` has no channel or spatial dimension, softmax gets a single channel, or probabilities
                are outside [0, 1]; the message gives the shape.
        """
        img = convert_to_tensor(img, track_meta=get_track_meta())
        shape = tuple(img.shape)
        if img.ndim < 2 or shape[0] == 0:
            raise ValueError(f"expected channel-first (K, *S) with K > 0 and spatial dims, got shape {shape}.")
        if self.activation == "softmax" and shape[0] == 1:
            raise ValueError(
                f"softmax needs a background channel and at least one class, got a single channel (shape {shape}); "
                f"use activation='sigmoid' for a single-channel output."
            )
        values = img.as_subclass(torch.Tensor)
        values = values.to(torch.float64 if values.dtype == torch.float64 else torch.float32)
        if self.activation == "softmax":
            values = torch.softmax(values, dim=0)
        elif self.activation == "sigmoid":
            values = torch.sigmoid(values)
        else:
            low, high = torch.aminmax(values)  # NaN fails both comparisons
            if not (low >= 0 and high <= 1):
                raise ValueError(
                    f"activation=None expects probabilities in [0, 1], got values in "
                    f"[{low.item():.4g}, {high.item():.4g}] (shape {shape})."
                )
        if shape[0] > 1 and not self.include_background:
            values = values[1:]
        return convert_to_dst_type(values, img, dtype=values.dtype)[0]


class ForegroundProbabilityd(MapTransform):
    """Dictionary version of :class:`ForegroundProbability`.

    Args:
        keys: keys of the network outputs ``(K, *S)``.
        activation: ``"softmax"``, ``"sigmoid"`` or ``None`` (see :class:`ForegroundProbability`).
        include_background: keep channel 0 when there are several channels.
        output_keys: where to write the probabilities, one key per entry of ``keys``; ``None`` overwrites ``keys``.
        allow_missing_keys: skip the keys that are not in the data instead of raising ``KeyError``.

    Raises:
        ValueError: ``activation`` is not allowed, or ``output_keys`` does not have one key per entry of ``keys``.

    Example:
        >>> transform = ForegroundProbabilityd("pred", activation="sigmoid", output_keys="prob")
        >>> data = transform({"pred": torch.zeros(1, 4, 4)})
        >>> data["prob"].shape, data["prob"].max().item()
        (torch.Size([1, 4, 4]), 0.5)
    """

    backend = ForegroundProbability.backend

    def __init__(
        self,
        keys: KeysCollection,
        activation: str | None = "softmax",
        include_background: bool = False,
        output_keys: KeysCollection | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.converter = ForegroundProbability(activation, include_background)
        self.output_keys = _one_per_key(self.keys, output_keys, self.keys, "output_keys")

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Write the probabilities of each key to its output key.

        Args:
            data: a dict holding ``(K, *S)`` outputs at ``keys``.

        Returns:
            A shallow copy of ``data`` with ``(K', *S)`` probabilities at the output keys.

        Raises:
            ValueError: an output has a bad shape or values (see :class:`ForegroundProbability`); names the key.
        """
        d = dict(data)
        for key, output_key in self.key_iterator(d, self.output_keys):
            try:
                d[output_key] = self.converter(d[key])
            except ValueError as error:
                raise ValueError(f"ForegroundProbabilityd: key {key!r}: {error}") from error
        return d


class ProtoSegd(MapTransform):
    """Input-image ProtoSeg: prototype maps of the image channels and, when a label is present, their SA scores.

    The channels of the image at each key are the features (e.g. four MRI sequences, RGB). For each class channel
    ``k`` of the probability at ``prob_key``: ``prototype_map(image[None], prob[k:k+1][None], mask[None])`` and,
    when the label is in the data, ``sa_score(image[None], prob[k:k+1][None], label[k:k+1][None], mask[None])``
    (:mod:`monai_protoseg.protoseg`). The SA tells how separable each class is from the raw intensities.

    Output shapes, for ``K`` classes and ``C`` image channels:

    - layer-wise (default): maps ``(K, *S)``, scores ``(K,)``;
    - ``unit_wise=True``: maps ``(K * C, *S)`` class-major (channel ``k * C + c`` is class ``k`` seen by image
      channel ``c`` alone; ``maps.unflatten(0, (K, C))`` separates them), kept channel-first so that MONAI
      transforms and writers handle them as images; scores ``(K, C)``.

    Maps are MetaTensors carrying the image's meta data (affine, applied operations) when meta data is tracked;
    scores are plain float tensors, NaN where undefined (no prototype, or an empty label with ``ignore_empty``).

    Args:
        keys: keys of the images ``(C, *S)``.
        prob_key: key of the guiding foreground probability ``(K, *S)`` in [0, 1], one channel per class (e.g.
            from :class:`ForegroundProbabilityd`), on the image's grid.
        label_key: optional key of a binary label ``(K, *S)``, one channel per class of ``prob``. With one-hot
            labels that include the background, drop it with ``ForegroundProbabilityd(label_key, activation=None)``.
            If the key is not in the data, no score is computed (no error).
        mask_key: optional key of a binary ``(1, *S)`` mask; only its pixels feed the prototypes.
        map_keys: keys for the maps, one per entry of ``keys``; default ``f"{key}_{map_key_postfix}"``.
        map_key_postfix: postfix of the default map keys.
        score_keys: keys for the SA scores, one per entry of ``keys``; default ``f"{key}_{score_key_postfix}"``.
        score_key_postfix: postfix of the default score keys.
        unit_wise: one map and score per image channel instead of one for all channels.
        ignore_empty: empty-label rule of :func:`~monai_protoseg.sa_score` (NaN when ``True``; else 1 if the map
            is empty too, 0 otherwise).
        allow_missing_keys: skip the image keys that are not in the data instead of raising ``KeyError``.
        guide: ``"soft"`` (prototypes weighted by the probability) or ``"binary"`` (by the probability > 0.5).

    Raises:
        ValueError: ``map_keys`` or ``score_keys`` does not have one key per entry of ``keys``, or ``guide`` is
            unknown.

    Example:
        >>> label = torch.zeros(1, 32, 32); label[:, 8:24, 8:24] = 1
        >>> data = {"image": label + 0.1 * torch.rand(1, 32, 32), "prob": 0.2 + 0.6 * label, "label": label}
        >>> data = ProtoSegd("image", prob_key="prob", label_key="label")(data)
        >>> data["image_protoseg_map"].shape, data["image_protoseg_sa"]
        (torch.Size([1, 32, 32]), tensor([1.]))
    """

    backend = [TransformBackends.TORCH]

    def __init__(
        self,
        keys: KeysCollection,
        prob_key: str,
        label_key: str | None = None,
        mask_key: str | None = None,
        map_keys: KeysCollection | None = None,
        map_key_postfix: str = "protoseg_map",
        score_keys: KeysCollection | None = None,
        score_key_postfix: str = "protoseg_sa",
        unit_wise: bool = False,
        ignore_empty: bool = True,
        allow_missing_keys: bool = False,
        guide: str = "soft",
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if guide not in GUIDES:
            raise ValueError(f"guide must be one of {GUIDES}, got {guide!r}.")
        self.guide = guide
        self.prob_key = prob_key
        self.label_key = label_key
        self.mask_key = mask_key
        self.map_keys = _one_per_key(self.keys, map_keys, _postfixed(self.keys, map_key_postfix), "map_keys")
        self.score_keys = _one_per_key(self.keys, score_keys, _postfixed(self.keys, score_key_postfix), "score_keys")
        self.unit_wise = unit_wise
        self.ignore_empty = ignore_empty

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        """Add the maps (and scores, when the label is present) of each image to the data.

        Args:
            data: a dict holding the images, ``prob_key``, and optionally ``label_key`` and ``mask_key``.

        Returns:
            A shallow copy of ``data`` with the maps at ``map_keys`` and, when the label is present, the scores at
            ``score_keys``.

        Raises:
            KeyError: ``prob_key`` or a given ``mask_key`` is not in the data (or an image key, unless
                ``allow_missing_keys``).
            ValueError: the image and prob do not share the grid, the label does not match prob, or the core
                functions refuse the inputs (prob outside [0, 1], a non-binary label or mask, ...); the message
                names the keys.
        """
        d = dict(data)
        for key, map_key, score_key in self.key_iterator(d, self.map_keys, self.score_keys):
            image = convert_to_tensor(d[key], track_meta=get_track_meta())
            prob = convert_to_tensor(d[self.prob_key], track_meta=False)
            if prob.ndim < 2 or prob.shape[0] == 0 or image.shape[1:] != prob.shape[1:]:
                raise ValueError(
                    f"ProtoSegd: image {key!r} (C, *S) and prob {self.prob_key!r} (K, *S) must share the spatial "
                    f"grid with K > 0, got shapes {tuple(image.shape)} and {tuple(prob.shape)}."
                )
            label = None
            if self.label_key is not None and self.label_key in d:
                label = convert_to_tensor(d[self.label_key], track_meta=False)
                if label.shape != prob.shape:
                    raise ValueError(
                        f"ProtoSegd: label {self.label_key!r} must have the shape of prob {self.prob_key!r} "
                        f"{tuple(prob.shape)} (one binary channel per class), got {tuple(label.shape)}."
                    )
            mask = None
            if self.mask_key is not None:
                mask = convert_to_tensor(d[self.mask_key], track_meta=False)[None]
            features = image[None]
            maps, scores = [], []
            for k in range(prob.shape[0]):
                prob_k = prob[k : k + 1][None]
                try:
                    options = {"unit_wise": self.unit_wise, "guide": self.guide}
                    maps.append(prototype_map(features, prob_k, mask, **options)[0])
                    if label is not None:
                        target = label[k : k + 1][None]
                        options["ignore_empty"] = self.ignore_empty
                        scores.append(sa_score(features, prob_k, target, mask, **options)[0])
                except ValueError as error:
                    roles = self._roles(key, label is not None)
                    raise ValueError(f"ProtoSegd: {roles}, class channel {k}: {error}") from error
            stacked = torch.cat(maps)  # (K, *S), or (K * C, *S) class-major unit-wise
            d[map_key] = convert_to_dst_type(stacked, image, dtype=stacked.dtype)[0]
            if label is not None:
                d[score_key] = torch.stack(scores)
        return d

    def _roles(self, key: Hashable, scored: bool) -> str:
        """Which data key plays which argument of the core functions, for error messages."""
        roles = [f"features = image {key!r}", f"prob = {self.prob_key!r}"]
        if scored:
            roles.append(f"target = label {self.label_key!r}")
        if self.mask_key is not None:
            roles.append(f"mask = {self.mask_key!r}")
        return ", ".join(roles)


def _one_per_key(
    keys: tuple[Hashable, ...], given: KeysCollection | None, default: tuple[Hashable, ...], name: str
) -> tuple[Hashable, ...]:
    """``given`` as a tuple with one key per entry of ``keys``, or ``default`` when it is ``None``."""
    if given is None:
        return default
    given = ensure_tuple(given)
    if len(given) != len(keys):
        raise ValueError(f"{name} must give one key per entry of keys {keys}, got {given}.")
    return given


def _postfixed(keys: tuple[Hashable, ...], postfix: str) -> tuple[str, ...]:
    """``f"{key}_{postfix}"`` for each key."""
    return tuple(f"{key}_{postfix}" for key in keys)
