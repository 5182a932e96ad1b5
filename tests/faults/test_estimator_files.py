"""Quality estimator and calibration files: values that would give silently wrong estimates are refused, naming the
file and the field; the files the handler fits carry the network's fingerprint, so that a file left from an earlier
model is refused (other architecture) or named (other weights) instead of used as if it were this model's."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging

import numpy as np
import pytest
import torch
from monai.networks.nets import UNet

from monai_protoseg import QualityCalibration, QualityEstimator, candidate_layers
from monai_protoseg.fingerprint import NetworkFingerprint, architecture_digest, weights_digest
from tests.handlers.test_mean_sa_quality_handler import QUALITY_LAYERS, evaluate, named_batches, read_rows
from tests.handlers.test_sa_score_handler import hook_count, make_network
from tests.test_estimator import fit, validation_rows


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextlib.contextmanager
def handler_log(caplog):
    """Capture the quality handler's log records in ``caplog``."""
    logger = logging.getLogger("monai_protoseg.handlers.mean_sa_quality")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def retrained(network: torch.nn.Module) -> torch.nn.Module:
    """The same architecture with other weights, as a later checkpoint of a training run has."""
    other = copy.deepcopy(network)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    return other


def wider(network: torch.nn.Module) -> torch.nn.Module:
    """Another architecture whose layers have the same names."""
    other = UNet(2, 1, 1, channels=(4, 8, 32), strides=(2, 2), num_res_units=1)
    assert candidate_layers(other) == candidate_layers(network)
    return other


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(scale=[0.0] * len(d["scale"])), "scale[0] must be > 0, got 0.0"),  # the reported fault
        (lambda d: d["scale"].__setitem__(2, -0.5), "scale[2] must be > 0, got -0.5"),
        (lambda d: d["coef"].__setitem__(1, float("nan")), "coef[1] must be a finite number, got nan"),
        (lambda d: d.update(intercept=1.7), "intercept must be in [0, 1], got 1.7"),
        (lambda d: d.update(alpha=0), "alpha must be > 0, got 0"),
        (lambda d: d["feature_names"].__setitem__(-1, d["feature_names"][0]),
         "feature_names must be distinct, but ['mean_sa'] appear more than once"),
        (lambda d: d["feature_sets"]["all"].update(cv_mae=3.0), "feature_sets['all'].cv_mae must be in [0, 1], got 3"),
        (lambda d: d["feature_sets"]["all"].update(cv_r=-1.5), "feature_sets['all'].cv_r must be in [-1, 1]"),
        (lambda d: d.update(fingerprint={"architecture": "abc", "weights": "0" * 64}),
         "fingerprint.architecture must be a sha256 digest (64 hexadecimal digits), got 'abc'"),
    ],
)
def test_an_edited_estimator_file_is_refused_naming_the_file_and_the_field(tmp_path, edit, message):
    x, dice, groups = validation_rows()
    data = fit(x, dice, groups).to_dict()
    edit(data)
    path = tmp_path / "quality_estimator.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as error:
        QualityEstimator.load(path)
    assert str(error.value).startswith(f"{path} is not a valid QualityEstimator file: {message}")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("pearson_r", 1.5, "pearson_r must be in [-1, 1], got 1.5"),
        ("mae", -0.1, "mae must be in [0, 1], got -0.1"),
        ("loo_mae", 2, "loo_mae must be in [0, 1], got 2"),
        ("slope", float("inf"), "slope must be a finite number, got inf"),
        ("fingerprint", {"architecture": "0" * 64}, "fingerprint.weights must be a sha256 digest"),
    ],
)
def test_an_edited_calibration_file_is_refused_naming_the_file_and_the_field(tmp_path, field, value, message):
    data = QualityCalibration.fit([0.2, 0.5, 0.9, 0.4], [0.3, 0.6, 0.8, 0.5]).to_dict()
    path = tmp_path / "quality_calibration.json"
    path.write_text(json.dumps({**data, field: value}))
    with pytest.raises(ValueError) as error:
        QualityCalibration.load(path)
    assert str(error.value).startswith(f"{path} is not a valid QualityCalibration file: {message}")


def test_standalone_fits_have_no_fingerprint_and_one_given_survives_the_file(tmp_path):
    network = make_network()
    fingerprint = NetworkFingerprint.of(network, QUALITY_LAYERS)
    calibration = QualityCalibration.fit([0.2, 0.5, 0.9], [0.3, 0.6, 0.8])
    estimator = fit(*validation_rows())
    for fitted in (calibration, estimator):
        assert fitted.fingerprint is None and "fingerprint" not in fitted.to_dict()
        path = dataclasses.replace(fitted, fingerprint=fingerprint).save(tmp_path / f"{type(fitted).__name__}.json")
        assert json.loads(path.read_text())["fingerprint"] == {"architecture": fingerprint.architecture,
                                                               "weights": fingerprint.weights}
        assert type(fitted).load(path) == dataclasses.replace(fitted, fingerprint=fingerprint)


def test_the_fingerprint_tells_architecture_layers_and_weights_apart():
    network = make_network()
    fingerprint = NetworkFingerprint.of(network, QUALITY_LAYERS)
    assert NetworkFingerprint.of(copy.deepcopy(network), QUALITY_LAYERS) == fingerprint
    other_weights = NetworkFingerprint.of(retrained(network), QUALITY_LAYERS)
    assert other_weights.architecture == fingerprint.architecture and other_weights.weights != fingerprint.weights
    assert architecture_digest(wider(network), QUALITY_LAYERS) != fingerprint.architecture
    assert architecture_digest(network, QUALITY_LAYERS[::-1]) != fingerprint.architecture  # the SA columns' order
    assert weights_digest(copy.deepcopy(network).double()) != fingerprint.weights
    assert all(len(digest) == 64 and int(digest, 16) >= 0 for digest in (fingerprint.architecture, fingerprint.weights))


def test_a_failed_refit_leaves_the_old_estimator_and_inference_names_it_fitted_on_other_weights(tmp_path, caplog):
    old = make_network()
    path = tmp_path / "models" / "quality_estimator.json"
    evaluate(old, named_batches(count=6), output_dir=tmp_path / "fit", estimator=path, fit_estimator=True)
    saved = json.loads(path.read_text())
    assert saved["fingerprint"] == {"architecture": architecture_digest(old, candidate_layers(old)),
                                    "weights": weights_digest(old)}
    before = sha256(path)

    new = retrained(old)  # 4 cases: too few to fit the new model's estimator
    with handler_log(caplog):
        _, handler = evaluate(new, named_batches(count=2), output_dir=tmp_path / "refit", estimator=path,
                              fit_estimator=True)
    assert handler.estimator is None and sha256(path) == before
    assert f"; {path}, from an earlier fit, is left as it was" in caplog.text

    caplog.clear()
    with handler_log(caplog):
        _, handler = evaluate(new, named_batches(count=2, labels=False), output_dir=tmp_path / "new", estimator=path)
    notes = {row["note"] for row in read_rows(tmp_path / "new" / "quality.csv")}
    assert notes == {f"estimator ({saved['chosen']}), fitted on other weights"}
    assert f"{path} was fitted for this network but on other weights" in caplog.text
    assert sha256(path) == before

    caplog.clear()
    with handler_log(caplog):
        evaluate(old, named_batches(count=2, labels=False), output_dir=tmp_path / "old", estimator=path)
    assert {row["note"] for row in read_rows(tmp_path / "old" / "quality.csv")} == {f"estimator ({saved['chosen']})"}
    assert "other weights" not in caplog.text and "fingerprint" not in caplog.text


def test_a_failed_refit_leaves_the_old_calibration_and_inference_names_it_fitted_on_other_weights(tmp_path, caplog):
    old = make_network()
    path = tmp_path / "quality_calibration.json"
    evaluate(old, named_batches(count=4), output_dir=tmp_path / "fit", calibration=path, fit_calibration=True)
    assert json.loads(path.read_text())["fingerprint"] == NetworkFingerprint.of(old, QUALITY_LAYERS).to_dict()
    before = sha256(path)
    new = retrained(old)
    with handler_log(caplog):  # two cases: too few for a calibration
        evaluate(new, named_batches(count=1), output_dir=tmp_path / "refit", calibration=path, fit_calibration=True)
    assert sha256(path) == before and f"{path}, from an earlier fit, is left as it was" in caplog.text
    caplog.clear()
    with handler_log(caplog):
        evaluate(new, named_batches(count=1, labels=False), output_dir=tmp_path / "new", calibration=path)
    assert {row["note"] for row in read_rows(tmp_path / "new" / "quality.csv")} == {
        "calibration, fitted on other weights"}
    assert f"{path} was fitted for this network but on other weights" in caplog.text
    evaluate(old, named_batches(count=1, labels=False), output_dir=tmp_path / "old", calibration=path)
    assert {row["note"] for row in read_rows(tmp_path / "old" / "quality.csv")} == {"calibration"}
    assert sha256(path) == before


def test_a_file_fitted_for_another_architecture_or_other_layers_is_an_error_naming_it(tmp_path):
    network = make_network()
    estimator, calibration = tmp_path / "estimator.json", tmp_path / "calibration.json"
    evaluate(network, named_batches(count=6), output_dir=tmp_path, estimator=estimator, fit_estimator=True,
             calibration=calibration, fit_calibration=True)
    before = sha256(estimator), sha256(calibration)
    other = wider(network)
    for kind, kwargs in (("quality estimator", {"estimator": estimator}), ("calibration", {"calibration": calibration}),
                         ("calibration", {"calibration": calibration, "layers": ["model.0", "model.2"]})):
        with pytest.raises(ValueError) as error:
            evaluate(network if "layers" in kwargs else other, named_batches(count=1, labels=False),
                     output_dir=tmp_path / "inference", **kwargs)
        path = kwargs.get("estimator", calibration)
        assert str(error.value).startswith(f"{path} was fitted for another network: ")
        assert f"fit a {kind} for this network" in str(error.value)
        assert hook_count(network) == 0 and hook_count(other) == 0
    with pytest.raises(ValueError, match=r"was fitted for another network: .* with guide='binary'"):
        evaluate(network, named_batches(count=1, labels=False), output_dir=tmp_path / "inference",
                 estimator=estimator, guide="binary")  # its SA features were guided by the soft probabilities
    given = QualityCalibration.load(calibration)
    with pytest.raises(ValueError, match="^the calibration given was fitted for another network"):
        evaluate(other, named_batches(count=1, labels=False), output_dir=tmp_path / "inference", calibration=given)
    assert (sha256(estimator), sha256(calibration)) == before
    assert not (tmp_path / "inference" / "quality.csv").exists()


def test_a_file_without_fingerprint_is_used_with_a_warning_that_it_cannot_be_checked(tmp_path, caplog):
    network = make_network()
    path = tmp_path / "estimator.json"
    evaluate(network, named_batches(count=6), output_dir=tmp_path / "fit", estimator=path, fit_estimator=True)
    data = json.loads(path.read_text())
    del data["fingerprint"]  # as an older monai_protoseg wrote it
    path.write_text(json.dumps(data))
    with handler_log(caplog):
        _, handler = evaluate(retrained(network), named_batches(count=1, labels=False), output_dir=tmp_path,
                              estimator=path)
    assert handler.estimator.fingerprint is None
    assert f"{path} has no network fingerprint" in caplog.text and "cannot be checked" in caplog.text
    assert {row["note"] for row in read_rows(tmp_path / "quality.csv")} == {f"estimator ({data['chosen']})"}
    rows = read_rows(tmp_path / "quality.csv")
    columns = {f"{prefix}{layer}": f"{prefix}{alias}" for layer, alias in handler.layer_aliases.items()
               for prefix in ("sa_", "spread_")}  # CSVs: by alias
    features = np.array([[float(row[columns.get(name, name)]) for name in data["feature_names"]] for row in rows])
    np.testing.assert_allclose([float(row["estimated_dice"]) for row in rows], handler.estimator.predict(features),
                               atol=1e-6)
