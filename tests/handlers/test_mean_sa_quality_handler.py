"""MeanSAQualityHandler: per-case mean SA against the own prediction, calibration fitted in validation, CSV."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer

from monai_protoseg import FeatureRecorder, MeanSAQualityHandler, QualityCalibration, last_decoder_layers
from tests.handlers.test_sa_score_handler import LAYERS, hook_count, make_batches, make_network
from tests.naive_protoseg import naive_dice, naive_sa_score

QUALITY_LAYERS = LAYERS[:2]


def named_batches(count: int = 4, classes: int = 1, labels: bool = True) -> list[dict]:
    """``make_batches`` with file names in the image meta data, as ``LoadImaged`` leaves them."""
    batches = []
    for i, batch in enumerate(make_batches(count=count, classes=classes)):
        files = [f"/data/imagesTr/case_{i}{b}.nii.gz" for b in range(batch["image"].shape[0])]
        named = {"image": MetaTensor(batch["image"], meta={"filename_or_obj": files})}
        if labels:
            named["label"] = batch["label"]
        batches.append(named)
    return batches


def evaluate(network, batches, **kwargs) -> tuple[SupervisedEvaluator, MeanSAQualityHandler]:
    inferer = kwargs.pop("inferer", None)
    handler = MeanSAQualityHandler(**{"layers": QUALITY_LAYERS, **kwargs})
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    inferer=inferer, val_handlers=[handler])
    evaluator.run()
    return evaluator, handler


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def expected_rows(network, batches, activation="sigmoid", classes=(0,)):
    """Independent computation: per case and class, the naive SA of each layer against ``prob > 0.5`` (or the
    argmax), their mean, and the Dice of that prediction against the label."""
    rows = []
    for batch in batches:
        with torch.no_grad(), FeatureRecorder(network, QUALITY_LAYERS) as recorder:
            logits = network(batch["image"].as_tensor())
        prob = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)
        for b in range(prob.shape[0]):
            for k in classes:
                own = (prob[b:b + 1].argmax(1, keepdim=True) == k) if activation == "softmax" else prob[b:b + 1, k:k + 1] > 0.5
                layer_sa = [naive_sa_score(recorder[layer][b:b + 1].double(), prob[b:b + 1, k:k + 1].double(), own).item()
                            for layer in QUALITY_LAYERS]
                truth = batch["label"][b, 0] == k if activation == "softmax" else batch["label"][b, 0] > 0.5
                rows.append({"layers": layer_sa, "mean_sa": float(np.nanmean(layer_sa)),
                             "true_dice": naive_dice(own[0, 0], truth)})
    return rows


def test_validation_fits_the_calibration_and_rows_match_an_independent_computation(tmp_path):
    network, batches = make_network(), named_batches(count=4)
    calibration_file = tmp_path / "models" / "quality_calibration.json"
    evaluator, handler = evaluate(network, batches, output_dir=tmp_path, calibration=calibration_file,
                                  fit_calibration=True)
    rows = read_rows(tmp_path / "quality.csv")
    expected = expected_rows(network, batches)
    assert [row["case"] for row in rows] == [f"case_{i}{b}" for i in range(4) for b in range(2)]
    assert list(rows[0]) == ["case", "class", "mean_sa", *(f"sa_{layer}" for layer in QUALITY_LAYERS), "true_dice",
                             "estimated_dice", "review", "note"]
    for row, want in zip(rows, expected):
        assert float(row["mean_sa"]) == pytest.approx(want["mean_sa"], abs=1e-5)
        for layer, value in zip(QUALITY_LAYERS, want["layers"]):
            assert float(row[f"sa_{layer}"]) == pytest.approx(value, abs=1e-5)
        assert float(row["true_dice"]) == pytest.approx(want["true_dice"], abs=1e-6)
    # the calibration is the least-squares line of true Dice on mean SA, saved as JSON
    x = np.array([want["mean_sa"] for want in expected])
    y = np.array([want["true_dice"] for want in expected])
    slope, intercept = np.polyfit(x, y, 1)
    saved = QualityCalibration.load(calibration_file)
    assert saved == handler.calibration
    assert saved.slope == pytest.approx(slope, abs=1e-4) and saved.intercept == pytest.approx(intercept, abs=1e-4)
    assert saved.pearson_r == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-4)
    assert evaluator.state.metrics["quality_pearson_r"] == saved.pearson_r
    assert evaluator.state.metrics["quality_mean_sa"] == pytest.approx(x.mean(), abs=1e-5)
    for row in rows:
        estimated = float(row["estimated_dice"])
        assert estimated == pytest.approx(np.clip(slope * float(row["mean_sa"]) + intercept, 0, 1), abs=1e-4)
        assert row["review"] == str(estimated < 0.7)
    assert hook_count(network) == 0


def test_inference_without_labels_uses_the_saved_calibration(tmp_path):
    network = make_network()
    calibration = QualityCalibration(slope=0.5, intercept=0.4, pearson_r=0.8, mae=0.05, loo_mae=0.06, n_cases=10)
    path = calibration.save(tmp_path / "calibration.json")
    batches = named_batches(count=2, labels=False)
    evaluator, _ = evaluate(network, batches, output_dir=tmp_path, calibration=path, threshold=0.9)
    rows = read_rows(tmp_path / "quality.csv")
    assert len(rows) == 4 and "true_dice" not in rows[0]  # no labels
    for row in rows:
        estimated = min(max(0.5 * float(row["mean_sa"]) + 0.4, 0.0), 1.0)
        assert float(row["estimated_dice"]) == pytest.approx(estimated, abs=1e-6)
        assert row["review"] == str(estimated < 0.9) and row["note"] == ""
    assert evaluator.state.metrics["quality_review"] == sum(row["review"] == "True" for row in rows)


def test_without_calibration_reports_mean_sa_alone_and_says_why(tmp_path, caplog):
    network, batches = make_network(), named_batches(count=2, labels=False)
    missing = tmp_path / "absent.json"
    logger = logging.getLogger("monai_protoseg.handlers.mean_sa_quality")
    logger.addHandler(caplog.handler)
    try:
        evaluate(network, batches, output_dir=tmp_path, calibration=missing, threshold=0.6)
    finally:
        logger.removeHandler(caplog.handler)
    assert f"no calibration file at {missing}; reporting mean SA alone" in caplog.text
    for row in read_rows(tmp_path / "quality.csv"):
        assert row["estimated_dice"] == "nan"
        assert row["note"] == f"no calibration file at {missing}: mean SA only"
        assert row["review"] == str(float(row["mean_sa"]) < 0.6)


def test_too_few_cases_to_fit_leaves_mean_sa_alone(tmp_path):
    network, batches = make_network(), named_batches(count=1)  # two cases: fewer than QualityCalibration needs
    evaluator, handler = evaluate(network, batches, output_dir=tmp_path, calibration=tmp_path / "c.json",
                                  fit_calibration=True)
    assert handler.calibration is None and not (tmp_path / "c.json").exists()
    assert "quality_pearson_r" not in evaluator.state.metrics
    notes = {row["note"] for row in read_rows(tmp_path / "quality.csv")}
    assert len(notes) == 1 and notes.pop().startswith("calibration not fitted (cannot fit a quality calibration on 2")


def test_empty_prediction_is_undefined_and_flagged(tmp_path):
    network = make_network()
    torch.nn.init.constant_(network.model[2][1].conv.unit0.conv.bias, -100.0)  # every pixel predicted background
    evaluator, _ = evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path)
    rows = read_rows(tmp_path / "quality.csv")
    assert [(row["mean_sa"], row["review"], row["note"]) for row in rows] == [
        ("nan", "True", "empty prediction: SA undefined")] * 2
    assert evaluator.state.metrics["quality_undefined"] == 2


def test_softmax_classes_get_a_row_each(tmp_path):
    network, batches = make_network(out_channels=3), named_batches(count=3, classes=3)
    evaluate(network, batches, output_dir=tmp_path, activation="softmax", class_names=["left", "right"],
             calibration=None, fit_calibration=True)
    rows = read_rows(tmp_path / "quality.csv")
    assert [row["class"] for row in rows[:4]] == ["left", "right", "left", "right"]
    expected = expected_rows(network, batches, activation="softmax", classes=(1, 2))
    for row, want in zip(rows, expected):
        assert (row["mean_sa"] == "nan" and math.isnan(want["mean_sa"])) or float(row["mean_sa"]) == pytest.approx(
            want["mean_sa"], abs=1e-5)


def test_sliding_window_matches_whole_image_and_restores_the_inferer(tmp_path):
    network, batches = make_network(), named_batches(count=1, labels=False)
    evaluate(network, batches, output_dir=tmp_path / "simple")
    inferer = SlidingWindowInferer(roi_size=(16, 16))
    evaluator, _ = evaluate(network, batches, output_dir=tmp_path / "window", inferer=inferer)
    assert evaluator.inferer is inferer
    simple, window = read_rows(tmp_path / "simple" / "quality.csv"), read_rows(tmp_path / "window" / "quality.csv")
    assert [float(row["mean_sa"]) for row in window] == pytest.approx([float(r["mean_sa"]) for r in simple], abs=1e-4)


def test_default_layers_and_case_names_without_meta_data(tmp_path):
    network = make_network()
    batches = [{key: value for key, value in batch.items()} for batch in make_batches(count=1)]  # plain tensors
    handler = MeanSAQualityHandler(output_dir=tmp_path)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    val_handlers=[handler])
    evaluator.run()
    assert handler.layers == last_decoder_layers(network) == ["model.1.submodule.1.submodule", "model.1.submodule.2"]
    assert [row["case"] for row in read_rows(tmp_path / "quality.csv")] == ["case0000", "case0001"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"threshold": 70}, "threshold must be in [0, 1]"),
        ({"activation": "relu"}, "activation must be"),
        ({"calibration": QualityCalibration.fit([0.1, 0.5, 0.9], [0.2, 0.5, 0.8]), "fit_calibration": True},
         "needs calibration to be the path"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        MeanSAQualityHandler(QUALITY_LAYERS, **kwargs)


def test_fitting_without_labels_and_a_corrupt_calibration_file_are_clear_errors(tmp_path):
    network = make_network()
    with pytest.raises(ValueError, match=r"fit_calibration=True\) needs labels"):
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path, fit_calibration=True)
    assert hook_count(network) == 0
    corrupt = tmp_path / "calibration.json"
    corrupt.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ValueError, match=f"{corrupt} is not a valid QualityCalibration file"):
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path, calibration=corrupt)
    assert hook_count(network) == 0


def test_held_out_cases_with_labels_get_their_true_dice_next_to_the_estimate(tmp_path):
    network, batches = make_network(), named_batches(count=2)
    calibration = QualityCalibration(slope=1.0, intercept=0.0, pearson_r=0.8, mae=0.05, loo_mae=0.06, n_cases=10)
    evaluate(network, batches, output_dir=tmp_path, calibration=calibration)
    rows = read_rows(tmp_path / "quality.csv")
    for row, want in zip(rows, expected_rows(network, batches)):
        assert float(row["true_dice"]) == pytest.approx(want["true_dice"], abs=1e-6)
        assert float(row["estimated_dice"]) == pytest.approx(want["mean_sa"], abs=1e-5)


def test_sa_and_quality_handlers_share_one_sliding_window_wrapper(tmp_path):
    from monai_protoseg import SAScoreHandler

    network, batches = make_network(), named_batches(count=1)
    expected = expected_rows(network, batches)
    inferer = SlidingWindowInferer(roi_size=(16, 16))
    sa, quality = SAScoreHandler(LAYERS), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    inferer=inferer, val_handlers=[sa, quality])
    evaluator.run()
    assert evaluator.inferer is inferer and hook_count(network) == 0
    assert set(evaluator.state.metrics) >= {f"sa_{layer}" for layer in LAYERS} | {"quality_mean_sa"}
    for row, want in zip(read_rows(tmp_path / "quality.csv"), expected):
        assert float(row["mean_sa"]) == pytest.approx(want["mean_sa"], abs=1e-4)
