"""The five zoo bundles as they are, on fake data with seeded weights: their plain evaluation (inference for prostate)
runs from a copy as a user runs it and writes its own outputs; the fake data has the grid changes and classes the
conformance suite relies on; the independent reference is right on trivial cases and finite on spleen."""

from __future__ import annotations

import copy
import csv
import math
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.inferers import SlidingWindowInferer
from PIL import Image

from .reference import case_name, class_dice, label_on_grid, layer_sa, parse_bundle, reference_sa
from .zoo_bundles import BUNDLES, PreparedBundle, build_network

# file grid (as loaded: NIfTI voxel axes, or width x height of a frame), its axis codes, and the network grid
GRIDS = {
    "spleen_ct_segmentation": ((29, 89, 21), ("P", "L", "S"), (48, 48, 32)),
    "brats_mri_segmentation": ((48, 48, 32), ("L", "P", "S"), (48, 48, 32)),
    "endoscopic_tool_segmentation": ((120, 88), None, (256, 160)),
    "multi_organ_segmentation": ((14, 62, 29), ("I", "L", "A"), (64, 64, 64)),
    "prostate_mri_anatomy": ((46, 71, 8), ("L", "P", "S"), (64, 64, 32)),
}
# what each plain run writes: MetricsSaver's files (key metric first), and the postfix of saved predictions
METRICS = {
    "spleen_ct_segmentation": ("val_mean_dice",),
    "brats_mri_segmentation": ("val_mean_dice",),
    "endoscopic_tool_segmentation": ("val_iou", "val_mean_dice"),
    "multi_organ_segmentation": ("val_mean_dice",),
    "prostate_mri_anatomy": (),
}
PREDICTIONS = {"brats_mri_segmentation": "seg", "multi_organ_segmentation": "trans", "prostate_mri_anatomy": "trans"}


def first_file(item: dict) -> str:
    image = item["image"]
    return image[0] if isinstance(image, list) else image


def read_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


# --------------------------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("shape", [(12, 10), (8, 10, 6)])
def test_reference_sa_trivial_cases(shape: tuple[int, ...]) -> None:
    """Features equal to the label's one-hot: SA 1; constant features: a tie everywhere, empty map, SA 0; no
    foreground weight: no prototype, NaN; an empty label: NaN (MONAI's ignore_empty)."""
    label = torch.zeros(shape, dtype=torch.bool)
    label[(slice(2, 6),) * len(shape)] = True
    onehot = torch.stack([label, ~label]).double()[None]
    prob = (0.1 + 0.8 * label.double())[None, None]
    assert layer_sa(onehot, prob, label) == 1.0
    assert layer_sa(torch.ones_like(onehot), prob, label) == 0.0
    assert math.isnan(layer_sa(onehot, torch.zeros_like(prob), label))
    assert math.isnan(layer_sa(onehot, prob, torch.zeros_like(label)))
    # features on a grid twice as coarse, resized (bi/tri)linearly: still exactly the label when it is blocky
    coarse = onehot[(..., *[slice(None, None, 2)] * len(shape))]
    assert coarse.shape[2:] != onehot.shape[2:]
    assert layer_sa(coarse, prob, label) > 0.5
    assert class_dice(label, label) == 1.0 and class_dice(~label, label) == 0.0


def test_case_name() -> None:
    assert case_name("/data/imagesTr/spleen_1.nii.gz") == "spleen_1"
    assert case_name(["/x/Brats18_A_1_t1ce.nii.gz", "/x/Brats18_A_1_t1.nii.gz"]) == "Brats18_A_1_t1ce"
    assert case_name("/d/val/video_01/video_01_frame_0001.jpg") == "video_01_frame_0001"


def test_seeded_weights_rebuild(prepared_bundles: dict[str, PreparedBundle]) -> None:
    """The config's network_def after ``torch.manual_seed(seed)`` is the network in ``models/model.pt``."""
    prepared = prepared_bundles["spleen_ct_segmentation"]
    torch.manual_seed(prepared.seed)
    rebuilt = build_network(prepared.config_files, prepared.overrides).state_dict()
    saved = torch.load(prepared.root / "models" / "model.pt")
    assert saved.keys() == rebuilt.keys()
    assert all(torch.equal(saved[key], rebuilt[key]) for key in saved)


def test_spleen_reference_is_finite(prepared_bundles: dict[str, PreparedBundle]) -> None:
    """Spleen: one window covers each preprocessed case, the plain forward equals the bundle's inferer, and the
    reference true Dice and SA on the network grid are finite scores for every case."""
    prepared = prepared_bundles["spleen_ct_segmentation"]
    reference = reference_sa(prepared)
    cases = {case_name(first_file(item)) for item in parse_bundle(prepared).get_parsed_content("validate#dataset#data")}
    assert set(reference.dice) == {(case, 1) for case in cases} and len(cases) == prepared.n_cases
    assert set(reference.grid.values()) == {GRIDS[prepared.entry.name][2]}
    assert max(reference.inferer_diff.values()) <= 1e-5
    for key, dice in reference.dice.items():
        assert math.isfinite(dice) and 0 <= dice <= 1, key
        assert set(reference.sa[key]) == set(prepared.entry.layers)
        assert all(math.isfinite(sa) and 0 <= sa <= 1 for sa in reference.sa[key].values()), reference.sa[key]


# ---------------------------------------------------------------------------------------------- the fake data

# overrides that reach into a transform list by index, and the transform each must hit
INDEXED = {"train#deterministic_transforms#3": "Resized", "train#deterministic_transforms#11": "SpatialPadd"}


@pytest.mark.parametrize("name", list(BUNDLES))
def test_indexed_overrides_hit_the_intended_transform(prepared_bundles: dict[str, PreparedBundle], name: str) -> None:
    prepared = prepared_bundles[name]
    parser = parse_bundle(prepared)
    for key in prepared.overrides:
        parent = key.rsplit("#", 1)[0]
        if parent[-1].isdigit():
            assert parser[parent]["_target_"] == INDEXED[parent], key



@pytest.mark.parametrize("name", list(BUNDLES))
def test_fake_data_layout_and_grids(prepared_bundles: dict[str, PreparedBundle], name: str) -> None:
    """The config finds at least 4 evaluation cases; files have an anisotropic spacing and a non-RAS axis order;
    the config's preprocessing changes the grid to exactly one inferer window; every foreground class has a blob
    on the network grid and the image is brighter inside it (on the whole: a correlated image)."""
    prepared = prepared_bundles[name]
    entry, (file_shape, axcodes, network_grid) = prepared.entry, GRIDS[name]
    parser = parse_bundle(prepared)
    items = parser.get_parsed_content(f"{entry.dataset_id}#data")
    preprocessing = parser.get_parsed_content(entry.preprocessing_id)
    inferer = parser.get_parsed_content(entry.inferer_id)
    assert len(items) == prepared.n_cases >= 4
    assert len({case_name(first_file(item)) for item in items}) == len(items)
    for item in items:
        path = first_file(item)
        if entry.spatial_dims == 3:
            image = nib.load(path)
            assert image.shape == file_shape and nib.aff2axcodes(image.affine) == axcodes
            assert len(set(np.round(image.header.get_zooms(), 3))) == 3
        else:
            assert Image.open(path).size == file_shape and Image.open(path).mode == "RGB"
        data = preprocessing(copy.deepcopy(item))
        grid = tuple(data["image"].shape[1:])
        assert grid == network_grid
        if isinstance(inferer, SlidingWindowInferer):
            assert grid == tuple(inferer.roi_size)
        if name != "brats_mri_segmentation":  # BraTS has no spatial transform: its network grid is the file grid
            assert grid != file_shape
        targets = label_on_grid(prepared, item, data)
        image = torch.as_tensor(data["image"]).float().mean(0)
        for k in entry.foreground:
            assert targets[k].sum() >= 20, (path, k, int(targets[k].sum()))
        background = ~targets[list(entry.foreground)].any(0)
        assert image[~background].mean() > image[background].mean(), path


# ------------------------------------------------------------------------------------------------ plain runs


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BUNDLES))
def test_plain_run(prepared_bundles: dict[str, PreparedBundle], plain_runs: dict[str, pathlib.Path], name: str) -> None:
    """``python -m monai.bundle run`` of the bundle's evaluation (inference) configs from its copy: the bundle's
    CheckpointLoader restores the seeded weights, MetricsSaver writes a row per case (named like the reference's
    cases) with scores in [0, 1], and saved predictions are back on the file grid (Invertd)."""
    prepared = prepared_bundles[name]
    output = plain_runs[name]
    assert f"Restored all variables from {prepared.root / 'models' / 'model.pt'}" in (output.parent / "run.log").read_text()
    items = parse_bundle(prepared).get_parsed_content(f"{prepared.entry.dataset_id}#data")
    cases = {case_name(first_file(item)) for item in items}
    for metric in METRICS[name]:
        assert (output / f"{metric}_summary.csv").is_file()
        rows = read_rows(output / f"{metric}_raw.csv")
        assert {case_name(row["filename"]) for row in rows} == cases
        for row in rows:
            scores = [float(value) for key, value in row.items() if key != "filename"]
            assert all(0 <= score <= 1 for score in scores), row
    if METRICS[name]:
        assert METRICS[name][0] in (output / "metrics.csv").read_text()
    if name in PREDICTIONS:
        file_shape, axcodes, _ = GRIDS[name]
        for case in cases:
            saved = nib.load(output / case / f"{case}_{PREDICTIONS[name]}.nii.gz")
            assert saved.shape == file_shape and nib.aff2axcodes(saved.affine) == axcodes
    else:
        assert not list(output.rglob("*.nii.gz")) and not list(output.rglob("*.png"))  # SaveImaged disabled
