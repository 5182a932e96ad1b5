"""Synthetic cases: determinism, grouping by source, graded degradations, NIfTI round trip, dataset.json, errors."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from monai.data import load_decathlon_datalist
from monai.transforms import LoadImaged

from monai_protoseg import synthetic
from monai_protoseg.synthetic import (
    BIAS_RANGE,
    BLUR_SIGMA,
    CONTRAST_EXPONENT,
    DEGRADATIONS,
    NOISE_STD,
    case_plan,
    make_case,
    write_dataset,
)

LEVELS = np.linspace(0, 1, 6)


def test_case_shapes_types_and_clean_image():
    image, label = make_case(7, size=48)
    assert image.shape == label.shape == (1, 48, 48)
    assert image.dtype == np.float32 and label.dtype == np.uint8
    assert set(np.unique(label)) == {0, 1}
    assert 0.05 < label.mean() < 0.6  # some circles, not the whole image
    # clean: MONAI's test image, circles in [0.5, 1] (the brightest at 1) over faint background noise
    assert image.max() == 1 and image[label == 1].min() >= 0.5
    assert image[label == 0].min() >= 0 and 0.1 < image[label == 0].max() < 0.4 and image[label == 0].std() > 0.03


@pytest.mark.parametrize("degradation", DEGRADATIONS)
def test_same_arguments_same_case(degradation):
    first = make_case(11, 32, 0.7, degradation)
    second = make_case(11, 32, 0.7, degradation)
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    other_seed = make_case(12, 32, 0.7, degradation)
    assert not np.array_equal(first[1], other_seed[1])


def test_same_source_same_label_for_every_degradation_and_difficulty():
    clean_image, label = make_case(5)
    for degradation in DEGRADATIONS:
        for difficulty in LEVELS:
            image, other_label = make_case(5, difficulty=difficulty, degradation=degradation)
            assert np.array_equal(other_label, label)
            if difficulty == 0:
                assert np.array_equal(image, clean_image)
            else:
                assert not np.array_equal(image, clean_image)


def test_default_degradation_follows_the_seed():
    for seed in range(8):
        expected = make_case(seed, 32, 0.6, DEGRADATIONS[seed % 4])
        image, label = make_case(seed, 32, 0.6)
        assert np.array_equal(image, expected[0]) and np.array_equal(label, expected[1])


def test_noise_std_grows_with_difficulty():
    clean, label = make_case(3)
    stds = [make_case(3, difficulty=d, degradation="noise")[0][label == 0].std() for d in LEVELS]
    assert stds[0] == pytest.approx(clean[label == 0].std()) and np.all(np.diff(stds) > 0)
    assert stds[-1] == pytest.approx(np.hypot(NOISE_STD, stds[0]), rel=0.05)  # independent noise adds in variance


def test_contrast_fades_to_zero():
    clean, label = make_case(8)
    contrasts = []
    for d in LEVELS:
        image = make_case(8, difficulty=d, degradation="contrast")[0]
        contrasts.append(image[label == 1].mean() - image[label == 0].mean())
        np.testing.assert_array_equal(image[label == 0], clean[label == 0])  # the background is untouched
    assert contrasts[0] > 0.4 and np.all(np.diff(contrasts) < 0) and abs(contrasts[-1]) < 0.01
    kept = (1 - LEVELS) ** CONTRAST_EXPONENT
    np.testing.assert_allclose(contrasts, contrasts[0] * kept, atol=0.01)
    # at difficulty 1 the foreground is drawn from the background's own values
    faded = make_case(8, difficulty=1.0, degradation="contrast")[0]
    assert np.isin(faded[label == 1], clean[label == 0]).all()


def test_blur_smooths_more_with_difficulty():
    clean, label = make_case(1)
    variation = []
    for d in LEVELS:
        image = make_case(1, difficulty=d, degradation="blur")[0]
        variation.append(np.abs(np.diff(image, axis=-1)).mean())  # mean step between neighbouring pixels
        # the normalised kernel keeps the mean intensity, up to the reflected borders
        assert image.mean() == pytest.approx(clean.mean(), rel=0.05)
    assert np.all(np.diff(variation) < 0) and variation[-1] < 0.1 * variation[0]
    # an isolated bright pixel spreads into a Gaussian of the documented sigma (difficulty 0.5: 8 pixels at 64)
    spot = np.zeros((64, 64))
    spot[32, 32] = 1
    blurred = synthetic._gaussian_blur(spot, 0.5 * BLUR_SIGMA * 64)
    offsets = np.arange(64) - 32
    assert blurred.sum() == pytest.approx(1.0)
    assert np.sqrt((blurred.sum(axis=0) * offsets**2).sum()) == pytest.approx(0.5 * BLUR_SIGMA * 64, rel=0.02)


def test_bias_field_is_smooth_multiplicative_and_grows():
    clean, label = make_case(2)
    tissue = clean[0] > 0.01  # where the factor can be read off
    spreads = []
    for d in LEVELS[1:]:
        image = make_case(2, difficulty=d, degradation="bias")[0]
        log_factor = np.log(np.where(tissue, image[0], 1) / np.where(tissue, clean[0], 1))
        spreads.append(log_factor[tissue].max() - log_factor[tissue].min())
        assert np.abs(log_factor[tissue]).max() <= d * np.log(BIAS_RANGE) + 1e-5
        # smooth: the field is a quadratic with maximum 1 on [-1, 1]^2, so by Markov's inequality its slope along an
        # axis is at most 4, i.e. at most 8 / (size - 1) per pixel
        steps = np.diff(log_factor, axis=1)[tissue[:, 1:] & tissue[:, :-1]]
        assert np.abs(steps).max() <= d * np.log(BIAS_RANGE) * 8 / 63 + 1e-5
    assert np.all(np.diff(spreads) > 0)
    np.testing.assert_allclose(np.array(spreads) / LEVELS[1:], spreads[-1], rtol=1e-4)  # log-factor ~ difficulty


def test_case_plan_groups_difficulties_by_source():
    plan = case_plan(7, seed=4, difficulties=(0.0, 0.5, 1.0))
    assert [c["source"] for c in plan] == [4, 4, 4, 5, 5, 5, 6]
    assert [c["difficulty"] for c in plan] == [0.0, 0.5, 1.0] * 2 + [0.0]
    assert [c["degradation"] for c in plan] == ["noise"] * 3 + ["blur"] * 3 + ["bias"]
    assert [c["source"] for c in case_plan(3)] == [0, 1, 2]


def test_write_dataset_round_trip_through_monai(tmp_path):
    start = time.perf_counter()
    cases = write_dataset(tmp_path / "data", 40, seed=20, difficulties=(0.0, 0.5, 1.0), prefix="syn")
    elapsed = time.perf_counter() - start
    assert elapsed < 5, f"writing 40 cases of 64 x 64 took {elapsed:.1f} s"
    assert len(cases) == 40
    assert cases[4] == {
        "image": str(tmp_path / "data" / "imagesTr" / "syn_004.nii.gz"),
        "label": str(tmp_path / "data" / "labelsTr" / "syn_004.nii.gz"),
        "source": 21,
        "difficulty": 0.5,
        "degradation": "blur",
    }
    loader = LoadImaged(keys=["image", "label"], ensure_channel_first=True)
    for case in cases[:6]:
        data = loader({"image": case["image"], "label": case["label"]})
        image, label = make_case(case["source"], 64, case["difficulty"], case["degradation"])
        assert data["image"].shape == data["label"].shape == (1, 64, 64)
        np.testing.assert_array_equal(data["image"].numpy(), image)
        np.testing.assert_array_equal(data["label"].numpy(), label)
        np.testing.assert_array_equal(data["image"].affine.numpy(), np.eye(4))


def test_dataset_json_is_decathlon_style(tmp_path):
    cases = write_dataset(tmp_path, 3, size=32)
    description = json.loads((tmp_path / "dataset.json").read_text())
    assert description["training"] == [
        {"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"} for i in range(3)
    ]
    assert description["labels"] == {"0": "background", "1": "foreground"}
    assert description["modality"] == {"0": "synthetic"}
    assert description["numTraining"] == 3
    datalist = load_decathlon_datalist(tmp_path / "dataset.json", data_list_key="training")
    assert [(d["image"], d["label"]) for d in datalist] == [(c["image"], c["label"]) for c in cases]
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"seed": -1}, "seed"),
        ({"seed": 2**32}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"seed": True}, "seed"),
        ({"size": 8}, "size"),
        ({"size": 32.0}, "size"),
        ({"difficulty": 1.5}, "difficulty"),
        ({"difficulty": -0.1}, "difficulty"),
        ({"difficulty": float("nan")}, "difficulty"),
        ({"difficulty": "0.5"}, "difficulty"),
        ({"degradation": "motion"}, "degradation"),
    ],
)
def test_make_case_errors_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        make_case(**{"seed": 0, **kwargs})


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"cases": 0}, "cases"),
        ({"cases": 2.0}, "cases"),
        ({"difficulties": ()}, "difficulties"),
        ({"difficulties": 0.5}, "difficulties"),
        ({"difficulties": (0.0, 2.0)}, "difficulties"),
        ({"seed": -3}, "seed"),
        ({"size": 4}, "size"),
        ({"prefix": "a/b"}, "prefix"),
        ({"prefix": ""}, "prefix"),
    ],
)
def test_write_dataset_errors_name_the_argument(tmp_path, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} "):
        write_dataset(tmp_path, **{"cases": 2, **kwargs})
    assert not (tmp_path / "dataset.json").exists()
