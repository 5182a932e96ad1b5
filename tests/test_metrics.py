"""SAScoreMetric: every layer and class scored at once equals sa_score one layer and class at a time."""

from __future__ import annotations

import pytest
import torch

import monai_protoseg.protoseg as protoseg
from monai_protoseg import SAScoreMetric, sa_score, sa_scores
from tests.naive_protoseg import naive_sa_score

# Layers at three scales of a (9, 10, 11) image, two of them at the same scale.
FEATURE_SIZES = {"coarse": (3, 5, 4), "mid": (5, 5, 6), "mid2": (5, 5, 6), "full": (9, 10, 11)}


def batch(classes=3, images=2, masked=True, seed=0, dtype=torch.float32):
    """Features of every layer, per-class probabilities, a multi-label reference and a mask."""
    gen = torch.Generator().manual_seed(seed)
    size = FEATURE_SIZES["full"]
    features = {layer: torch.randn(images, 2 + i, *shape, generator=gen, dtype=dtype)
                for i, (layer, shape) in enumerate(FEATURE_SIZES.items())}
    prob = torch.rand(images, classes, *size, generator=gen, dtype=dtype)
    target = torch.rand(images, classes, *size, generator=gen) > 0.5
    mask = (torch.rand(images, 1, *size, generator=gen) > 0.2) if masked else None
    return features, prob, target, mask


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("ignore_empty", [True, False])
def test_scores_equal_sa_score_per_layer_and_class(masked, ignore_empty):
    features, prob, target, mask = batch(masked=masked)
    target[1, 2] = False  # an empty reference
    metric = SAScoreMetric(list(FEATURE_SIZES), unit_wise=True, ignore_empty=ignore_empty)
    scores, *units = metric(prob, target, features=features, mask=mask)
    assert scores.shape == (2, len(FEATURE_SIZES), 3)
    for i, layer in enumerate(FEATURE_SIZES):
        assert units[i].shape == (2, 3, features[layer].shape[1])
        for k in range(3):
            args = (features[layer], prob[:, k:k + 1], target[:, k:k + 1], mask)
            torch.testing.assert_close(scores[:, i, k], sa_score(*args, ignore_empty=ignore_empty), equal_nan=True)
            torch.testing.assert_close(units[i][:, k], sa_score(*args, unit_wise=True, ignore_empty=ignore_empty),
                                       equal_nan=True)


def test_float64_scores_equal_the_naive_formulation():
    features, prob, target, mask = batch(dtype=torch.float64)
    scores = SAScoreMetric(list(FEATURE_SIZES))(prob, target, features=features, mask=mask)
    for i, layer in enumerate(FEATURE_SIZES):
        for k in range(3):
            naive = naive_sa_score(features[layer], prob[:, k:k + 1], target[:, k:k + 1], mask)
            torch.testing.assert_close(scores[:, i, k], naive, atol=1e-12, rtol=0, equal_nan=True)


def test_inputs_are_checked_and_weighted_once_per_batch(monkeypatch):
    calls = {"_prepare_guide": 0, "_resize_transpose": 0}
    for module, name in ((protoseg, "_prepare_guide"), (protoseg, "_resize_transpose")):
        original = getattr(module, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    features, prob, target, mask = batch()
    expected = torch.stack([torch.stack([sa_score(features[layer], prob[:, k:k + 1], target[:, k:k + 1], mask)
                                         for k in range(3)], dim=1) for layer in FEATURE_SIZES], dim=1)
    calls.update(dict.fromkeys(calls, 0))
    scores = SAScoreMetric(list(FEATURE_SIZES))(prob, target, features=features, mask=mask)
    torch.testing.assert_close(scores, expected, equal_nan=True)
    assert calls == {"_prepare_guide": 1, "_resize_transpose": 3}  # "mid2" reuses the weights moved for "mid"


def test_accumulates_and_aggregates_over_batches():
    metric = SAScoreMetric(list(FEATURE_SIZES))
    first, second = batch(seed=1), batch(seed=2)
    expected = torch.cat([metric(first[1], first[2], features=first[0], mask=first[3]),
                          metric(second[1], second[2], features=second[0], mask=second[3])])
    torch.testing.assert_close(metric.layer_scores(), expected)
    torch.testing.assert_close(metric.aggregate(), expected.nanmean(0))


def _bad_batch(layer=None, **changes):
    features, prob, target, mask = batch()
    if layer is not None:
        features[layer] = changes.pop("features")
    args = {"y_pred": prob, "y": target, "mask": mask, **changes}
    return features, args


@pytest.mark.parametrize(
    "layer,changes,message",
    [
        (None, {"y_pred": torch.rand(2, 3, 9, 10, 11) * 2},
         r"layer 'coarse': prob must be a foreground probability in \[0, 1\]"),
        (None, {"y": torch.rand(2, 3, 9, 10, 11)}, "layer 'coarse': target must be binary"),
        (None, {"mask": torch.rand(2, 1, 9, 10, 11)}, "layer 'coarse': mask must be binary"),
        ("mid", {"features": torch.full((2, 3, 5, 5, 6), float("nan"))}, "layer 'mid': features contain NaN or Inf"),
        ("full", {"features": torch.randn(3, 5, 9, 10, 11)},
         "layer 'full': batch sizes differ: features has 3 images, prob has 2"),
        ("mid2", {"features": torch.randn(2, 3, 5, 6)}, r"layer 'mid2': prob must have shape \(B, 1, \*S\) with 2"),
        (None, {"y": torch.ones(2, 2, 9, 10, 11)}, "the probabilities .* and the reference .* must have one channel"),
    ],
)
def test_bad_input_names_the_layer_and_argument(layer, changes, message):
    features, args = _bad_batch(layer, **changes)
    metric = SAScoreMetric(list(FEATURE_SIZES))
    with pytest.raises(ValueError, match=message):
        metric(features=features, **args)


def test_missing_layer_is_an_error():
    features, prob, target, _ = batch()
    del features["mid"]
    with pytest.raises(ValueError, match=r"no features for layers \['mid'\]"):
        SAScoreMetric(list(FEATURE_SIZES))(prob, target, features=features)


def test_sa_scores_of_several_targets_equal_the_naive_formulation_and_build_each_map_once(monkeypatch):
    features, prob, target, mask = batch(dtype=torch.float64)
    other = torch.rand(target.shape, generator=torch.Generator().manual_seed(5)) > 0.3
    resized = []
    original = protoseg._resize
    monkeypatch.setattr(protoseg, "_resize", lambda values, size: resized.append(1) or original(values, size))
    first, second = sa_scores(features, prob, [target, other], mask)
    assert len(resized) == len(FEATURE_SIZES)  # one binary map per layer, counted against both targets
    for reference, scores in ((target, first), (other, second)):
        assert list(scores) == list(FEATURE_SIZES)
        for layer, values in scores.items():
            naive = torch.stack([naive_sa_score(features[layer], prob[:, k:k + 1], reference[:, k:k + 1], mask)
                                 for k in range(3)], dim=1)
            torch.testing.assert_close(values, naive, atol=1e-12, rtol=0, equal_nan=True)
    single = sa_scores(features, prob, target, mask)  # one target: one dict
    torch.testing.assert_close(torch.stack(list(single.values())), torch.stack(list(first.values())), equal_nan=True)


@pytest.mark.parametrize("args, message", [
    (lambda f, p, t: ({**f, "mid": f["mid"][:1]}, p, t), "layer 'mid': batch sizes differ"),
    (lambda f, p, t: (f, p, [t, t[:, :2]]), r"layer 'coarse': target\[1\] must have the shape of prob"),
    (lambda f, p, t: ({}, p, t), "features is empty"),
    (lambda f, p, t: (f, p, []), "target is an empty sequence"),
])
def test_sa_scores_bad_input_names_the_layer_and_argument(args, message):
    features, prob, target, _ = batch()
    with pytest.raises(ValueError, match=message):
        sa_scores(*args(features, prob, target))
