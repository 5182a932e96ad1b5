"""MeanSAQualityHandler (issue 18): grouping, nested CV figures and quality_cv.csv, intervals, review rule, the
calibrated mean SA beside the estimate, the note naming the method, several TTA flips."""

from __future__ import annotations

import csv
import logging
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_protoseg import MeanSAQualityHandler, QualityCalibration, QualityEstimator
from monai_protoseg.conformal import conformal_halfwidth
from monai_protoseg.handlers.mean_sa_quality import CV_FILENAME, _distinct
from monai_protoseg.recorder import FeatureRecorder
from tests.handlers.test_mean_sa_quality_handler import (
    QUALITY_LAYERS,
    counting_forwards,
    evaluate,
    hook_count,
    make_batches,
    make_network,
    named_batches,
    read_rows,
)

LOGGER = "monai_protoseg.handlers.mean_sa_quality"


def volume_batches(count: int, volumes: int, same_name: bool = False) -> list[dict]:
    """Batches of 2 slices each; slice ``j`` belongs to volume ``j % volumes`` (meta key ``volume``). With
    ``same_name`` every slice has the same file name (slices read from one file)."""
    batches = []
    for i, batch in enumerate(make_batches(count=count)):
        index = [2 * i + b for b in range(batch["image"].shape[0])]
        files = ["/data/vol.nii.gz" if same_name else f"/data/slice_{j:02d}.nii.gz" for j in index]
        meta = {"filename_or_obj": files, "volume": [f"vol{j % volumes}" for j in index]}
        batches.append({"image": MetaTensor(batch["image"], meta=meta), "label": batch["label"]})
    return batches


def feature_values(row: dict[str, str], estimator: QualityEstimator) -> np.ndarray:
    """The estimator's feature columns of a CSV row, by position (the SA columns carry readable aliases): they
    follow ``case``, ``class`` and the optional ``group``."""
    start = 3 if "group" in row else 2
    return np.array([float(value) for value in list(row.values())[start:start + len(estimator.feature_names)]])


def logged(function):
    """Run ``function`` with the handler's log captured at INFO; return (its result, the log text)."""
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        return function(), "\n".join(records)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_group_by_meta_key_keeps_volumes_in_one_fold_and_writes_the_group_column(tmp_path):
    network, batches = make_network(), volume_batches(count=8, volumes=4)  # 16 slices of 4 volumes
    path = tmp_path / "estimator.json"
    (evaluator, handler), log = logged(lambda: evaluate(network, batches, output_dir=tmp_path, estimator=path,
                                                        fit_estimator=True, group="volume"))
    saved = QualityEstimator.load(path)
    assert (saved.n_rows, saved.n_groups, saved.n_folds) == (16, 4, 4)
    # the same fit by hand: rows grouped by volume
    rows = read_rows(tmp_path / "quality.csv")
    assert list(rows[0])[:3] == ["case", "class", "group"]
    assert [row["group"] for row in rows] == [f"vol{j % 4}" for j in range(16)]
    x = np.array([feature_values(row, saved) for row in rows])
    refit = QualityEstimator.fit(x, [float(row["true_dice"]) for row in rows], [row["group"] for row in rows],
                                 feature_names=saved.feature_names, layers=saved.layers, nested=True)
    assert refit.nested_mae == pytest.approx(saved.nested_mae, abs=1e-5) and refit.chosen == saved.chosen
    assert "leaves 4 group(s), fewer than the 5 cross-validation folds: 4-fold cross-validation" in log
    assert "grouped by meta-data key 'volume'" in log and "nested cross-validation (selection inside" in log
    assert evaluator.state.metrics["quality_estimator_cv_mae"] == saved.nested_mae
    assert hook_count(network) == 0


def test_one_file_name_for_all_slices_is_one_group_said_in_one_line_and_fixed_by_group(tmp_path):
    # the fault: slices of one file share one case name, so grouping by name leaves one group and the estimator was
    # silently not fitted
    network, batches = make_network(), volume_batches(count=8, volumes=4, same_name=True)
    (_, handler), log = logged(lambda: evaluate(network, batches, output_dir=tmp_path / "a", fit_estimator=True))
    assert handler.estimator is None
    lines = [line for line in log.splitlines() if "leaves 1 group(s)" in line]
    assert len(lines) == 1 and "the estimator cannot be fitted (at least 3 are needed); set group=" in lines[0]
    rows = read_rows(tmp_path / "a" / "quality.csv")
    assert [row["case"] for row in rows] == [f"vol#{j}" for j in range(16)]  # the CSV keeps distinct case names
    _, handler = evaluate(network, batches, output_dir=tmp_path / "b", fit_estimator=True,
                          group=lambda meta: meta["volume"])
    assert handler.estimator is not None and handler.estimator.n_groups == 4


def test_quality_cv_csv_holds_every_set_and_the_nested_row(tmp_path):
    network, batches = make_network(), named_batches(count=6)
    _, handler = evaluate(network, batches, output_dir=tmp_path, fit_estimator=True, selection="min")
    with open(tmp_path / CV_FILENAME, newline="") as stream:
        rows = list(csv.DictReader(stream))
    estimator = handler.estimator
    assert [row["feature_set"] for row in rows] == [*estimator.feature_sets, "selected"]
    readable = {f"{prefix}{layer}": f"{prefix}{alias}" for layer, alias in handler.layer_aliases.items()
                for prefix in ("sa_", "spread_")}
    assert any(name.startswith("spread_") for name in estimator.feature_sets["all"].features)
    for row in rows[:-1]:
        score = estimator.feature_sets[row["feature_set"]]
        assert row["features"].split() == [readable.get(name, name) for name in score.features]  # by alias
        assert "model." not in row["features"]
        assert float(row["cv_mae"]) == pytest.approx(score.cv_mae, abs=1e-6) and row["cv"] == "grouped"
        assert row["chosen"] == str(row["feature_set"] == estimator.chosen)
    assert rows[-1]["cv"] == "nested" and float(rows[-1]["cv_mae"]) == pytest.approx(estimator.nested_mae, abs=1e-6)
    assert rows[-1]["selection"] == "min"
    # selection "min" chooses the smallest CV MAE
    assert estimator.chosen == min(estimator.feature_sets, key=lambda name: estimator.feature_sets[name].cv_mae)


@pytest.mark.parametrize("coverage", [0.8, 0.9])
def test_intervals_are_the_conformal_half_width_of_the_nested_residuals(tmp_path, coverage):
    network, batches = make_network(), named_batches(count=6)
    _, handler = evaluate(network, batches, output_dir=tmp_path, fit_estimator=True, coverage=coverage,
                          review_rule="upper", threshold=0.6)
    estimator = handler.estimator
    q = np.sort(estimator.residuals)[math.ceil((len(estimator.residuals) + 1) * coverage) - 1]  # direct sort
    for row in read_rows(tmp_path / "quality.csv"):
        estimate, low, high = (float(row[name]) for name in ("estimated_dice", "estimate_low", "estimate_high"))
        assert low == pytest.approx(max(estimate - q, 0), abs=1e-5)
        assert high == pytest.approx(min(estimate + q, 1), abs=1e-5)
        assert row["review"] == str(high < 0.6)  # upper bound under the threshold
        assert "calibrated_mean_sa" not in row and row["note"].startswith("estimator (")


def test_calibration_only_gets_loo_intervals_and_the_calibrated_column_names_the_method(tmp_path):
    network = make_network()
    calibration = QualityCalibration.fit([0.1, 0.3, 0.5, 0.7, 0.9, 0.6, 0.2, 0.8, 0.4, 0.55],
                                         [0.2, 0.35, 0.45, 0.75, 0.85, 0.7, 0.1, 0.9, 0.5, 0.5])
    q = conformal_halfwidth(calibration.loo_residuals, 0.8)
    assert math.isfinite(q) and len(calibration.loo_residuals) == 10
    evaluate(network, named_batches(count=2, labels=False), output_dir=tmp_path, calibration=calibration,
             coverage=0.8)
    rows = read_rows(tmp_path / "quality.csv")
    assert list(rows[0])[-6:] == ["estimated_dice", "estimate_low", "estimate_high", "calibrated_mean_sa", "review",
                                  "note"]
    for row in rows:
        estimate = calibration.predict(float(row["mean_sa"]))
        assert float(row["calibrated_mean_sa"]) == pytest.approx(estimate, abs=1e-6)
        assert float(row["estimated_dice"]) == pytest.approx(estimate, abs=1e-6)
        assert float(row["estimate_high"]) == pytest.approx(min(estimate + q, 1), abs=1e-6)
        assert row["note"] == "calibration"


def test_estimator_and_calibrated_mean_sa_side_by_side(tmp_path):
    network, batches = make_network(), named_batches(count=6)
    _, handler = evaluate(network, batches, output_dir=tmp_path, fit_estimator=True, fit_calibration=True)
    for row in read_rows(tmp_path / "quality.csv"):
        assert float(row["calibrated_mean_sa"]) == pytest.approx(handler.calibration.predict(float(row["mean_sa"])),
                                                                 abs=1e-6)
        assert float(row["estimated_dice"]) == pytest.approx(
            handler.estimator.predict(feature_values(row, handler.estimator)), abs=1e-5)


def test_several_flip_axes_cost_one_forward_each_and_average_the_disagreements(tmp_path):
    network, batches = make_network(), named_batches(count=2)
    calls = counting_forwards(network)
    evaluate(network, batches, output_dir=tmp_path, estimator=tmp_path / "absent.json", tta_flip=[0, 1])
    assert len(calls) == 2 * 3  # the main pass and one per axis
    expected = []
    for batch in batches:
        image = batch["image"].as_subclass(torch.Tensor)
        with torch.no_grad():
            own = torch.sigmoid(network(image)) > 0.5
            flips = [torch.sigmoid(network(image.flip(d))).flip(d) > 0.5 for d in (2, 3)]
        for b in range(image.shape[0]):
            values = [1 - 2 * (own[b] & flip[b]).sum().item() / max((own[b].sum() + flip[b].sum()).item(), 1)
                      if (own[b].sum() + flip[b].sum()) > 0 else 0.0 for flip in flips]
            expected.append(sum(values) / 2)
    rows = read_rows(tmp_path / "quality.csv")
    assert [float(row["tta_disagreement"]) for row in rows] == pytest.approx(expected, abs=1e-6)


def test_an_estimator_fitted_with_other_flip_axes_is_a_clear_error(tmp_path):
    network, batches = make_network(), named_batches(count=6)
    path = tmp_path / "estimator.json"
    evaluate(network, batches, output_dir=tmp_path, estimator=path, fit_estimator=True, tta_flip=[0])
    assert QualityEstimator.load(path).tta_axes == (0,)
    with pytest.raises(ValueError, match=r"fitted with tta_flip axes \[0\], but this handler flips \[-1\]"):
        evaluate(network, batches, output_dir=tmp_path, estimator=path, tta_flip=True)


@pytest.mark.parametrize(
    "options, match",
    [({"coverage": 1.0}, "coverage must be a number in"), ({"review_rule": "lower"}, "review_rule must be one of"),
     ({"group": 3}, "group must be None, a meta-data key"), ({"tta_flip": [0, 0], "fit_estimator": True},
                                                              "tta_flip must be a bool or a non-empty sequence")],
)
def test_bad_options_are_errors_naming_them(tmp_path, options, match):
    with pytest.raises(ValueError, match=match):
        evaluate(make_network(), named_batches(count=1), output_dir=tmp_path, **options)


def test_a_missing_group_key_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"group='patient' is not a key of the image's meta data"):
        evaluate(make_network(), named_batches(count=2), output_dir=tmp_path, fit_estimator=True, group="patient")


def test_distinct_names_number_only_the_repeated_ones():
    assert _distinct(["a", "b", "a", "c", "a"]) == ["a#0", "b", "a#1", "c", "a#2"]


def test_new_feature_columns_match_an_independent_computation(tmp_path):
    """entropy, boundary_margin and the prototype features of the quality CSV (sigmoid, one class), against loops
    over pixels and the prototypes of the mean-SA layers' features resized first."""
    network, batches = make_network(), named_batches(count=4)
    evaluate(network, batches, output_dir=tmp_path, fit_estimator=True)
    rows = read_rows(tmp_path / "quality.csv")
    expected = []
    for batch in batches:
        with torch.no_grad(), FeatureRecorder(network, QUALITY_LAYERS) as recorder:
            prob = torch.sigmoid(network(batch["image"].as_tensor())).double()
        for b in range(prob.shape[0]):
            p, own = prob[b, 0], prob[b, 0] > 0.5
            q = p.clamp(1e-12, 1 - 1e-12)
            row = {"entropy": (-(q * q.log2() + (1 - q) * (1 - q).log2())).mean().item()}
            margins = [abs(2 * p[i, j].item() - 1) for i in range(p.shape[0]) for j in range(p.shape[1])
                       if any(0 <= i + di < p.shape[0] and 0 <= j + dj < p.shape[1] and own[i + di, j + dj] != own[i, j]
                              for di, dj in ((1, 0), (-1, 0), (0, 1), (0, -1)))]
            row["boundary_margin"] = float(np.mean(margins))
            inside, outside, near = [], [], []
            for layer in QUALITY_LAYERS:
                f = torch.nn.functional.interpolate(recorder[layer][b:b + 1].double(), size=tuple(p.shape),
                                                    mode="bilinear", align_corners=False)[0]
                fg = (p * f).sum((1, 2)) / p.sum()
                bg = ((1 - p) * f).sum((1, 2)) / (1 - p).sum()
                logit = ((f - bg[:, None, None]) ** 2).sum(0) - ((f - fg[:, None, None]) ** 2).sum(0)
                z = (logit / ((fg - bg) ** 2).sum()).abs()
                inside.append(z[own].mean().item())
                outside.append(z[~own].mean().item())
                near.append((z < 0.5).double().mean().item())
            row |= {"proto_in": np.mean(inside), "proto_out": np.mean(outside), "proto_near": np.mean(near)}
            expected.append(row)
    assert len(rows) == len(expected) == 8
    for row, want in zip(rows, expected):
        for name, value in want.items():
            assert float(row[name]) == pytest.approx(value, abs=1e-4), name


def test_per_class_estimators_in_the_handler_estimate_each_class_with_its_own(tmp_path):
    network, batches = make_network(out_channels=3), named_batches(count=8, classes=3)
    options = dict(activation="softmax", class_names=["left", "right"])
    _, handler = evaluate(network, batches, output_dir=tmp_path, fit_estimator=True, per_class=True,
                          estimator=tmp_path / "estimator.json", **options)
    estimator = handler.estimator
    assert list(estimator.per_class) == ["left", "right"]
    rows = read_rows(tmp_path / "quality.csv")
    note = f"estimator per class (left: {estimator.per_class['left'].chosen}, right: {estimator.per_class['right'].chosen})"
    checked = 0
    for row in rows:
        assert row["note"] == note
        x = feature_values(row, estimator)
        if not np.isnan(x).any():
            own = estimator.per_class[row["class"]].predict(x)  # the class's own estimator, not the pooled one
            assert float(row["estimated_dice"]) == pytest.approx(float(own), abs=1e-6)
            checked += 1
    assert checked >= 20
    cv_rows = read_rows(tmp_path / CV_FILENAME)
    assert {row["class"] for row in cv_rows} == {"pooled", "left", "right", "per class"}
    assert float(cv_rows[-1]["cv_mae"]) == pytest.approx(estimator.nested_mae, abs=1e-6)
    # at inference the same file with other class names is an error naming the file and the classes
    with pytest.raises(ValueError, match=r"estimator.json: classes \['a', 'b'\] have no estimator.*class_names"):
        evaluate(network, named_batches(count=1, classes=3, labels=False), output_dir=tmp_path / "inference",
                 estimator=tmp_path / "estimator.json", activation="softmax", class_names=["a", "b"])


def test_per_class_auto_says_when_a_class_has_too_few_rows_to_compare(tmp_path, caplog):
    network, batches = make_network(out_channels=3), named_batches(count=4, classes=3)  # 8 cases: 8 rows per class
    with caplog.at_level(logging.INFO, logger="monai_protoseg.handlers.mean_sa_quality"):
        _, handler = evaluate(network, batches, output_dir=tmp_path, fit_estimator=True, activation="softmax",
                              class_names=["left", "right"])
    assert handler.estimator is not None and handler.estimator.per_class == {}
    assert math.isnan(handler.estimator.per_class_nested_mae)
    assert ("per-class estimators not compared: each class needs 10 valid rows of 3 groups, and rows with true Dice "
            "were left: 8, right: 8") in caplog.text
    assert "the pooled estimator estimates every class" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="monai_protoseg.handlers.mean_sa_quality"):
        evaluate(network, batches, output_dir=tmp_path / "never", fit_estimator=True, activation="softmax",
                 class_names=["left", "right"], per_class=False)
    assert "per-class estimators not compared" not in caplog.text  # not asked for: nothing to say


@pytest.mark.parametrize("argument, value", [("selection", "one-se"), ("target", "log"), ("per_class", "yes"),
                                             ("per_class", 1)])
def test_bad_estimator_options_are_refused_when_the_handler_is_built(argument, value):
    with pytest.raises(ValueError, match=rf"{argument} must be one of .*, got {value!r}"):
        MeanSAQualityHandler(fit_estimator=True, **{argument: value})
