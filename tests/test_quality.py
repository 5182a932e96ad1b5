"""QualityCalibration (mean SA -> estimated Dice) against numpy's own fits, and atomic_write_text."""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np
import pytest
import torch

from monai_protoseg.io import atomic_write_text
from monai_protoseg.quality import CALIBRATION_FORMAT, QualityCalibration


def validation_cases(n: int = 40, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Mean SA and a noisy, roughly linear true Dice, both in [0, 1]."""
    rng = np.random.default_rng(seed)
    mean_sa = rng.uniform(0.2, 0.95, n)
    true_dice = np.clip(0.9 * mean_sa + 0.08 + rng.normal(0, 0.08, n), 0, 1)
    return mean_sa, true_dice


def loo_mae_by_refitting(x: np.ndarray, y: np.ndarray) -> float:
    """Oracle: refit with numpy.polyfit once per left-out case, predict it, clip, average the absolute errors."""
    errors = []
    for i in range(x.size):
        keep = np.arange(x.size) != i
        slope, intercept = np.polyfit(x[keep], y[keep], 1)
        errors.append(abs(np.clip(slope * x[i] + intercept, 0, 1) - y[i]))
    return float(np.mean(errors))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_matches_numpy_polyfit_and_corrcoef(seed):
    x, y = validation_cases(seed=seed)
    calibration = QualityCalibration.fit(x, y)
    slope, intercept = np.polyfit(x, y, 1)
    assert calibration.slope == pytest.approx(slope, rel=1e-10)
    assert calibration.intercept == pytest.approx(intercept, rel=1e-10)
    assert calibration.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    in_sample = np.abs(np.clip(slope * x + intercept, 0, 1) - y).mean()
    assert calibration.mae == pytest.approx(in_sample, rel=1e-10)
    assert (calibration.n_cases, calibration.n_excluded) == (x.size, 0)
    assert isinstance(calibration.slope, float) and isinstance(calibration.n_cases, int)


@pytest.mark.parametrize("n, seed", [(3, 0), (4, 1), (10, 2), (40, 3), (200, 4)])
def test_loo_mae_matches_refitting_each_left_out_case(n, seed):
    x, y = validation_cases(n, seed)
    calibration = QualityCalibration.fit(x, y)
    assert calibration.loo_mae == pytest.approx(loo_mae_by_refitting(x, y), rel=1e-9)
    assert calibration.loo_mae >= calibration.mae - 1e-12  # out-of-sample error is not smaller here


@pytest.mark.parametrize("spread", [1e-3, 1e-6])
def test_loo_mae_with_one_isolated_case(spread):
    # nine cases packed within `spread` of one mean SA and one far away: leaving that one out leaves almost no
    # spread, where downdating the sums would cancel (it is off by ~1e-7 at spread 1e-6); such fits are redone directly
    rng = np.random.default_rng(0)
    x = np.r_[0.5 + spread * rng.standard_normal(9), 0.9]
    y = np.r_[0.2 + 0.5 * (x[:9] - 0.5) + 0.01 * spread * rng.standard_normal(9), 0.6]
    calibration = QualityCalibration.fit(x, y)
    assert calibration.loo_mae == pytest.approx(loo_mae_by_refitting(x, y), rel=1e-9)


def test_loo_mae_is_nan_when_leaving_a_case_out_leaves_constant_mean_sa():
    calibration = QualityCalibration.fit([0.5, 0.5, 0.5, 0.8], [0.4, 0.5, 0.6, 0.9])
    assert math.isnan(calibration.loo_mae)
    assert calibration.slope == pytest.approx(np.polyfit([0.5, 0.5, 0.5, 0.8], [0.4, 0.5, 0.6, 0.9], 1)[0])


def test_predict_clips_to_unit_interval_and_keeps_nan():
    calibration = QualityCalibration(slope=2.0, intercept=-0.5, pearson_r=0.9, mae=0.1, loo_mae=0.12, n_cases=10)
    np.testing.assert_allclose(calibration.predict([0.0, 0.2, 0.5, 0.7, 1.0]), [0.0, 0.0, 0.5, 0.9, 1.0])
    assert math.isnan(calibration.predict(float("nan")))
    assert np.isnan(calibration.predict(np.array([0.5, np.nan]))).tolist() == [False, True]
    # the in-sample error is measured on the clipped predictions too
    x, y = np.array([0.1, 0.2, 0.8, 0.9]), np.array([0.0, 0.0, 1.0, 1.0])
    fitted = QualityCalibration.fit(x, y)
    clipped = np.clip(fitted.slope * x + fitted.intercept, 0, 1)
    assert fitted.mae == pytest.approx(np.abs(clipped - y).mean())
    assert fitted.mae < np.abs(fitted.slope * x + fitted.intercept - y).mean()
    assert fitted.loo_mae == pytest.approx(loo_mae_by_refitting(x, y), rel=1e-9)  # leave-one-out clips too


def test_predict_returns_the_kind_it_was_given():
    calibration = QualityCalibration.fit(*validation_cases())
    value = calibration.predict(0.6)
    assert type(value) is float and value == pytest.approx(calibration.slope * 0.6 + calibration.intercept)
    assert type(calibration.predict(1)) is float and type(calibration.predict(np.float32(0.6))) is float
    as_list = calibration.predict([0.3, 0.6])
    assert isinstance(as_list, np.ndarray) and as_list.dtype == np.float64 and as_list.shape == (2,)
    grid = calibration.predict(np.full((2, 3), 0.6))
    assert grid.shape == (2, 3) and np.all(grid == value)
    for dtype in (torch.float32, torch.float64, torch.float16):
        tensor = calibration.predict(torch.tensor([0.3, 0.6, float("nan")], dtype=dtype))
        assert isinstance(tensor, torch.Tensor) and tensor.dtype == dtype and tensor.shape == (3,)
        assert tensor[1].item() == pytest.approx(value, abs=1e-3) and tensor[2].isnan()
    assert calibration.predict(torch.tensor([1, 0])).dtype == torch.get_default_dtype()
    with pytest.raises(ValueError, match="mean_sa must be a number"):
        calibration.predict(["high"])


def test_nan_pairs_are_excluded_and_counted():
    x, y = validation_cases(20)
    x_nan, y_nan = x.copy(), y.copy()
    x_nan[[2, 5]] = np.nan
    y_nan[[5, 11, 17]] = np.nan  # case 5 is NaN in both: counted once
    calibration = QualityCalibration.fit(x_nan, y_nan)
    keep = ~(np.isnan(x_nan) | np.isnan(y_nan))
    assert (calibration.n_cases, calibration.n_excluded) == (16, 4)
    assert calibration == dataclasses.replace(QualityCalibration.fit(x[keep], y[keep]), n_excluded=4)


def test_fit_accepts_lists_arrays_and_tensors():
    x, y = validation_cases(12)
    reference = QualityCalibration.fit(x, y)
    assert QualityCalibration.fit(x.tolist(), y.tolist()) == reference
    assert QualityCalibration.fit(torch.from_numpy(x), torch.from_numpy(y)) == reference
    from_float32 = QualityCalibration.fit(torch.tensor(x, dtype=torch.float32), y.astype(np.float32))
    assert from_float32.slope == pytest.approx(reference.slope, rel=1e-5)


@pytest.mark.parametrize(
    "mean_sa, true_dice, match",
    [
        ([0.5, 0.6], [0.5, 0.7], "on 2 valid case"),
        ([0.5, 0.6, float("nan"), 0.7], [0.5, 0.7, 0.8, float("nan")], r"on 2 valid case.*2 of 4 excluded"),
        ([], [], "on 0 valid case"),
        ([0.6, 0.6, 0.6, float("nan")], [0.5, 0.7, 0.9, 0.8], "mean SA is 0.6 in all 3 valid cases"),
        ([0.5, 0.6, 0.7], [0.5, 0.7], "same length, got 3 and 2"),
        ([[0.5, 0.6, 0.7]], [[0.5, 0.6, 0.7]], "mean_sa must be 1-D"),
        ([0.5, 0.6, 0.7], [50.0, 60.0, 70.0], r"true_dice must be in \[0, 1\]"),
        ([0.5, float("inf"), 0.7], [0.5, 0.6, 0.7], "mean_sa contains Inf"),
        (["a", "b", "c"], [0.5, 0.6, 0.7], "mean_sa must be a sequence of numbers"),
    ],
)
def test_fit_rejects_unusable_inputs_with_clear_errors(mean_sa, true_dice, match):
    with pytest.raises(ValueError, match=match):
        QualityCalibration.fit(mean_sa, true_dice)


def test_constant_true_dice_fits_a_flat_line_with_undefined_correlation():
    calibration = QualityCalibration.fit([0.3, 0.5, 0.9], [0.8, 0.8, 0.8])
    assert calibration.slope == 0 and calibration.intercept == pytest.approx(0.8)
    assert math.isnan(calibration.pearson_r) and calibration.mae == pytest.approx(0)


def test_save_load_roundtrip_gives_equal_predictions(tmp_path):
    calibration = QualityCalibration.fit(*validation_cases())
    path = calibration.save(tmp_path / "nested" / "calibration.json")
    assert path == tmp_path / "nested" / "calibration.json"
    data = json.loads(path.read_text())
    import monai_protoseg

    assert data["format"] == CALIBRATION_FORMAT and data["version"] == 1
    assert data["monai_protoseg_version"] == monai_protoseg.__version__
    assert {"slope", "intercept", "pearson_r", "mae", "loo_mae", "n_cases", "n_excluded"} <= data.keys()
    loaded = QualityCalibration.load(str(path))
    assert loaded == calibration  # floats survive JSON exactly
    grid = np.linspace(0, 1, 101)
    np.testing.assert_array_equal(loaded.predict(grid), calibration.predict(grid))


def test_nan_fields_are_saved_as_null_and_read_back_as_nan(tmp_path):
    calibration = QualityCalibration.fit([0.5, 0.5, 0.5, 0.8], [0.8, 0.8, 0.8, 0.8])  # r and LOO undefined
    path = calibration.save(tmp_path / "calibration.json")
    data = json.loads(path.read_text())  # strict JSON: no NaN literal
    assert data["pearson_r"] is None and data["loo_mae"] is None
    loaded = QualityCalibration.load(path)
    assert math.isnan(loaded.pearson_r) and math.isnan(loaded.loo_mae) and loaded.slope == calibration.slope


def write_json(path, data) -> str:
    path.write_text(json.dumps(data))
    return str(path)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: {**d, "format": "something.Else"}, "format must be 'monai_protoseg.QualityCalibration'"),
        (lambda d: {k: v for k, v in d.items() if k != "format"}, "format must be"),
        (lambda d: {k: v for k, v in d.items() if k not in ("slope", "n_cases")}, "missing field.*slope, n_cases"),
        (lambda d: {**d, "version": 2}, "version 2 is not supported"),
        (lambda d: {**d, "slope": "steep"}, "slope must be a finite number"),
        (lambda d: {**d, "slope": None}, "slope must be a finite number"),
        (lambda d: {**d, "n_cases": 2.5}, "n_cases must be an integer >= 3"),
        (lambda d: [d], "must be a JSON object"),
    ],
)
def test_load_rejects_wrong_content_naming_the_file(tmp_path, edit, match):
    data = QualityCalibration.fit(*validation_cases()).to_dict()
    path = write_json(tmp_path / "bad.json", edit(data))
    with pytest.raises(ValueError, match=match) as error:
        QualityCalibration.load(path)
    assert path in str(error.value)


@pytest.mark.parametrize(
    "content", ['{"format": "monai_protoseg.QualityCalibration", "slope": 0.', "", b"\xff\xfe\x00"]
)
def test_load_rejects_corrupt_files_naming_the_file(tmp_path, content):
    path = tmp_path / "corrupt.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ValueError, match="is not a QualityCalibration JSON file") as error:
        QualityCalibration.load(path)
    assert str(path) in str(error.value)


def test_load_of_a_missing_file_names_the_path(tmp_path):
    path = tmp_path / "absent.json"
    with pytest.raises(FileNotFoundError, match="absent.json"):
        QualityCalibration.load(path)


def test_failed_replace_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = tmp_path / "calibration.json"
    QualityCalibration.fit(*validation_cases()).save(path)
    before = path.read_bytes()

    def failing_replace(source, destination):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        QualityCalibration.fit(*validation_cases(seed=5)).save(path)
    with pytest.raises(OSError, match="disk went away"):
        atomic_write_text(tmp_path / "new.txt", "never visible")
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calibration.json"]
