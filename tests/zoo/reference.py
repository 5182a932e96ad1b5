"""An independent reference of the per-layer SA (and the true Dice) of a prepared zoo bundle, on the network grid.

For each case of the config's evaluation (or inference) data list: the bundle's own preprocessing (parsed from its
merged configs with the same overrides), the network rebuilt from its config with the seeded ``models/model.pt``,
plain forward hooks on the given layers, one forward pass on the whole preprocessed volume (which the fake data and
the roi_size overrides make exactly one window of the bundle's SlidingWindowInferer: checked, as is the equality of
that forward pass and the bundle's inferer to 1e-5), the bundle's output activation, then the naive formulation of
``tests/naive_protoseg.py`` in float64: features resized to the label grid, prototypes weighted by the class
probability, map, ``p > 0.5``, Dice against the preprocessed label of that class. Nothing of ``monai_protoseg``.
"""

from __future__ import annotations

import copy
import csv
import pathlib
import re
from typing import Any, NamedTuple, Sequence

import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.transforms import LoadImage, ResampleToMatch

from tests.naive_protoseg import naive_dice, naive_prototypes, naive_sa_score, naive_upsampled

from .zoo_bundles import PreparedBundle, seeded_network

INFERER_TOLERANCE = 1e-5
_EXTENSIONS = re.compile(r"(\.nii\.gz|\.nii|\.jpe?g|\.png|\.nrrd|\.mha|\.npy)$", re.IGNORECASE)


class Reference(NamedTuple):
    """``sa[(case, k)][layer]``; ``dice[(case, k)]`` of the binarised prediction; ``grid[case]``, the network grid
    (preprocessed spatial shape); ``inferer_diff[case]``, max |plain forward - bundle inferer| of the logits;
    ``separation[(case, k)][layer]``, how far apart the two prototypes are, relative to the features' spread
    (:func:`prototype_separation`)."""

    sa: dict[tuple[str, int], dict[str, float]]
    dice: dict[tuple[str, int], float]
    grid: dict[str, tuple[int, ...]]
    inferer_diff: dict[str, float]
    separation: dict[tuple[str, int], dict[str, float]]


def prototype_separation(features: torch.Tensor, prob: torch.Tensor) -> float:
    """``||c_fg - c_bg|| / (sqrt(C) max |f - mean f|)`` of resized float64 ``(1, C, *S)`` features: below ~1e-5 the
    two prototypes are the same to float32 precision, and which side of the map a pixel falls on is rounding (a
    network whose prediction hardly varies: random weights)."""
    fg, bg = naive_prototypes(features, prob)
    spread = (features - features.mean(tuple(range(2, features.ndim)), keepdim=True)).abs().amax()
    return float((fg - bg).norm() / (spread * features.shape[1] ** 0.5))


def case_name(filename: Any) -> str:
    """The case of an image: its file name without folder and extensions (the first file of a list)."""
    if isinstance(filename, (list, tuple)):
        filename = filename[0]
    return _EXTENSIONS.sub("", pathlib.Path(str(filename)).name)


def plain(array: Any) -> torch.Tensor:
    """A plain tensor (no MetaTensor bookkeeping in the computations)."""
    return array.as_tensor() if isinstance(array, MetaTensor) else torch.as_tensor(array)


def parse_bundle(prepared: PreparedBundle) -> ConfigParser:
    """The bundle's configs merged in order, with the prepared overrides, as ``monai.bundle run`` reads them."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in prepared.config_files])
    parser.update(prepared.overrides)
    return parser


def layer_sa(features: torch.Tensor, prob: torch.Tensor, target: torch.Tensor) -> float:
    """SA of one layer for one image and class, naive formulation in float64.

    Args:
        features: ``(1, C, *S_f)``, resized to the grid of ``prob`` if needed.
        prob: ``(1, 1, *S)`` foreground probability.
        target: ``(*S)`` boolean label of the class.
    """
    return float(naive_sa_score(features.double(), prob.double(), target[None, None].bool())[0])


def class_dice(prediction: torch.Tensor, target: torch.Tensor) -> float:
    """Dice of a boolean prediction against a boolean label (MONAI's rule: NaN for an empty label)."""
    return naive_dice(prediction.bool(), target.bool())


def _label_files(prepared: PreparedBundle) -> dict[str, str]:
    """Inference-only bundles: image path (as the config builds it, ``dataset_dir + csv path``) -> label path."""
    entry, prefix = prepared.entry, prepared.overrides["dataset_dir"]
    with open(prepared.data_dir / "test.csv", newline="") as stream:
        return {prefix + row["t2"]: prefix + row[entry.label_column] for row in csv.DictReader(stream)}


def label_on_grid(prepared: PreparedBundle, item: dict, data: dict) -> torch.Tensor:
    """The label of data-list ``item`` on the network grid, as ``(K, *S)`` booleans indexed by class (or channel);
    ``data`` is the item after the bundle's preprocessing."""
    entry, image = prepared.entry, data["image"]
    if entry.label_kind == "channels":  # e.g. BraTS TC / WT / ET after ConvertToMultiChannelBasedOnBratsClassesd
        return plain(data["label"]).bool()
    if entry.label_kind == "index":
        label = plain(data["label"])[0]
    else:  # the label file resampled (nearest) onto the preprocessed image's grid (affine and shape)
        raw = LoadImage(image_only=True, ensure_channel_first=True)(_label_files(prepared)[item["image"]])
        label = plain(ResampleToMatch(mode="nearest")(raw, img_dst=image))[0]
    classes = max(entry.foreground) + 1
    return torch.stack([label.float().round() == k for k in range(classes)])


def reference_sa(
    prepared: PreparedBundle, layers: Sequence[str] | None = None, sa_classes: Sequence[int] | None = None
) -> Reference:
    """Per case and foreground class: SA of each of ``layers`` (default: the entry's) for the classes ``sa_classes``
    (default: every foreground class), and the true Dice of every foreground class."""
    entry = prepared.entry
    layers = list(entry.layers if layers is None else layers)
    sa_classes = list(entry.foreground if sa_classes is None else sa_classes)
    parser = parse_bundle(prepared)
    preprocessing = parser.get_parsed_content(entry.preprocessing_id)
    items = parser.get_parsed_content(f"{entry.dataset_id}#data")
    inferer = parser.get_parsed_content(entry.inferer_id)
    network = seeded_network(prepared)
    result = Reference({}, {}, {}, {}, {})
    for item in items:
        data = preprocessing(copy.deepcopy(item))
        image = data["image"]
        case = case_name(image.meta["filename_or_obj"])
        grid = tuple(image.shape[1:])
        if isinstance(inferer, SlidingWindowInferer):
            assert grid == tuple(inferer.roi_size), f"{case}: preprocessed {grid} is not one window {inferer.roi_size}"
        batch = plain(image)[None].float()
        features: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            by_inferer = plain(inferer(batch, network))
            # a copy: EfficientNet's next block adds to a block's output in place
            hooks = [network.get_submodule(name).register_forward_hook(
                lambda module, args, output, name=name: features.__setitem__(name, output.detach().clone()))
                for name in layers]
            try:
                logits = network(batch)
            finally:
                for hook in hooks:
                    hook.remove()
        missing = [name for name in layers if not isinstance(features.get(name), torch.Tensor)]
        assert not missing, f"{case}: no tensor output from {missing} (hooks fire only on modules called as module(x))"
        # step 1 once per layer: the features resized to the label grid, float64, all channels
        resized = {name: naive_upsampled(features[name].double(), grid) for name in layers}
        diff = float((logits - by_inferer).abs().max())
        assert diff <= INFERER_TOLERANCE, f"{case}: forward and the bundle's inferer differ by {diff}"
        logits = logits.double()
        if entry.activation == "softmax":
            prob, prediction = torch.softmax(logits, 1), logits.argmax(1)[0]
            predicted = {k: prediction == k for k in entry.foreground}
        else:
            prob = torch.sigmoid(logits)
            predicted = {k: prob[0, k] > 0.5 for k in entry.foreground}
        targets = label_on_grid(prepared, item, data)
        assert tuple(targets.shape[1:]) == grid, f"{case}: label grid {tuple(targets.shape[1:])} != {grid}"
        for k in entry.foreground:
            result.dice[case, k] = class_dice(predicted[k], targets[k])
        for k in sa_classes:
            result.sa[case, k] = {name: layer_sa(resized[name], prob[:, k:k + 1], targets[k]) for name in layers}
            result.separation[case, k] = {name: prototype_separation(resized[name], prob[:, k:k + 1]) for name in layers}
        result.grid[case], result.inferer_diff[case] = grid, diff
    return result
