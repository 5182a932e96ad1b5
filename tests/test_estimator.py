"""QualityEstimator (ridge on quality features, grouped CV) and quality_features against independent formulations."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

import monai_protoseg
from monai_protoseg.conformal import conformal_halfwidth
from monai_protoseg.estimator import (
    ALPHAS,
    ESTIMATOR_FORMAT,
    PER_CLASS,
    QualityEstimator,
    activation_spread,
    aliased_feature,
    default_feature_sets,
    feature_names,
    group_folds,
    prototype_margins,
    quality_features,
)

LAYERS = ["enc", "mid", "dec"]
NAMES = feature_names(LAYERS)[:7]  # mean_sa, sa_enc, sa_mid, sa_dec, fg_prob, max_prob, volume


def validation_rows(n: int = 60, per_case: int = 2, seed: int = 0, noise: float = 0.05):
    """Feature rows in [0, 1], a true Dice that depends on several of them, and case groups of ``per_case`` rows."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, len(NAMES)))
    dice = np.clip(0.1 + 0.3 * x[:, 1] + 0.2 * x[:, 4] + 0.2 * x[:, 6] + rng.normal(0, noise, n), 0, 1)
    groups = np.repeat(np.arange(math.ceil(n / per_case)), per_case)[:n]
    return x, dice, groups


def fit(x, dice, groups=None, **kwargs) -> QualityEstimator:
    """``QualityEstimator.fit`` on ``NAMES``; the target is Dice itself unless ``target`` is given, as the oracles
    below regress Dice (the logit target has its own test)."""
    kwargs.setdefault("target", "identity")
    return QualityEstimator.fit(x, dice, groups, feature_names=NAMES, layers=LAYERS, mean_sa_layers=LAYERS[1:],
                                **kwargs)


def ridge_by_lstsq(x: np.ndarray, y: np.ndarray, alpha: float):
    """Oracle: standardise with the training rows, solve the augmented least squares [Z; sqrt(alpha) I] w = [y - mean
    y; 0] with numpy.linalg.lstsq; the unpenalised intercept of centred columns is the mean of y."""
    mean, std = x.mean(0), x.std(0)
    scale = np.where(std > 1e-12, std, 1.0)
    z = (x - mean) / scale
    augmented = np.vstack([z, math.sqrt(alpha) * np.eye(x.shape[1])])
    target = np.concatenate([y - y.mean(), np.zeros(x.shape[1])])
    coef = np.linalg.lstsq(augmented, target, rcond=None)[0]
    return mean, scale, coef, y.mean()


def cross_validate_by_hand(x, y, folds, alphas):
    """Oracle: an explicit loop over penalties and folds; the smallest MAE wins (ties: the larger penalty)."""
    best = None
    for alpha in sorted(alphas):
        estimates = np.empty_like(y)
        for fold in np.unique(folds):
            test = folds == fold
            mean, scale, coef, intercept = ridge_by_lstsq(x[~test], y[~test], alpha)
            estimates[test] = np.clip(intercept + (x[test] - mean) / scale @ coef, 0, 1)
        mae = np.abs(estimates - y).mean()
        if best is None or mae <= best[1]:
            best = (alpha, mae, np.corrcoef(estimates, y)[0, 1])
    return best


@pytest.mark.parametrize("alpha", [1e-3, 0.5, 30.0])
def test_ridge_coefficients_match_lstsq_on_the_augmented_system(alpha):
    x, dice, groups = validation_rows(seed=1)
    x[:, 5] = 0.25  # a constant feature: centred, not scaled, coefficient 0
    estimator = fit(x, dice, groups, feature_sets={"all": NAMES}, alphas=[alpha])
    mean, scale, coef, intercept = ridge_by_lstsq(x, dice, alpha)
    assert estimator.alpha == alpha and estimator.features == tuple(NAMES)
    np.testing.assert_allclose(estimator.mean, mean, rtol=1e-12)
    np.testing.assert_allclose(estimator.scale, scale, rtol=1e-12)
    np.testing.assert_allclose(estimator.coef, coef, rtol=1e-9, atol=1e-12)
    assert estimator.coef[5] == 0 and estimator.intercept == pytest.approx(intercept, rel=1e-12)
    new = np.random.default_rng(2).uniform(-1, 2, (20, len(NAMES)))
    np.testing.assert_allclose(estimator.predict(new), np.clip(intercept + (new - mean) / scale @ coef, 0, 1),
                               rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("sizes, n_folds", [([1] * 12, 5), ([3, 1, 4, 1, 5, 9, 2, 6], 3), ([2, 2, 7], 3)])
def test_group_folds_never_split_a_group_and_balance_the_folds(sizes, n_folds):
    labels = np.random.default_rng(0).permutation(np.repeat([f"case{i:02d}" for i in range(len(sizes))], sizes))
    folds = group_folds(labels, n_folds)
    assert folds.shape == labels.shape and set(folds.tolist()) == set(range(n_folds))
    for label in set(labels.tolist()):
        assert len(set(folds[labels == label].tolist())) == 1  # the whole group in one fold
    loads = np.bincount(folds, minlength=n_folds)
    assert loads.max() - loads.min() <= max(sizes)


def test_group_folds_of_equal_groups_go_round_robin():
    assert group_folds(np.repeat(np.arange(7), 2), 3).tolist() == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0, 0]
    with pytest.raises(ValueError, match="n_folds must be between 2 and the number of groups"):
        group_folds([0, 1], 3)


@pytest.mark.parametrize("per_case, seed", [(1, 0), (2, 3), (3, 4)])
def test_cross_validation_metrics_equal_an_explicit_loop(per_case, seed):
    x, dice, groups = validation_rows(n=45, per_case=per_case, seed=seed, noise=0.1)
    estimator = fit(x, dice, groups)
    folds = group_folds(groups, min(5, len(set(groups.tolist()))))
    assert estimator.n_folds == 5 and estimator.n_rows == 45 and estimator.n_groups == len(set(groups.tolist()))
    sets = default_feature_sets(NAMES)
    assert list(estimator.feature_sets) == ["mean_sa", "sa_profile", "confidence", "all"] == list(sets)
    maes = {}
    for name, columns in sets.items():
        index = [NAMES.index(column) for column in columns]
        alpha, mae, r = cross_validate_by_hand(x[:, index], dice, folds, ALPHAS)
        score = estimator.feature_sets[name]
        assert score.features == tuple(columns) and score.alpha == alpha
        assert score.cv_mae == pytest.approx(mae, rel=1e-9) and score.cv_r == pytest.approx(r, rel=1e-9)
        maes[name] = mae
    assert estimator.chosen == min(maes, key=maes.get) == "all"  # Dice depends on features of several sets
    index = [NAMES.index(column) for column in sets["all"]]
    mean, scale, coef, intercept = ridge_by_lstsq(x[:, index], dice, estimator.alpha)  # refit on all rows
    np.testing.assert_allclose(estimator.coef, coef, rtol=1e-9, atol=1e-12)


def test_a_perfectly_linear_relation_is_recovered():
    x, _, groups = validation_rows(n=40, seed=5)
    dice = 0.1 + 0.4 * x[:, 0] + 0.3 * x[:, 4]  # mean SA and confidence: only "all" has both
    estimator = fit(x, dice, groups)
    best = estimator.feature_sets["all"]
    assert estimator.chosen == "all" and best.alpha == ALPHAS[0]
    assert best.cv_r == pytest.approx(1, abs=1e-5) and best.cv_mae == pytest.approx(0, abs=1e-3)
    np.testing.assert_allclose(estimator.predict(x), dice, atol=1e-3)
    assert estimator.feature_sets["mean_sa"].cv_mae > 0.05  # one of the two alone is far off


def test_predictions_are_clipped_and_nan_only_where_a_used_feature_is_nan():
    x, dice, groups = validation_rows(seed=6)
    estimator = fit(x, dice, groups, feature_sets={"profile": ["sa_enc", "sa_mid", "sa_dec"]})
    assert estimator.chosen == "profile"
    extreme = np.zeros((4, len(NAMES)))
    extreme[0, 1:4], extreme[1, 1:4] = -50, 50
    extreme[2, 1] = np.nan  # a used feature is undefined: no estimate
    extreme[3, 4] = np.nan  # an unused one: no matter
    estimated = estimator.predict(extreme)
    assert estimated[:2].tolist() in ([0.0, 1.0], [1.0, 0.0]) and math.isnan(estimated[2])
    assert 0 <= estimated[3] <= 1
    batch = estimator.predict(torch.from_numpy(x.reshape(20, 3, len(NAMES))))  # (N, K, F) -> (N, K)
    # the same rows, to rounding: BLAS takes another path for a (20, 3, F) than a (60, F) product
    np.testing.assert_allclose(batch, estimator.predict(x).reshape(20, 3), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="features must have 7 columns"):
        estimator.predict(x[:, :6])


def test_rows_with_an_undefined_feature_or_dice_are_left_out_and_counted():
    x, dice, groups = validation_rows(seed=7)
    x[3, 0] = np.nan  # empty prediction: SA undefined
    dice[8] = np.nan  # empty label
    estimator = fit(x, dice, groups)
    keep = np.ones(x.shape[0], bool)
    keep[[3, 8]] = False
    assert (estimator.n_rows, estimator.n_excluded) == (58, 2)
    assert estimator.to_dict() == {**fit(x[keep], dice[keep], groups[keep]).to_dict(), "n_excluded": 2}


@pytest.mark.parametrize(
    "rows, undefined, groups, match",
    [
        (9, 0, None, r"on 9 valid row\(s\) from 9 group\(s\) \(0 of 9 excluded .*at least 10 rows from 3 groups"),
        (12, 0, [0] * 6 + [1] * 6, r"on 12 valid row\(s\) from 2 group\(s\)"),
        (11, 2, None, r"on 9 valid row\(s\) from 9 group\(s\) \(2 of 11 excluded because a feature or the true Dice"),
    ],
)
def test_too_few_cases_is_an_error_that_says_why(rows, undefined, groups, match):
    x, dice, _ = validation_rows(n=rows)
    x[:undefined, 4] = np.nan
    with pytest.raises(ValueError, match=match):
        fit(x, dice, groups)
    assert fit(*validation_rows(n=10)).n_rows == 10  # 10 rows from 5 cases are enough


@pytest.mark.parametrize(
    "change, match",
    [
        ({"features": np.ones((12, 3))}, "feature_names must be 3 distinct names"),
        ({"dice": np.full(12, 1.5)}, r"dice must be in \[0, 1\]"),
        ({"dice": np.full(11, 0.5)}, "features has 12 rows but dice 11"),
        ({"features": np.full((12, 7), np.inf)}, "finite or NaN"),
        ({"groups": np.arange(11)}, "groups has 11 labels for 12 rows"),
        ({"feature_sets": {"odd": ["sa_enc", "unknown"]}}, r"feature set 'odd' must name features.*\['unknown'\]"),
        ({"alphas": [0.0, 1.0]}, "alphas must be positive"),
    ],
)
def test_bad_inputs_are_named(change, match):
    x, dice, groups = validation_rows(n=12)
    kwargs = {"features": x, "dice": dice, "groups": groups, **change}
    with pytest.raises(ValueError, match=match):
        QualityEstimator.fit(kwargs.pop("features"), kwargs.pop("dice"), kwargs.pop("groups"), feature_names=NAMES,
                             layers=LAYERS, **kwargs)


def test_json_round_trip_is_exact(tmp_path):
    x, dice, groups = validation_rows(seed=8)
    estimator = fit(x, dice, groups)
    path = estimator.save(tmp_path / "nested" / "estimator.json")
    data = json.loads(path.read_text())
    assert data["format"] == ESTIMATOR_FORMAT and data["version"] == 3
    assert data["versions"] == {"monai_protoseg": monai_protoseg.__version__, "torch": torch.__version__,
                                "numpy": np.__version__}
    assert data["feature_names"] == NAMES and data["layers"] == LAYERS and data["mean_sa_layers"] == LAYERS[1:]
    loaded = QualityEstimator.load(str(path), layers=LAYERS, mean_sa_layers=LAYERS[1:])
    assert loaded == estimator  # floats survive JSON exactly
    np.testing.assert_array_equal(loaded.predict(x), estimator.predict(x))
    assert sorted(p.name for p in path.parent.iterdir()) == ["estimator.json"]  # no temporary file left


def test_undefined_correlation_is_saved_as_null(tmp_path):
    x, _, groups = validation_rows(seed=9)
    estimator = fit(x, np.full(x.shape[0], 0.8), groups)  # constant Dice: out-of-fold estimates constant, r NaN
    assert math.isnan(estimator.feature_sets["all"].cv_r)
    path = estimator.save(tmp_path / "estimator.json")
    assert json.loads(path.read_text())["feature_sets"]["all"]["cv_r"] is None
    loaded = QualityEstimator.load(path)
    assert math.isnan(loaded.feature_sets["all"].cv_r) and loaded.to_dict() == estimator.to_dict()


def test_loading_for_other_layers_is_an_error_that_names_both(tmp_path):
    path = fit(*validation_rows()).save(tmp_path / "estimator.json")
    with pytest.raises(ValueError) as error:
        QualityEstimator.load(path, layers=["enc", "dec"])
    message = str(error.value)
    assert str(path) in message and "['enc', 'mid', 'dec']" in message and "['enc', 'dec']" in message
    assert "a network with other layers needs its own estimator" in message
    with pytest.raises(ValueError, match=r"mean SA of \['dec'\]"):
        QualityEstimator.load(path, layers=LAYERS, mean_sa_layers=["dec"])


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: {**d, "format": "monai_protoseg.QualityCalibration"}, "format must be 'monai_protoseg.Quality"),
        (lambda d: {**d, "version": 4}, "version 4 is not supported"),
        (lambda d: {k: v for k, v in d.items() if k not in ("coef", "layers")}, "missing field.*layers.*coef"),
        (lambda d: {**d, "coef": d["coef"][:-1]}, "one mean, scale and coef each"),
        (lambda d: {**d, "intercept": None}, "intercept must be a finite number"),
        (lambda d: {**d, "layers": "enc"}, "layers must be a list"),
        (lambda d: {**d, "chosen": "nothing"}, "contains the chosen set 'nothing'"),
        (lambda d: {**d, "n_rows": -1}, "n_rows must be an integer >= 0"),
        (lambda d: [d], "must be a JSON object"),
    ],
)
def test_load_rejects_wrong_content_naming_the_file(tmp_path, edit, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(edit(fit(*validation_rows()).to_dict())))
    with pytest.raises(ValueError, match=match) as error:
        QualityEstimator.load(path)
    assert f"{path} is not a valid QualityEstimator file" in str(error.value)


def test_load_of_corrupt_or_missing_files_names_them(tmp_path):
    corrupt = tmp_path / "corrupt.json"
    corrupt.write_bytes(b'{"format": "monai_protoseg.QualityEstimator", "coef": [0.')
    with pytest.raises(ValueError, match="is not a QualityEstimator JSON file") as error:
        QualityEstimator.load(corrupt)
    assert str(corrupt) in str(error.value)
    with pytest.raises(FileNotFoundError, match="absent.json"):
        QualityEstimator.load(tmp_path / "absent.json")


def test_failed_replace_leaves_the_old_file_and_no_temporary_file(tmp_path, monkeypatch):
    path = fit(*validation_rows()).save(tmp_path / "estimator.json")
    before = path.read_bytes()

    def failing_replace(source, destination):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk went away"):
        fit(*validation_rows(seed=3)).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["estimator.json"]


def test_features_match_hand_computed_values_sigmoid():
    prob = torch.tensor([[[[0.9, 0.6], [0.2, 0.1]], [[0.4, 0.3], [0.2, 0.1]]]])  # (B=1, K=2, 2, 2)
    prediction = prob > 0.5  # class 0 predicts 2 pixels, class 1 none
    flipped = torch.tensor([[[[True, False], [True, False]], [[False, False], [False, False]]]])
    layer_sa = torch.tensor([[[0.8, math.nan], [0.6, math.nan], [0.4, math.nan]]])  # (B, L=3, K)
    rows = quality_features(prob, prediction, layer_sa, [1, 2], tta_prediction=flipped)
    assert rows.shape == (1, 2, 10) and rows.dtype == torch.float64
    assert feature_names(LAYERS, tta=True) == [*NAMES, "entropy", "boundary_margin", "tta_disagreement"]

    def bits(p: float) -> float:
        return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))

    # class 0: mean SA of layers 1, 2; fg_prob (0.9 + 0.6) / 2; max(p, 1 - p) = 0.9, 0.6, 0.8, 0.9; volume 2 / 4;
    # entropy in bits; the top row is predicted, the bottom not: every pixel is on the boundary, margins |2p - 1|
    # 0.8, 0.2, 0.6, 0.8; TTA: 1 overlapping pixel of 2 + 2: 1 - 2 * 1 / 4
    entropy = (bits(0.9) + bits(0.6) + bits(0.2) + bits(0.1)) / 4
    np.testing.assert_allclose(rows[0, 0].numpy(), [0.5, 0.8, 0.6, 0.4, 0.75, 0.8, 0.5, entropy, 0.6, 0.5], atol=1e-7)
    # class 1: empty prediction: SA, fg_prob and the boundary margin undefined, volume 0, both predictions empty: no
    # disagreement
    assert torch.isnan(rows[0, 1, :5]).all() and torch.isnan(rows[0, 1, 8])
    entropy = (bits(0.4) + bits(0.3) + bits(0.2) + bits(0.1)) / 4
    np.testing.assert_allclose(rows[0, 1, [5, 6, 7, 9]].numpy(), [(0.6 + 0.7 + 0.8 + 0.9) / 4, 0, entropy, 0],
                               atol=1e-7)


def test_boundary_margin_counts_both_sides_of_every_edge_and_only_those():
    prob = torch.full((1, 1, 4, 4), 0.1)
    prob[..., 1:3, 1:3] = torch.tensor([[0.9, 0.7], [0.6, 0.8]])  # a 2 x 2 prediction in the middle
    prob[..., 0, 0] = 0.45  # a corner pixel: only diagonal to the prediction, not on the boundary
    rows = quality_features(prob, prob > 0.5, torch.full((1, 1, 1), 0.5), [0])
    # boundary: the 4 predicted pixels (margins 0.8, 0.4, 0.2, 0.6) and their 8 face neighbours outside (0.8 each)
    assert rows[0, 0, 6].item() == pytest.approx((0.8 + 0.4 + 0.2 + 0.6 + 8 * 0.8) / 12)


def test_prototype_margins_are_protoseg_logits_over_the_squared_prototype_distance():
    # one channel, f = 0, 1, 2, 4, guided by 0, 0, 1, 1: c_fg 3, c_bg 0.5, z = (|f - 0.5|^2 - |f - 3|^2) / 2.5^2
    features = torch.tensor([[[[0.0, 1.0, 2.0, 4.0]]]])
    prob = torch.tensor([[[[0.0, 0.0, 1.0, 1.0]]]])
    z = prototype_margins({"a": features}, prob)
    np.testing.assert_allclose(z[0, 0, 0, 0].numpy(), [-1.4, -0.6, 0.2, 1.8], atol=1e-6)
    rows = quality_features(prob, prob > 0.5, torch.full((1, 1, 1), 0.5), [0], margins=z)
    assert feature_names(LAYERS, prototype=True)[-3:] == ["proto_in", "proto_out", "proto_near"]
    # proto_in: mean |z| of the predicted pixels, proto_out: of the others, proto_near: |z| < 0.5 on 1 pixel of 4
    np.testing.assert_allclose(rows[0, 0, -3:].numpy(), [1.0, 1.0, 0.25], atol=1e-6)


def test_activation_spread_is_the_channel_mean_of_the_spatial_population_std():
    generator = torch.Generator().manual_seed(0)
    features = {"low": torch.randn(2, 3, 4, 5, generator=generator) * 3 + 1,
                "3d": torch.rand(2, 2, 3, 4, 2, generator=generator).half(),
                "full": torch.randn(2, 5, 8, 8, generator=generator, dtype=torch.float64)}
    spread = activation_spread(features)
    assert spread.shape == (2, 3) and spread.dtype == torch.float64
    for l, f in enumerate(features.values()):
        values = f.double().numpy().reshape(2, f.shape[1], -1)
        expected = [np.mean([np.std(values[b, c]) for c in range(f.shape[1])]) for b in range(2)]  # ddof 0
        np.testing.assert_allclose(spread[:, l].numpy(), expected, rtol=1e-6)
    assert activation_spread({"flat": torch.ones(1, 4, 3, 3)}).tolist() == [[0.0]]


def test_spread_columns_follow_the_margin_columns_the_same_for_every_class():
    prob = torch.tensor([[[[0.9, 0.2, 0.6, 0.1]], [[0.1, 0.7, 0.3, 0.2]]]])  # (B=1, K=2, 1, 4)
    spread = torch.tensor([[0.25, 4.0, 1.5]])
    names = feature_names(LAYERS, spread=True)
    assert names[-3:] == ["spread_enc", "spread_mid", "spread_dec"]
    assert feature_names(LAYERS, tta=True, prototype=True, spread=True)[-7:] == [
        "spread_enc", "spread_mid", "spread_dec", "proto_in", "proto_out", "proto_near", "tta_disagreement"]
    rows = quality_features(prob, prob > 0.5, torch.full((1, 3, 2), 0.5), [1, 2], spread=spread)
    without = quality_features(prob, prob > 0.5, torch.full((1, 3, 2), 0.5), [1, 2])
    assert rows.shape == (1, 2, len(names))
    torch.testing.assert_close(rows[..., :-3], without)
    for k in range(2):
        assert rows[0, k, -3:].tolist() == [0.25, 4.0, 1.5]
    with pytest.raises(ValueError, match=r"spread must be \(B=1, L=3\).*got \(1, 2\)"):
        quality_features(prob, prob > 0.5, torch.full((1, 3, 2), 0.5), [1, 2], spread=spread[:, :2])


def test_aliased_feature_names_the_layer_of_sa_and_spread_columns_only():
    aliases = {"model.1.submodule": "bottleneck", "prob": "output"}
    assert [aliased_feature(name, aliases) for name in
            ("sa_model.1.submodule", "spread_model.1.submodule", "fg_prob", "sa_model.0", "mean_sa")] == [
        "sa_bottleneck", "spread_bottleneck", "fg_prob", "sa_model.0", "mean_sa"]


def test_prototype_margins_match_features_resized_first_with_soft_prototypes():
    generator = torch.Generator().manual_seed(0)
    features = {"low": torch.randn(2, 3, 4, 4, generator=generator),
                "full": torch.randn(2, 5, 8, 8, generator=generator)}
    prob = torch.rand(2, 2, 8, 8, generator=generator)
    z = prototype_margins(features, prob)
    assert z.shape == (2, 2, 2, 8, 8)
    for l, f in enumerate(features.values()):  # oracle: resize, soft-weighted means, squared distances
        f = torch.nn.functional.interpolate(f.double(), size=(8, 8), mode="bilinear", align_corners=False)
        for k in range(2):
            w = prob[:, k:k + 1].double()
            fg = (w * f).sum((2, 3)) / w.sum((2, 3))
            bg = ((1 - w) * f).sum((2, 3)) / (1 - w).sum((2, 3))
            logit = ((f - bg[..., None, None]) ** 2).sum(1) - ((f - fg[..., None, None]) ** 2).sum(1)
            expected = logit / ((fg - bg) ** 2).sum(1)[:, None, None]
            np.testing.assert_allclose(z[:, l, k].numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)
    # no foreground: the prototype does not exist, z is NaN, and so are the prototype features
    empty = prototype_margins({"a": features["full"]}, torch.zeros(2, 1, 8, 8))
    assert empty.isnan().all()


def test_features_match_hand_computed_values_softmax():
    logits = torch.tensor([[[[2.0, 0.0, 0.0]], [[0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0]]]])  # (B=1, C=3, 1, 3)
    channel_prob = torch.softmax(logits, 1)
    prob = channel_prob[:, 1:]  # background dropped
    prediction = torch.nn.functional.one_hot(channel_prob.argmax(1), 3).permute(0, 3, 1, 2)[:, 1:].bool()
    rows = quality_features(prob, prediction, torch.full((1, 1, 2), 0.5), [0], channel_prob=channel_prob)
    top = channel_prob.amax(1).mean().item()  # mean over pixels of the max over all channels, for every class
    e = math.e
    assert top == pytest.approx((e**2 / (e**2 + 2) + e / (e + 2) + e**3 / (e**3 + 2)) / 3, rel=1e-6)
    assert rows.shape == (1, 2, 7)  # mean_sa, one layer's SA, fg_prob, max_prob, volume, entropy, boundary_margin
    np.testing.assert_allclose(rows[0, :, 2].numpy(), [e / (e + 2), e**3 / (e**3 + 2)], rtol=1e-6)  # fg_prob
    np.testing.assert_allclose(rows[0, :, 3].numpy(), [top, top], rtol=1e-6)
    np.testing.assert_allclose(rows[0, :, 4].numpy(), [1 / 3, 1 / 3])  # volume


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"prediction": torch.ones(2, 1, 4, 5)}, "prob and prediction must both be"),
        ({"layer_sa": torch.ones(2, 3, 2)}, r"layer_sa must be \(B=2, L, K=1\)"),
        ({"mean_sa_layers": [3]}, r"indices in \[0, 3\)"),
        ({"channel_prob": torch.ones(2, 2, 4, 5)}, "channel_prob must be"),
        ({"tta_prediction": torch.ones(2, 2, 4, 4)}, "tta_prediction must be"),
        ({"margins": torch.ones(2, 1, 4, 4)}, "margins must be"),
    ],
)
def test_feature_inputs_are_checked(kwargs, match):
    args = {"prob": torch.rand(2, 1, 4, 4), "prediction": torch.ones(2, 1, 4, 4), "layer_sa": torch.ones(2, 3, 1),
            "mean_sa_layers": [1, 2], **kwargs}
    with pytest.raises(ValueError, match=match):
        quality_features(args.pop("prob"), args.pop("prediction"), args.pop("layer_sa"), args.pop("mean_sa_layers"),
                         **args)


def test_cv_table_lists_every_set_and_marks_the_chosen_one():
    estimator = fit(*validation_rows())
    lines = estimator.cv_table().splitlines()
    assert len(lines) == 6 and "CV r" in lines[0] and "CV MAE" in lines[0]
    assert [line[2:].split()[0] for line in lines[1:-1]] == list(estimator.feature_sets)
    assert [line.startswith("*") for line in lines[1:-1]] == [name == estimator.chosen for name in estimator.feature_sets]
    assert lines[-1].split()[:4] == ["nested", "CV", f"{estimator.nested_r:.3f}", f"{estimator.nested_mae:.3f}"]


# issue 18: nested cross-validation, selection rule, target transform, conformal intervals


def nested_by_hand(x, y, groups, sets, selection="min"):
    """Oracle: for every outer fold, choose penalty and set by grouped CV on the other folds (explicit loops), refit
    there by lstsq, estimate the fold."""
    n_groups = np.unique(groups).size
    outer = group_folds(groups, min(5, n_groups))
    estimates = np.empty_like(y)
    for fold in np.unique(outer):
        test = outer == fold
        inner = group_folds(groups[~test], min(5, np.unique(groups[~test]).size))
        scores = {}
        for name, columns in sets.items():
            index = [NAMES.index(column) for column in columns]
            alpha, mae, _ = cross_validate_by_hand(x[~test][:, index], y[~test], inner, ALPHAS)
            fold_mae = []
            for f in np.unique(inner):
                mean, scale, coef, intercept = ridge_by_lstsq(x[~test][inner != f][:, index], y[~test][inner != f],
                                                              alpha)
                held = np.clip(intercept + (x[~test][inner == f][:, index] - mean) / scale @ coef, 0, 1)
                fold_mae.append(np.abs(held - y[~test][inner == f]).mean())
            scores[name] = (alpha, mae, np.std(fold_mae, ddof=1) / math.sqrt(len(fold_mae)), index)
        best = min(scores, key=lambda name: scores[name][1])
        within = [name for name in scores if scores[name][1] <= scores[best][1] + scores[best][2]]
        if selection == "one_se":
            best = min(within, key=lambda name: len(scores[name][3]))
        elif selection == "one_se_largest":
            best = max(within, key=lambda name: (len(scores[name][3]), -within.index(name)))
        alpha, _, _, index = scores[best]
        mean, scale, coef, intercept = ridge_by_lstsq(x[~test][:, index], y[~test], alpha)
        estimates[test] = np.clip(intercept + (x[test][:, index] - mean) / scale @ coef, 0, 1)
    return estimates


@pytest.mark.parametrize("selection", ["min", "one_se", "one_se_largest"])
def test_nested_cv_matches_a_hand_written_loop(selection):
    x, dice, groups = validation_rows(n=40, per_case=2, seed=3, noise=0.08)
    estimator = fit(x, dice, groups, selection=selection)
    expected = nested_by_hand(x, dice, groups, default_feature_sets(NAMES), selection)
    np.testing.assert_allclose(estimator.residuals, np.abs(expected - dice), atol=1e-9)
    assert estimator.nested_mae == pytest.approx(np.abs(expected - dice).mean(), abs=1e-12)
    assert estimator.nested_r == pytest.approx(np.corrcoef(expected, dice)[0, 1], abs=1e-9)
    # the nested figure is honest: not better than the chosen set's own (selection-biased) CV figure here
    assert estimator.nested_mae >= estimator.feature_sets[estimator.chosen].cv_mae - 0.02


def test_one_se_rule_picks_the_fewest_features_within_one_standard_error():
    x, dice, groups = validation_rows(n=60, seed=5, noise=0.15)
    minimum = fit(x, dice, groups, selection="min", nested=False)
    one_se = fit(x, dice, groups, selection="one_se", nested=False)
    scores = one_se.feature_sets
    best = min(scores, key=lambda name: scores[name].cv_mae)
    assert minimum.chosen == best
    within = [name for name in scores if scores[name].cv_mae <= scores[best].cv_mae + scores[best].cv_mae_se]
    assert one_se.chosen == min(within, key=lambda name: len(scores[name].features))
    assert all(score.cv_mae_se > 0 for score in scores.values())
    assert math.isnan(one_se.nested_mae) and one_se.residuals == ()  # nested=False


def test_one_se_largest_rule_picks_the_most_features_within_one_standard_error():
    x, dice, groups = validation_rows(n=60, seed=7, noise=0.2)
    largest = fit(x, dice, groups, selection="one_se_largest", nested=False)
    scores = largest.feature_sets
    best = min(scores, key=lambda name: scores[name].cv_mae)
    within = [name for name in scores if scores[name].cv_mae <= scores[best].cv_mae + scores[best].cv_mae_se]
    assert largest.chosen == max(within, key=lambda name: len(scores[name].features))
    # on these rows the three rules choose three different sets: the test tells them apart
    assert [largest.chosen, best, fit(x, dice, groups, selection="one_se", nested=False).chosen] == [
        "all", "sa_profile", "mean_sa"]


def test_defaults_are_the_logit_target_and_the_one_se_largest_rule():
    x, dice, groups = validation_rows()
    default = QualityEstimator.fit(x, dice, groups, feature_names=NAMES, layers=LAYERS, nested=False)
    explicit = fit(x, dice, groups, target="logit", selection="one_se_largest", nested=False)
    assert (default.target, default.selection) == ("logit", "one_se_largest")
    np.testing.assert_array_equal(default.predict(x), explicit.predict(x))
    assert default_feature_sets(feature_names(LAYERS, tta=True, prototype=True, spread=True))["all"] == [
        *feature_names(LAYERS), "spread_enc", "spread_mid", "spread_dec", "tta_disagreement"]  # all but prototype


def test_logit_target_fits_the_logit_and_predicts_its_sigmoid():
    x, dice, groups = validation_rows()
    estimator = fit(x, dice, groups, target="logit", feature_sets={"all": NAMES}, alphas=[0.5], nested=False)
    clipped = np.clip(dice, 0.01, 0.99)
    mean, scale, coef, intercept = ridge_by_lstsq(x, np.log(clipped / (1 - clipped)), 0.5)
    np.testing.assert_allclose(estimator.coef, coef, rtol=1e-9, atol=1e-12)
    expected = 1 / (1 + np.exp(-(intercept + (x - mean) / scale @ coef)))
    np.testing.assert_allclose(estimator.predict(x), expected, rtol=1e-12)
    assert QualityEstimator.from_dict(json.loads(json.dumps(estimator.to_dict()))).to_dict() == estimator.to_dict()


@pytest.mark.parametrize("n, coverage", [(1, 0.5), (9, 0.9), (10, 0.9), (37, 0.8), (200, 0.95), (19, 0.95)])
def test_conformal_half_width_matches_the_definition_by_direct_search(n, coverage):
    residuals = np.random.default_rng(n).normal(0, 0.1, n)
    values = np.abs(residuals)
    # definition: the smallest residual q with #{r <= q} >= (n + 1) * coverage; none: infinite
    candidates = [q for q in sorted(values) if (values <= q).sum() >= (n + 1) * coverage - 1e-12]
    expected = candidates[0] if candidates else math.inf
    assert conformal_halfwidth(residuals, coverage) == expected
    assert conformal_halfwidth(np.append(residuals, np.nan), coverage) == expected  # NaN ignored


def test_conformal_half_width_bad_coverage_is_an_error():
    for coverage in (0, 1, 1.5, True):
        with pytest.raises(ValueError, match="coverage must be a number in"):
            conformal_halfwidth([0.1, 0.2], coverage)


def test_intervals_per_class_use_their_own_residuals_else_the_pooled_ones():
    x, dice, groups = validation_rows(n=80, seed=2)
    classes = np.where(np.arange(80) % 2 == 0, "grey", "white")
    estimator = fit(x, dice, groups, classes=classes)
    residuals = np.array(estimator.residuals)
    assert estimator.residual_classes == tuple(classes)
    estimate = np.array([0.5, 0.5, 0.5])
    low, high = estimator.interval(estimate, 0.9, np.array(["grey", "white", "csf"]))
    grey = conformal_halfwidth(residuals[classes == "grey"], 0.9)
    white = conformal_halfwidth(residuals[classes == "white"], 0.9)
    pooled = conformal_halfwidth(residuals, 0.9)
    np.testing.assert_allclose(high - estimate, [grey, white, pooled])  # an unknown class: the pooled width
    np.testing.assert_allclose(estimate - low, [grey, white, pooled])
    low, high = estimator.interval(np.array([0.02, np.nan]), 0.9)
    assert low[0] == 0 and high[0] == pytest.approx(0.02 + pooled) and np.isnan(low[1]) and np.isnan(high[1])


def test_a_version_1_file_loads_without_intervals():
    data = fit(*validation_rows()).to_dict()
    for name in ("selection", "target", "nested_r", "nested_mae", "residuals", "residual_classes", "tta_axes"):
        data.pop(name)
    for score in data["feature_sets"].values():
        score.pop("cv_mae_se")
    data["version"] = 1
    estimator = QualityEstimator.from_dict(data)
    assert estimator.selection == "min" and math.isnan(estimator.nested_mae)
    low, high = estimator.interval(np.array([0.5]), 0.9)
    assert np.isnan(low).all() and np.isnan(high).all()


def test_three_groups_give_three_folds_and_nested_cv_still_runs():
    x, dice, _ = validation_rows(n=30)
    estimator = fit(x, dice, np.arange(30) % 3)
    assert estimator.n_folds == 3 and math.isfinite(estimator.nested_mae) and len(estimator.residuals) == 30


# issue 18, item 6: per-class estimators when the classes differ enough


def two_class_rows(same: bool, n: int = 80, seed: int = 0):
    """Rows of two classes ("grey", "white") from the same cases; Dice depends on other features in each class unless
    ``same``."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 1, (n, len(NAMES)))
    classes = np.array(["grey", "white"] * (n // 2))
    white = classes == "white"
    dice = 0.1 + 0.4 * x[:, 1] + 0.3 * x[:, 4]
    if not same:
        dice = np.where(white, 0.9 - 0.5 * x[:, 2] - 0.3 * x[:, 6], dice)
    dice = np.clip(dice + rng.normal(0, 0.02, n), 0, 1)
    groups = np.repeat(np.arange(n // 2), 2)  # the two classes of one case share a group
    return x, dice, groups, classes


def test_per_class_estimators_are_kept_when_classes_differ_and_equal_fits_on_each_class():
    x, dice, groups, classes = two_class_rows(same=False)
    estimator = fit(x, dice, groups, classes=classes)
    assert list(estimator.per_class) == ["grey", "white"]
    expected = np.empty(dice.size)
    residuals = np.empty(dice.size)
    for label in ("grey", "white"):
        rows = classes == label
        own = fit(x[rows], dice[rows], groups[rows], per_class=False)
        assert estimator.per_class[label].coef == own.coef and estimator.per_class[label].chosen == own.chosen
        expected[rows] = own.predict(x[rows])
        residuals[rows] = own.residuals
    np.testing.assert_array_equal(estimator.predict(x, classes), expected)
    np.testing.assert_allclose(estimator.residuals, residuals, rtol=0, atol=0)  # the per-class procedure's errors
    assert estimator.nested_mae == pytest.approx(residuals.mean(), abs=1e-15)
    pooled = fit(x, dice, groups, per_class=False)
    # the decision, by hand: the per-class nested MAE is lower by more than one SE (over groups) of the difference
    difference = residuals - np.array(pooled.residuals)
    by_group = np.array([difference[groups == g].mean() for g in np.unique(groups)])
    se = by_group.std(ddof=1) / math.sqrt(by_group.size)
    assert difference.mean() + se < 0
    assert (estimator.pooled_nested_mae, estimator.per_class_nested_mae) == pytest.approx(
        (pooled.nested_mae, residuals.mean()), abs=1e-15)
    assert estimator.per_class_se == pytest.approx(se, abs=1e-15)
    assert estimator.per_class_nested_mae < 0.5 * estimator.pooled_nested_mae  # pooling loses clearly here
    columns, rows = estimator.cv_rows()
    by_class = [row[columns.index("class")] for row in rows]
    assert by_class.count("grey") == by_class.count("white") == len(estimator.feature_sets) + 1
    assert rows[-1][columns.index("class")] == "per class"
    assert rows[-1][columns.index("cv_mae")] == estimator.nested_mae


def test_pooled_estimator_is_kept_when_classes_follow_the_same_relation():
    x, dice, groups, classes = two_class_rows(same=True)
    estimator = fit(x, dice, groups, classes=classes)
    pooled = fit(x, dice, groups, classes=classes, per_class=False)
    assert estimator.per_class == {} and not math.isnan(estimator.per_class_nested_mae)
    assert estimator.nested_mae == pooled.nested_mae == estimator.pooled_nested_mae
    np.testing.assert_array_equal(estimator.predict(x), pooled.predict(x))  # no classes needed
    forced = fit(x, dice, groups, classes=classes, per_class=True)
    assert list(forced.per_class) == ["grey", "white"] and forced.nested_mae == forced.per_class_nested_mae


def test_per_class_needs_enough_rows_of_every_class():
    x, dice, groups, classes = two_class_rows(same=False)
    classes[:] = "grey"
    classes[[1, 3, 5]] = "white"  # 3 rows of white
    assert fit(x, dice, groups, classes=classes).per_class == {}  # "auto": pooled
    with pytest.raises(ValueError, match=r"per_class=True: class 'white': cannot fit a quality estimator on 3 valid"):
        fit(x, dice, groups, classes=classes, per_class=True)
    with pytest.raises(ValueError, match="per_class=True .* needs nested=True"):
        fit(x, dice, groups, classes=classes, per_class=True, nested=False)
    with pytest.raises(ValueError, match=r"per_class must be one of \('auto', True, False\), got 'yes'"):
        fit(x, dice, groups, classes=classes, per_class="yes")
    with pytest.raises(ValueError, match=r"per_class must be one of \('auto', True, False\), got 1"):
        fit(x, dice, groups, classes=classes, per_class=1)


def test_per_class_auto_read_from_a_config_is_accepted():
    """A bundle's ``"auto"`` is a string object other than the literal: it must be taken as the option (it was once
    refused inside the fit, which the handler logged as "estimator not fitted")."""
    x, dice, groups, classes = two_class_rows(same=False)
    auto = json.loads('{"per_class": "auto"}')["per_class"]
    assert auto == PER_CLASS[0] and auto is not PER_CLASS[0]  # the point: an equal string, another object
    assert list(fit(x, dice, groups, classes=classes, per_class=auto).per_class) == ["grey", "white"]


def test_a_per_class_estimator_needs_the_classes_of_the_rows_it_predicts(tmp_path):
    x, dice, groups, classes = two_class_rows(same=False)
    estimator = fit(x, dice, groups, classes=classes)
    with pytest.raises(ValueError, match=r"one estimator per class \(grey, white\): pass the class of each row"):
        estimator.predict(x)
    with pytest.raises(ValueError, match=r"classes \['csf'\] have no estimator"):
        estimator.predict(x[:2], ["grey", "csf"])
    with pytest.raises(ValueError, match=r"classes must have the shape of the rows \(80,\), got \(2,\)"):
        estimator.predict(x, ["grey", "white"])
    loaded = QualityEstimator.load(estimator.save(tmp_path / "estimator.json"))
    assert loaded == estimator
    np.testing.assert_array_equal(loaded.predict(x, classes), estimator.predict(x, classes))
    data = estimator.to_dict()
    data["per_class"]["white"]["scale"][0] = -1.0
    with pytest.raises(ValueError, match=r"per_class\['white'\]: scale\[0\] must be > 0"):
        QualityEstimator.from_dict(data)


def test_a_version_2_file_loads_as_a_pooled_estimator():
    x, dice, groups = validation_rows()
    estimator = fit(x, dice, groups)
    data = {key: value for key, value in estimator.to_dict().items()
            if key not in ("per_class", "pooled_nested_mae", "per_class_nested_mae", "per_class_se")}
    loaded = QualityEstimator.from_dict({**data, "version": 2})
    assert loaded == estimator and loaded.per_class == {}


def test_quality_features_do_not_change_with_threads_or_batch_company():
    """Sums over a volume's pixels must not depend on how torch splits them (it splits the single sum of one image
    and class across threads) or on the other cases of the batch: one process of a two-process evaluation then
    writes the same features as a single process."""
    generator = torch.Generator().manual_seed(0)
    prob = torch.rand(2, 1, 40, 48, 72, generator=generator)  # 138240 pixels: several sum blocks and a tail
    layer_sa, margins = torch.rand(2, 3, 1, generator=generator), torch.randn(2, 1, 1, 40, 48, 72, generator=generator)

    def features(index: slice) -> torch.Tensor:
        return quality_features(prob[index], prob[index] > 0.5, layer_sa[index], [1, 2], margins=margins[index])

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        alone_two_threads, together = features(slice(1, 2)), features(slice(0, 2))
        torch.set_num_threads(1)
        alone_one_thread = features(slice(1, 2))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone_two_threads, alone_one_thread) and torch.equal(together[1:], alone_one_thread)
    p = prob.double().flatten(2)
    np.testing.assert_allclose(together[..., 4].numpy(), (p * (p > 0.5)).sum(-1) / (p > 0.5).sum(-1), rtol=1e-6)
