"""The weakly labelled dataset: seeded, about 65% lesions, true masks where the lesion is, files that load back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from monai_protoseg.weak import make_weak_case, read_weak_dataset, write_weak_dataset
from monai_protoseg.weak.data import IMAGE_NOISE, LESION_CONTRAST, LESION_SIGMA


def test_a_case_is_fixed_by_seed_and_index():
    first, again, other = make_weak_case(3, 7), make_weak_case(3, 7), make_weak_case(3, 8)
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["mask"], again["mask"])
    assert not np.array_equal(first["image"], other["image"])
    assert first["image"].dtype == np.float32 and first["mask"].dtype == np.uint8


def test_lesion_prevalence_is_about_the_probability():
    labels = np.array([make_weak_case(0, i, size=32)["label"] for i in range(400)])
    # binomial(400, 0.65): standard deviation 0.024, so 0.58 .. 0.72 is about three of them
    assert 0.58 < labels.mean() < 0.72
    assert {make_weak_case(0, i, size=32, lesion_probability=0.0)["label"] for i in range(20)} == {0}
    assert {make_weak_case(0, i, size=32, lesion_probability=1.0)["label"] for i in range(20)} == {1}


@pytest.mark.parametrize("index", range(12))
def test_the_mask_is_the_lesions_half_maximum_ellipse(index):
    case = make_weak_case(1, index, size=64, lesion_probability=1.0)
    mask = case["mask"].astype(bool)
    assert case["label"] == 1 and LESION_CONTRAST[0] <= case["contrast"] <= LESION_CONTRAST[1]
    # the half-maximum ellipse of a Gaussian has semi-axes 1.1774 sigma: its area lies between those of the
    # smallest and largest sigmas, with a pixel's slack around the perimeter
    low, high = (math.pi * (1.1774 * s * 64) ** 2 for s in LESION_SIGMA)
    assert 0.6 * low <= mask.sum() <= 1.3 * high
    rows, cols = np.nonzero(mask)
    assert rows.min() > 0 and cols.min() > 0 and rows.max() < 63 and cols.max() < 63  # away from the border
    # the lesion is brighter than its surroundings by more than the noise
    ring = np.zeros_like(mask)
    ring[max(rows.min() - 6, 0):rows.max() + 7, max(cols.min() - 6, 0):cols.max() + 7] = True
    ring &= ~mask
    lesion_peak = case["image"][mask].max() - np.median(case["image"][ring])
    assert lesion_peak > 0.5 * case["contrast"] - 3 * IMAGE_NOISE


def test_a_normal_case_has_an_empty_mask():
    case = make_weak_case(0, 0, size=32, lesion_probability=0.0)
    assert case["label"] == 0 and case["mask"].sum() == 0 and case["contrast"] == 0.0


def test_written_files_load_back_as_made(tmp_path):
    written = write_weak_dataset(tmp_path, 5, size=32, seed=4)
    description = json.loads((tmp_path / "dataset.json").read_text())
    assert description["numTraining"] == 5 and description["labels"] == {"0": "normal", "1": "abnormal"}
    data = read_weak_dataset(tmp_path)
    assert data["image"].shape == (5, 1, 32, 32) and data["mask"].dtype.is_floating_point is False
    for i in range(5):
        case = make_weak_case(4, i, size=32)
        np.testing.assert_allclose(data["image"][i, 0].numpy(), case["image"], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(data["mask"][i, 0].numpy(), case["mask"].astype(bool))
        assert int(data["label"][i]) == case["label"] == written[i]["label"]
    assert data["name"] == [f"case_{i:04d}.nii.gz" for i in range(5)]


def test_reading_a_folder_without_dataset_json_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="no dataset.json in"):
        read_weak_dataset(tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"size": 16}, "size must be"), ({"anatomy": "ct"}, "anatomy must be"), ({"lesion_probability": 1.5},
                                                                             "lesion_probability"),
     ({"index": -1}, "index must be")],
)
def test_bad_arguments_are_named(kwargs, message):
    arguments = {"seed": 0, "index": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        make_weak_case(arguments.pop("seed"), arguments.pop("index"), **arguments)


def test_mni152_anatomy_when_nilearn_is_installed():
    pytest.importorskip("nilearn", reason="nilearn is not installed: pip install -c constraints.txt -e '.[examples]'")
    case = make_weak_case(0, 2, size=64, anatomy="mni152", lesion_probability=1.0)
    assert case["image"].shape == (64, 64) and case["mask"].sum() > 0
    assert float(np.median(case["image"])) < 0.5  # a brain slice: mostly dark background around the head
