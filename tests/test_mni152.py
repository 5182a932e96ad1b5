"""The MNI152 tissue data: loader against numpy block means of nilearn's files, the label rule against an explicit
formulation, the split rule's separation, and the written dataset read back with MONAI."""

from __future__ import annotations

import builtins
import json
import pathlib

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImage

from monai_protoseg.mni152 import (
    FIELD_OF_VIEW_MM,
    MNI152_SHAPE,
    load_mni152,
    mni152_axial_slices,
    mni152_grid_affine,
    split_by_blocks,
    tissue_labels,
    write_mni152_tissue_dataset,
)

NILEARN_MISSING = "nilearn is not installed: pip install -c constraints.txt -e '.[examples]'"


@pytest.fixture(scope="module")
def raw() -> dict[str, np.ndarray]:
    """nilearn's three files as read by nibabel, divided by 255, and the template's affine."""
    datasets = pytest.importorskip("nilearn.datasets", reason=NILEARN_MISSING)
    files = {"t1": datasets.MNI152_FILE_PATH, "gm": datasets.GM_MNI152_FILE_PATH, "wm": datasets.WM_MNI152_FILE_PATH}
    volumes = {key: np.asarray(nib.load(path).dataobj, dtype=np.float64) / 255 for key, path in files.items()}
    volumes["affine"] = nib.load(files["t1"]).affine
    return volumes


def labels_by_cases(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """The label rule spelt out case by case: background unless a tissue beats it, grey matter wins a tie with white."""
    background = 1 - gm - wm
    grey = (gm > background) & (gm >= wm)
    white = (wm > background) & (wm > gm)
    return np.where(white, 2, np.where(grey, 1, 0)).astype(np.uint8)


def test_label_rule_matches_the_explicit_formulation_with_ties():
    rng = np.random.default_rng(0)
    gm = rng.integers(0, 256, 10000).astype(np.float32) / 255
    wm = (rng.integers(0, 256, 10000).astype(np.float32) / 255) * (1 - gm)  # gm + wm <= 1, as probabilities
    ties = np.array([[0.5, 0.25, 0.4, 0.5, 0.0, 0.0], [0.25, 0.5, 0.4, 0.0, 0.5, 0.0]], np.float32)  # gm, wm pairs
    gm, wm = np.concatenate([gm, ties[0]]), np.concatenate([wm, ties[1]])
    labels = tissue_labels(torch.from_numpy(gm), torch.from_numpy(wm))
    assert labels.dtype == torch.uint8
    np.testing.assert_array_equal(labels.numpy(), labels_by_cases(gm, wm))
    # grey wins; white wins; grey ties white above background: grey; background ties grey, then white: background
    assert labels[-6:].tolist() == [1, 2, 1, 0, 0, 0]
    with pytest.raises(ValueError, match="same shape"):
        tissue_labels(torch.zeros(3), torch.zeros(4))


def test_slices_are_block_means_of_the_files_at_the_affines_position(raw):
    """At an integer factor (96 pixels of 2 mm, 2 mm slabs), every slice is the mean of the 2 x 2 x 2 template voxels
    that ``mni152_grid_affine`` says it covers, rows anterior to posterior and columns left to right."""
    slices = mni152_axial_slices(96, slice_thickness=2, min_brain_fraction=0.2)
    affine = mni152_grid_affine(96, 2)
    to_voxel = np.linalg.inv(raw["affine"]) @ affine
    assert slices["t1"].shape == slices["label"].shape == (len(slices["z"]), 96, 96)
    assert torch.all(slices["z"][1:] > slices["z"][:-1])
    for i, z in enumerate(slices["z"].tolist()):
        # voxel centre of pixel (0, 0) of slab z, minus half a block: the block's first voxel
        x0, y_last, z0 = (to_voxel @ [0, 0, z, 1])[:3] - 0.5
        x0, y_last, z0 = int(round(x0)), int(round(y_last + 1)), int(round(z0))
        for key in ("t1", "gm", "wm"):
            block = raw[key][x0:x0 + 192, y_last - 191:y_last + 1, z0:z0 + 2]  # (x, y, z), y ascending
            expected = block.reshape(96, 2, 96, 2, 2).mean(axis=(1, 3, 4))  # (column x, y ascending)
            np.testing.assert_allclose(slices[key][i].numpy(), expected.T[::-1], atol=1e-6, err_msg=f"{key} z={z}")
    np.testing.assert_array_equal(slices["label"].numpy(), labels_by_cases(slices["gm"].numpy(), slices["wm"].numpy()))
    brain = (slices["label"] > 0).flatten(1).float().mean(1)
    assert brain.min() >= 0.2


def test_the_field_of_view_holds_all_of_the_brain(raw):
    """With every slab kept, the slices hold all the tissue of the template: the mean over a pixel times its area
    adds up to the template's total (nothing cut off by the 192 mm square)."""
    slices = mni152_axial_slices(64, slice_thickness=1, min_brain_fraction=0)
    assert slices["z"].tolist() == list(range(MNI152_SHAPE[2]))
    pixel_area = (FIELD_OF_VIEW_MM / 64) ** 2
    for key in ("gm", "wm"):
        assert slices[key].double().sum().item() * pixel_area == pytest.approx(raw[key].sum(), rel=1e-5)
    volumes = load_mni152()
    assert {key: tuple(volumes[key].shape) for key in ("t1", "gm", "wm")} == dict.fromkeys(("t1", "gm", "wm"),
                                                                                             MNI152_SHAPE)
    np.testing.assert_array_equal(volumes["affine"], raw["affine"])


def test_a_missing_nilearn_says_how_to_install_it(monkeypatch):
    real_import = builtins.__import__

    def no_nilearn(name, *args, **kwargs):
        if name.startswith("nilearn"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nilearn)
    with pytest.raises(ImportError, match=r'pip install -c constraints.txt -e "\.\[examples\]"'):
        load_mni152()


@pytest.mark.parametrize("seed", range(20))
def test_split_keeps_every_split_apart(seed):
    rng = np.random.default_rng(seed)
    block_size = int(rng.integers(2, 7))
    gap = int(rng.integers(1, block_size))
    z = sorted(rng.choice(200, size=int(rng.integers(40, 120)), replace=False).tolist())
    fractions = {"validation": 0.25, "test": float(rng.choice([0.0, 0.15]))}
    splits = split_by_blocks(z, block_size=block_size, gap=gap, fractions=fractions, seed=seed)
    assert split_by_blocks(z[::-1], block_size=block_size, gap=gap, fractions=fractions, seed=seed) == splits[::-1]
    assigned = [(index, split) for index, split in zip(z, splits) if split is not None]
    for a, split_a in assigned:
        for b, split_b in assigned:
            if split_a != split_b:
                assert abs(a - b) > gap, (a, split_a, b, split_b)
    assert {split for _, split in assigned} == {"train", "validation"} | ({"test"} if fractions["test"] else set())
    # whole blocks: slabs of one block share a split; only the first `gap` slabs of a block may be left out
    for index, split in zip(z, splits):
        position = (index - z[0]) % block_size
        same_block = [s for i, s in zip(z, splits) if (i - z[0]) // block_size == (index - z[0]) // block_size]
        assert len({s for s in same_block if s is not None}) <= 1
        assert split is not None or position < gap


def test_split_errors_name_the_argument():
    with pytest.raises(ValueError, match="gap must be less than block_size"):
        split_by_blocks(range(10), block_size=2, gap=2)
    with pytest.raises(ValueError, match="fractions"):
        split_by_blocks(range(10), fractions={"train": 0.5})
    with pytest.raises(ValueError, match="keep one for training"):
        split_by_blocks(range(8), block_size=4, fractions={"validation": 0.25, "test": 0.25})
    with pytest.raises(ValueError, match="distinct"):
        split_by_blocks([1, 1, 2])


def test_written_dataset_reads_back_with_monai(raw, tmp_path):
    written = write_mni152_tissue_dataset(tmp_path, image_size=32, slice_thickness=4, block_size=2, gap=1,
                                          validation_fraction=0.3, test_fraction=0.2, seed=3)
    slices = mni152_axial_slices(32, slice_thickness=4, min_brain_fraction=0.1)
    by_z = {z: i for i, z in enumerate(slices["z"].tolist())}
    splits = {}
    for split in ("train", "validation", "test"):
        datalist = load_decathlon_datalist(tmp_path / split / "dataset.json")
        assert json.loads((tmp_path / split / "dataset.json").read_text())["labels"] == {
            "0": "background", "1": "grey_matter", "2": "white_matter"}
        for item in datalist:
            z = int(pathlib.Path(item["image"]).name[len("mni152_z"):len("mni152_z") + 3])
            splits[z] = split
            image, label = LoadImage(image_only=True)(item["image"]), LoadImage(image_only=True)(item["label"])
            assert image.shape == label.shape == (32, 32)
            np.testing.assert_array_equal(image.numpy(), slices["t1"][by_z[z]].numpy())
            np.testing.assert_array_equal(label.numpy(), slices["label"][by_z[z]].numpy())
            expected_affine = mni152_grid_affine(32, 4) @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, z],
                                                                    [0, 0, 0, 1]])
            np.testing.assert_allclose(nib.load(item["image"]).affine, expected_affine)
    assert [(entry["z"], entry["split"]) for entry in written] == sorted(splits.items())
    assert all(pathlib.Path(entry["image"]).is_file() and pathlib.Path(entry["label"]).is_file() for entry in written)
    for a, split_a in splits.items():  # no slab of a split next to a slab of another
        assert splits.get(a + 1, split_a) == split_a
    expected = split_by_blocks(slices["z"].tolist(), block_size=2, gap=1, fractions={"validation": 0.3, "test": 0.2},
                               seed=3)
    assert {z: s for z, s in zip(slices["z"].tolist(), expected) if s is not None} == splits
