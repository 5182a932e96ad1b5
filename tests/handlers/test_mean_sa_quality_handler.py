"""MeanSAQualityHandler: per-case mean SA against the own prediction, calibration or quality estimator fitted in
validation, CSV."""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch
from ignite.engine import Engine
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet

from monai_protoseg import (
    FeatureRecorder,
    MeanSAQualityHandler,
    QualityCalibration,
    QualityEstimator,
    SAScoreHandler,
    candidate_layers,
    last_decoder_layers,
)
from monai_protoseg.estimator import feature_names
from tests.handlers.test_sa_score_handler import ALIASES, LAYERS, hook_count, make_batches, make_network
from tests.naive_protoseg import naive_dice, naive_sa_score

QUALITY_LAYERS = LAYERS[:2]
PROFILE_ALIASES = {"model.0": "encoder.1", "model.1.submodule.0": "encoder.2", "model.1.submodule.1.submodule":
                   "bottleneck", "model.1.submodule.2": "decoder.1", "model.2": "output"}
"""The aliases of make_network()'s candidate layers, which name the CSV's SA columns."""


def csv_column(feature: str) -> str:
    """The quality CSV's column of an estimator feature: ``sa_{layer}`` and ``spread_{layer}`` are named by the
    layer's alias."""
    prefix, _, layer = feature.partition("_")
    return f"{prefix}_{PROFILE_ALIASES[layer]}" if prefix in ("sa", "spread") else feature


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
    assert list(rows[0]) == ["case", "class", "mean_sa", "sa_encoder.1", "sa_decoder.1", "true_dice",
                             "estimated_dice", "estimate_low", "estimate_high", "calibrated_mean_sa", "review", "note"]
    assert (tmp_path / "layer_names.csv").read_text() == (
        "layer,qualified_name\nencoder.1,model.0\ndecoder.1,model.1.submodule.2\n")  # the aliases' modules
    for row, want in zip(rows, expected):
        assert float(row["mean_sa"]) == pytest.approx(want["mean_sa"], abs=1e-5)
        for layer, value in zip(QUALITY_LAYERS, want["layers"]):
            assert float(row[csv_column(f"sa_{layer}")]) == pytest.approx(value, abs=1e-5)
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
        assert row["review"] == str(estimated < 0.9) and row["note"] == "calibration"  # the method, always named
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
        ("nan", "True", "no calibration given: mean SA only; empty prediction: SA undefined")] * 2
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
        ({"estimator": "placeholder", "fit_estimator": True}, "needs estimator to be the path"),
        ({"tta_flip": True}, "tta_flip=True computes a feature of the quality estimator"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    if kwargs.get("estimator") == "placeholder":
        kwargs["estimator"] = synthetic_estimator(make_network())
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
    network, batches = make_network(), named_batches(count=1)
    expected = expected_rows(network, batches)
    inferer = SlidingWindowInferer(roi_size=(16, 16))
    sa, quality = SAScoreHandler(LAYERS), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    inferer=inferer, val_handlers=[sa, quality])
    evaluator.run()
    assert evaluator.inferer is inferer and hook_count(network) == 0
    assert set(evaluator.state.metrics) >= {f"sa_{alias}" for alias in ALIASES.values()} | {"quality_mean_sa"}
    for row, want in zip(read_rows(tmp_path / "quality.csv"), expected):
        assert float(row["mean_sa"]) == pytest.approx(want["mean_sa"], abs=1e-4)


def expected_features(network, batches, layers, mean_layers=QUALITY_LAYERS):
    """Independent computation of the estimator's feature rows (sigmoid, one class): the naive SA of every layer
    against ``prob > 0.5``, the mean over ``mean_layers``, the mean probability inside the prediction, the mean of
    ``max(p, 1 - p)``, the predicted fraction of the image, the activation spread of every layer (numpy's population
    std of each channel over the image, averaged over channels), and the true Dice."""
    rows = []
    for batch in batches:
        with torch.no_grad(), FeatureRecorder(network, layers) as recorder:
            prob = torch.sigmoid(network(batch["image"].as_tensor()))
        for b in range(prob.shape[0]):
            own = prob[b:b + 1] > 0.5
            sa = {layer: naive_sa_score(recorder[layer][b:b + 1].double(), prob[b:b + 1].double(), own).item()
                  for layer in layers}
            row = {"mean_sa": float(np.nanmean([sa[layer] for layer in mean_layers]))}
            row |= {f"sa_{layer}": value for layer, value in sa.items()}
            row |= {"fg_prob": prob[b][own[0]].double().mean().item(),
                    "max_prob": torch.maximum(prob[b], 1 - prob[b]).double().mean().item(),
                    "volume": own.double().mean().item()}
            for layer in layers:
                values = recorder[layer][b].double().flatten(1).numpy()
                row[f"spread_{layer}"] = float(np.mean([np.std(channel) for channel in values]))
            if "label" in batch:
                row["true_dice"] = naive_dice(own[0, 0], batch["label"][b, 0] > 0.5)
            rows.append(row)
    return rows


def synthetic_estimator(network, tta=False, mean_layers=QUALITY_LAYERS) -> QualityEstimator:
    """An estimator for ``network``'s candidate layers fitted on noise-free synthetic rows: Dice depends on mean SA,
    fg_prob and volume, so the "all" set is chosen with non-trivial coefficients."""
    layers = candidate_layers(network)
    names = feature_names(layers, tta=tta)
    x = np.random.default_rng(0).uniform(0, 1, (30, len(names)))
    dice = np.clip(0.1 + 0.3 * x[:, 0] + 0.3 * x[:, names.index("fg_prob")] + 0.2 * x[:, names.index("volume")], 0, 1)
    return QualityEstimator.fit(x, dice, feature_names=names, layers=layers, mean_sa_layers=mean_layers)


def counting_forwards(network: torch.nn.Module) -> list:
    """Count the network's forward passes (hooks still run: ``__call__`` calls the instance's ``forward``)."""
    calls, forward = [], network.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    network.forward = counted
    return calls


def flip_disagreement(network, batches) -> list[float]:
    """Independent TTA: 1 - Dice between ``prob > 0.5`` and the flipped-back prediction for the flipped image."""
    values = []
    for batch in batches:
        image = batch["image"].as_subclass(torch.Tensor)
        with torch.no_grad():
            own = torch.sigmoid(network(image)) > 0.5
            flipped = torch.sigmoid(network(image.flip(-1))).flip(-1) > 0.5
        for b in range(image.shape[0]):
            total = own[b].sum() + flipped[b].sum()
            values.append(0.0 if total == 0 else 1 - 2 * (own[b] & flipped[b]).sum().item() / total.item())
    return values


def test_fit_estimator_during_validation_writes_the_json_and_the_feature_columns(tmp_path, caplog):
    network, batches = make_network(), named_batches(count=6)  # 12 cases
    path = tmp_path / "models" / "quality_estimator.json"
    logger = logging.getLogger("monai_protoseg.handlers.mean_sa_quality")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO)
    try:
        evaluator, handler = evaluate(network, batches, output_dir=tmp_path, estimator=path, fit_estimator=True)
    finally:
        logger.removeHandler(caplog.handler)
    layers = candidate_layers(network)
    assert handler.layers == layers and handler.mean_sa_layers == QUALITY_LAYERS and hook_count(network) == 0
    saved = QualityEstimator.load(path, layers, QUALITY_LAYERS)
    assert saved.to_dict() == handler.estimator.to_dict()
    assert (saved.n_rows, saved.n_groups, saved.n_excluded) == (12, 12, 0)
    names = feature_names(layers, prototype=True, spread=True)
    rows = read_rows(tmp_path / "quality.csv")
    assert list(rows[0]) == ["case", "class", *map(csv_column, names), "true_dice", "estimated_dice", "estimate_low",
                             "estimate_high",
                             "review", "note"]
    for row, want in zip(rows, expected_features(network, batches, layers), strict=True):
        for name, value in want.items():
            assert float(row[csv_column(name)]) == pytest.approx(value, abs=1e-5), name
        estimate = saved.predict(np.array([float(row[csv_column(name)]) for name in names]))
        assert float(row["estimated_dice"]) == pytest.approx(estimate, abs=1e-5)
        assert row["note"] == f"estimator ({saved.chosen})" and row["review"] == str(estimate < 0.7)
    # the logged and saved figures are those of the nested cross-validation, and the log says so
    assert evaluator.state.metrics["quality_estimator_cv_mae"] == saved.nested_mae
    assert evaluator.state.metrics["quality_estimator_cv_r"] == pytest.approx(saved.nested_r, nan_ok=True)
    assert f"chosen feature set {saved.chosen!r} (selection 'one_se_largest'); nested cross-validation" in caplog.text
    assert f"saved to {path}" in caplog.text
    assert all(f" {name} " in caplog.text for name in ("mean_sa", "sa_profile", "confidence", "all"))


@pytest.mark.parametrize("with_calibration", [True, False])
def test_too_few_cases_for_the_estimator_falls_back_and_says_why(tmp_path, with_calibration):
    network, batches = make_network(), named_batches(count=2)  # 4 cases: enough for a calibration, not an estimator
    evaluator, handler = evaluate(network, batches, output_dir=tmp_path, estimator=tmp_path / "e.json",
                                  fit_estimator=True, fit_calibration=with_calibration)
    assert handler.estimator is None and not (tmp_path / "e.json").exists()
    assert "quality_estimator_cv_r" not in evaluator.state.metrics
    rows = read_rows(tmp_path / "quality.csv")
    assert "volume" in rows[0] and "sa_bottleneck" in rows[0]  # the features are written
    why = "estimator not fitted (cannot fit a quality estimator on 4 valid row(s) from 4 group(s)"
    for row in rows:
        assert row["note"].startswith(why) and "at least 10 rows from 3 groups are needed" in row["note"]
        if with_calibration:
            assert row["note"].endswith("; calibration")
            assert float(row["estimated_dice"]) == pytest.approx(handler.calibration.predict(float(row["mean_sa"])),
                                                                 abs=1e-5)
        else:
            assert row["note"].endswith("; no calibration given: mean SA only") and row["estimated_dice"] == "nan"
            assert row["review"] == str(float(row["mean_sa"]) < 0.7)


def test_inference_estimates_equal_the_estimator_on_the_written_features(tmp_path):
    network = make_network()
    estimator = synthetic_estimator(network)
    assert estimator.chosen == "all"
    path = estimator.save(tmp_path / "estimator.json")
    evaluator, handler = evaluate(network, named_batches(count=2, labels=False), output_dir=tmp_path, estimator=path,
                                  threshold=0.5)
    assert handler.estimator == estimator
    rows = read_rows(tmp_path / "quality.csv")
    assert len(rows) == 4 and "true_dice" not in rows[0]
    for row in rows:
        x = np.array([float(row[csv_column(name)]) for name in estimator.feature_names])
        explicit = estimator.intercept + sum(
            c * (x[estimator.feature_names.index(name)] - m) / s
            for name, m, s, c in zip(estimator.features, estimator.mean, estimator.scale, estimator.coef)
        )
        estimated = float(row["estimated_dice"])
        assert estimator.target == "logit"  # the default: the regression's output is a logit of Dice
        assert estimated == pytest.approx(1 / (1 + math.exp(-explicit)), abs=1e-5)
        assert estimated == pytest.approx(estimator.predict(x), abs=1e-5)
        assert row["note"] == "estimator (all)" and row["review"] == str(estimated < 0.5)
    assert evaluator.state.metrics["quality_review"] == sum(row["review"] == "True" for row in rows)


def test_an_estimator_of_other_layers_or_features_is_a_clear_error(tmp_path):
    network = make_network()
    deeper = UNet(2, 1, 1, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1)
    path = synthetic_estimator(deeper, mean_layers=last_decoder_layers(deeper)).save(tmp_path / "deeper.json")
    with pytest.raises(ValueError) as error:
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path, estimator=path)
    message = str(error.value)
    assert message.startswith(f"{path}: the quality estimator was fitted on the SA of layers "
                              f"{candidate_layers(deeper)}")
    assert f"probed at layers {candidate_layers(network)}" in message and "needs its own estimator" in message
    assert hook_count(network) == 0
    with pytest.raises(ValueError, match=r"\(mean SA of \['model.2'\]\): a network with other layers"):
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path, layers=["model.2"],
                 estimator=synthetic_estimator(network))
    with pytest.raises(ValueError, match=r"features \[.*'tta_disagreement'\], but this handler .*set tta_flip=True"):
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path,
                 estimator=synthetic_estimator(network, tta=True))
    assert hook_count(network) == 0


def test_tta_flip_adds_the_disagreement_and_costs_one_forward_per_batch(tmp_path):
    network, batches = make_network(), named_batches(count=3)
    calls = counting_forwards(network)
    evaluate(network, batches, output_dir=tmp_path / "plain", estimator=tmp_path / "absent.json")
    assert len(calls) == 3 and "tta_disagreement" not in read_rows(tmp_path / "plain" / "quality.csv")[0]
    calls.clear()
    evaluate(network, batches, output_dir=tmp_path / "tta", estimator=tmp_path / "absent.json", tta_flip=True)
    assert len(calls) == 6  # one extra forward pass per batch
    rows = read_rows(tmp_path / "tta" / "quality.csv")
    assert list(rows[0])[-7:] == ["tta_disagreement", "true_dice", "estimated_dice", "estimate_low", "estimate_high",
                                  "review", "note"]
    expected = flip_disagreement(network, batches)
    assert [float(row["tta_disagreement"]) for row in rows] == pytest.approx(expected, abs=1e-6)
    assert 0 < max(expected)  # the untrained network does not predict symmetrically
    plain = read_rows(tmp_path / "plain" / "quality.csv")  # the other features are those of the main pass
    assert [row["mean_sa"] for row in rows] == [row["mean_sa"] for row in plain]
    assert hook_count(network) == 0


def test_the_flipped_pass_is_invisible_to_other_handlers(tmp_path):
    network, batches = make_network(), named_batches(count=2)
    alone = SAScoreHandler(LAYERS)
    SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                        val_handlers=[alone]).run()
    quality = MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path, fit_estimator=True, tta_flip=True)
    after = SAScoreHandler(LAYERS)  # reads its features after the quality handler's flipped pass
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    val_handlers=[quality, after])
    evaluator.run()
    for layer in LAYERS:
        assert evaluator.state.metric_details[f"sa_{ALIASES[layer]}"].flatten().tolist() == pytest.approx(
            alone.metric.layer_scores()[:, LAYERS.index(layer)].flatten().tolist(), nan_ok=True)
    assert hook_count(network) == 0


def test_bare_engine_with_tta_matches_the_evaluator(tmp_path):
    network, batches = make_network(), named_batches(count=6)

    def step(engine: Engine, batch: dict) -> dict:
        with torch.no_grad():
            image = batch["image"].as_tensor()
            return {"image": image, "pred": network(image), "label": batch["label"]}

    engine = Engine(step)
    handler = MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path / "bare", network=network, fit_estimator=True,
                                   tta_flip=True)
    handler.attach(engine)
    engine.run(batches)
    assert handler.estimator is not None and handler.estimator.n_groups == 12
    evaluate(network, batches, output_dir=tmp_path / "evaluator", fit_estimator=True, tta_flip=True)
    bare, evaluator = read_rows(tmp_path / "bare" / "quality.csv"), read_rows(tmp_path / "evaluator" / "quality.csv")
    assert bare == evaluator and hook_count(network) == 0

    def without_image(engine: Engine, batch: dict) -> dict:
        return {key: value for key, value in step(engine, batch).items() if key != "image"}

    engine = Engine(without_image)
    MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path, network=network, fit_estimator=True,
                         tta_flip=True).attach(engine)
    with pytest.raises(ValueError, match=r"tta_flip=True\) needs the input image under 'image'"):
        engine.run(batches)
    assert hook_count(network) == 0


def test_softmax_estimator_rows_per_class_grouped_by_case(tmp_path):
    network, batches = make_network(out_channels=3), named_batches(count=6, classes=3)
    _, handler = evaluate(network, batches, output_dir=tmp_path, activation="softmax", class_names=["left", "right"],
                          fit_estimator=True)
    rows = read_rows(tmp_path / "quality.csv")
    assert len(rows) == 24 and [row["class"] for row in rows[:2]] == ["left", "right"]
    for left, right in zip(rows[::2], rows[1::2]):
        assert left["case"] == right["case"] and left["max_prob"] == right["max_prob"]  # max over all channels
    defined = sum(row["mean_sa"] != "nan" and row["true_dice"] != "nan" for row in rows)
    assert handler.estimator.n_rows == defined and handler.estimator.n_rows + handler.estimator.n_excluded == 24
    assert handler.estimator.n_groups == len({row["case"] for row in rows if row["mean_sa"] != "nan"})


def test_sliding_window_with_tta_matches_whole_image_and_restores_the_inferer(tmp_path):
    network, batches = make_network(), named_batches(count=1, labels=False)
    evaluate(network, batches, output_dir=tmp_path / "simple", estimator=tmp_path / "absent.json", tta_flip=True)
    inferer = SlidingWindowInferer(roi_size=(16, 16))
    evaluator, _ = evaluate(network, batches, output_dir=tmp_path / "window", inferer=inferer,
                            estimator=tmp_path / "absent.json", tta_flip=True)
    assert evaluator.inferer is inferer and hook_count(network) == 0
    simple, window = read_rows(tmp_path / "simple" / "quality.csv"), read_rows(tmp_path / "window" / "quality.csv")
    for name in ("tta_disagreement", "mean_sa", "fg_prob", "volume"):
        assert [float(row[name]) for row in window] == pytest.approx([float(row[name]) for row in simple], abs=1e-4)


def test_sa_and_quality_handlers_build_each_layer_map_once_per_batch(tmp_path, monkeypatch):
    import monai_protoseg.protoseg as protoseg

    network, batches = make_network(), named_batches(count=2)
    alone_sa = SAScoreHandler(LAYERS)
    SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                        val_handlers=[alone_sa]).run()
    alone_scores = alone_sa.metric.layer_scores().clone()
    evaluate(network, batches, output_dir=tmp_path / "alone")
    calls = []
    original = protoseg._prototypes
    monkeypatch.setattr(protoseg, "_prototypes", lambda *args: calls.append(1) or original(*args))
    sa, quality = SAScoreHandler(LAYERS), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path / "together")
    SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                        val_handlers=[sa, quality]).run()
    assert len(calls) == len(batches) * len(LAYERS)  # QUALITY_LAYERS are among LAYERS: one map each
    torch.testing.assert_close(sa.metric.layer_scores(), alone_scores, equal_nan=True)
    assert read_rows(tmp_path / "together" / "quality.csv") == read_rows(tmp_path / "alone" / "quality.csv")


def test_handlers_with_other_guides_are_scored_apart(tmp_path):
    """A mask changes the prototypes: the SA handler's maps with a mask are not the quality handler's."""
    network, batches = make_network(), named_batches(count=2)
    for batch in batches:
        batch["mask"] = torch.zeros_like(batch["label"])
        batch["mask"][..., 2:14, 2:14] = 1
    expected = expected_rows(network, batches)
    sa, quality = SAScoreHandler(LAYERS, mask_key="mask"), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path)
    SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                        val_handlers=[sa, quality], decollate=False).run()
    for row, want in zip(read_rows(tmp_path / "quality.csv"), expected):
        assert float(row["mean_sa"]) == pytest.approx(want["mean_sa"], abs=1e-5)
    for n, batch in enumerate(batches):
        with torch.no_grad(), FeatureRecorder(network, LAYERS) as recorder:
            prob = torch.sigmoid(network(batch["image"].as_tensor()))
        for i, layer in enumerate(LAYERS):
            naive = naive_sa_score(recorder[layer].double(), prob.double(), batch["label"] > 0.5,
                                   batch["mask"].bool())
            torch.testing.assert_close(sa.metric.layer_scores()[2 * n:2 * n + 2, i, 0], naive.float(), atol=1e-5,
                                       rtol=0, equal_nan=True)
