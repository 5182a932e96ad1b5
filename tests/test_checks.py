"""CheckedLoadImaged and CheckSpatialShaped: bad files and mismatched labels stop with an error naming the file."""

from __future__ import annotations

import gzip
import os
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from monai_protoseg import CheckedLoadImaged, CheckSpatialShaped


@pytest.fixture()
def case(tmp_path):
    image = np.arange(6 * 7 * 5, dtype=np.float32).reshape(6, 7, 5)
    paths = {"image": tmp_path / "image.nii.gz", "label": tmp_path / "label.nii.gz"}
    nib.save(nib.Nifti1Image(image, np.eye(4)), paths["image"])
    nib.save(nib.Nifti1Image((image > 100).astype(np.uint8), np.eye(4)), paths["label"])
    return image, {key: str(path) for key, path in paths.items()}


def test_loads_exactly_what_loadimaged_loads(case):
    image, paths = case
    ours = CheckedLoadImaged(["image", "label"], ensure_channel_first=True)(paths)
    theirs = LoadImaged(["image", "label"], ensure_channel_first=True)(paths)
    for key in ("image", "label"):
        assert torch.equal(ours[key], theirs[key])
        assert ours[key].meta["filename_or_obj"] == paths[key]
    assert np.array_equal(ours["image"][0].numpy(), image)


@pytest.mark.parametrize("damage", ["missing", "truncated body", "not an image"])
def test_a_file_that_cannot_be_read_is_named(case, damage):
    _, paths = case
    label = paths["label"]
    content = open(label, "rb").read()
    if damage == "missing":
        os.remove(label)
    elif damage == "truncated body":
        assert gzip.decompress(content)  # a valid file before: only the cut breaks it
        open(label, "wb").write(content[: len(content) * 2 // 3])
    else:
        open(label, "wb").write(b"this is not a NIfTI file")
    with pytest.raises(RuntimeError, match=re.escape(f"cannot read image file {label}: ")) as error:
        CheckedLoadImaged(["image", "label"])(paths)
    assert error.value.__cause__ is not None  # the reader's own error stays in the chain
    assert paths["image"] not in str(error.value)  # the image was fine: only the label is named


def test_spatial_shapes_that_differ_name_both_files(case, tmp_path):
    image, paths = case
    nib.save(nib.Nifti1Image(np.zeros((6, 8, 5), np.uint8), np.eye(4)), paths["label"])
    check = CheckSpatialShaped("label")
    with pytest.raises(ValueError) as error:
        check(CheckedLoadImaged(["image", "label"], ensure_channel_first=True)(paths))
    assert str(error.value) == (f"the 'label' image {paths['label']} has spatial shape (6, 8, 5), but its 'image' "
                                f"image {paths['image']} has (6, 7, 5).")


def test_channels_may_differ_and_missing_labels_can_be_allowed():
    image = MetaTensor(torch.zeros(4, 5, 6, 7), meta={"filename_or_obj": "brats.nii.gz"})
    label = MetaTensor(torch.zeros(1, 5, 6, 7))
    data = {"image": image, "label": label}
    assert CheckSpatialShaped("label")(data)["label"] is label  # 4 channels against 1: only space is compared
    assert CheckSpatialShaped("label", allow_missing_keys=True)({"image": image}) == {"image": image}
    with pytest.raises(KeyError, match="label"):
        CheckSpatialShaped("label")({"image": image})
    with pytest.raises(KeyError, match="reference key 'image'"):
        CheckSpatialShaped("label")({"label": label})
    with pytest.raises(ValueError, match=r"\(unknown file\) has spatial shape \(5, 6\)"):
        CheckSpatialShaped("label")({"image": image, "label": torch.zeros(1, 5, 6)})
