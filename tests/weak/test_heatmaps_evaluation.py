"""Classifier heatmaps against a hand-written Grad-CAM, the masks' gating, and the scores against numpy oracles."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import ResNet
from torch import nn

from monai_protoseg.weak import (
    ClassScoreMap,
    CoinGenerator,
    classifier_heatmaps,
    classify,
    heatmap_filtered,
    maps_to_masks,
    method_maps,
    per_case_scores,
    segmentation_scores,
)


def small_resnet() -> ResNet:
    torch.manual_seed(0)
    return ResNet("basic", [1, 1, 1, 1], [4, 8, 16, 16], spatial_dims=2, n_input_channels=1, num_classes=2,
                  conv1_t_size=3, conv1_t_stride=1, no_max_pool=True)


def test_class_score_map_adds_one_pixel_per_spatial_axis():
    wrapped = ClassScoreMap(nn.Sequential(nn.Flatten(), nn.Linear(8, 3)), spatial_dims=3)
    assert wrapped(torch.rand(2, 1, 2, 2, 2)).shape == (2, 3, 1, 1, 1)
    with pytest.raises(ValueError, match=r"\(B, K\) class scores"):
        ClassScoreMap(nn.Identity(), 2)(torch.rand(1, 1, 2, 2))


def test_gradcam_of_a_classifier_is_the_textbook_gradcam():
    classifier = small_resnet().eval()
    images = torch.rand(3, 1, 32, 32)
    maps = classifier_heatmaps(classifier, images, "gradcam", ["layer3"], class_index=1)
    # Selvaraju et al.: weights = spatial mean of d(logit_1)/d(A), map = ReLU(sum_c w_c A_c), upsampled, min-max
    stored = {}
    handle = classifier.layer3.register_forward_hook(lambda module, args, output: stored.update(features=output))
    logits = classifier(images)
    handle.remove()
    gradients = torch.autograd.grad(logits[:, 1].sum(), stored["features"])[0]
    cam = F.relu((gradients.mean((2, 3), keepdim=True) * stored["features"]).sum(1, keepdim=True)).detach()
    cam = F.interpolate(cam, size=(32, 32), mode="bilinear", align_corners=False)
    low = cam.amin((1, 2, 3), keepdim=True)
    expected = (cam - low) / (cam.amax((1, 2, 3), keepdim=True) - low)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method, layers", [("layercam", ["layer3"]), ("scorecam", ["layer4"]), ("rise", None)])
def test_every_heatmap_method_gives_unit_range_maps_and_leaves_the_classifier_alone(method, layers):
    classifier = small_resnet().train()
    before = {name: value.clone() for name, value in classifier.state_dict().items()}
    options = {"n_masks": 16} if method == "rise" else {}
    maps = classifier_heatmaps(classifier, torch.rand(2, 1, 16, 16), method, layers, **options)
    assert maps.shape == (2, 1, 16, 16) and 0 <= float(maps.min()) and float(maps.max()) <= 1
    assert classifier.training and all(torch.equal(value, before[name])
                                       for name, value in classifier.state_dict().items())


def test_heatmap_methods_need_their_layers():
    with pytest.raises(ValueError, match="needs the classifier layers"):
        classifier_heatmaps(small_resnet(), torch.rand(1, 1, 16, 16), "gradcam")
    with pytest.raises(ValueError, match="method must be one of"):
        classifier_heatmaps(small_resnet(), torch.rand(1, 1, 16, 16), "occlusion", ["layer4"])


def test_heatmap_filtered_keeps_or_drops_the_highlighted_part():
    images, heatmaps = torch.full((1, 2, 3), 2.0), torch.tensor([[[0.0, 0.5, 1.0]]])
    torch.testing.assert_close(heatmap_filtered(images, heatmaps), torch.tensor([[[0.0, 1.0, 2.0]] * 2]))
    torch.testing.assert_close(heatmap_filtered(images, heatmaps, keep=False), torch.tensor([[[2.0, 1.0, 0.0]] * 2]))
    with pytest.raises(ValueError, match="do not fit images"):
        heatmap_filtered(images, torch.rand(1, 2, 3))


def test_coin_maps_are_the_absolute_counterfactual_difference():
    generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4)).train()
    nn.init.normal_(generator.head.weight, std=0.5)
    images = torch.rand(3, 1, 32, 32)
    maps = method_maps("coin", images, nn.Identity(), generator=generator, batch_size=2)
    assert generator.training  # put back as found
    generator.eval()
    with torch.no_grad():
        expected = (images - generator(images, torch.zeros(3, dtype=torch.long))).abs()
    torch.testing.assert_close(maps, expected)
    with pytest.raises(ValueError, match="needs the trained generator"):
        method_maps("coin", images, nn.Identity())


def test_only_cases_classified_abnormal_get_a_mask():
    maps = torch.rand(4, 1, 8, 8)
    masks = maps_to_masks(maps, torch.tensor([True, False, True, False]), threshold=0.5)
    torch.testing.assert_close(masks[0], maps[0] > 0.5)
    assert not masks[1].any() and not masks[3].any()
    with pytest.raises(ValueError, match="one flag per case"):
        maps_to_masks(maps, torch.tensor([True]))


def test_classify_restores_the_mode():
    classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    assert classify(classifier, torch.rand(5, 1, 2, 2), batch_size=2).shape == (5,)
    assert classifier.training


def test_scores_against_numpy():
    rng = np.random.default_rng(0)
    truths = rng.random((6, 1, 10, 10)) < 0.3
    truths[4:] = False  # two normal cases
    masks = rng.random((6, 1, 10, 10)) < 0.4
    masks[5] = False  # one normal case left empty
    inter = [(m & t).sum() for m, t in zip(masks, truths)]
    union = [(m | t).sum() for m, t in zip(masks, truths)]
    dice = [2 * (m & t).sum() / (m.sum() + t.sum()) for m, t in zip(masks[:4], truths[:4])]
    counts = per_case_scores(torch.from_numpy(masks), torch.from_numpy(truths))
    np.testing.assert_array_equal(counts["intersection"].numpy(), inter)
    np.testing.assert_allclose(counts["dice"][:4].numpy(), dice)
    assert torch.isnan(counts["dice"][5])  # both empty: undefined
    scores = segmentation_scores(torch.from_numpy(masks), torch.from_numpy(truths))
    assert scores["iou"] == pytest.approx(sum(inter) / sum(union))
    assert scores["dice"] == pytest.approx(np.mean(dice))
    assert scores["normal_false_positive"] == 0.5 and scores["lesion_cases"] == 4 and scores["normal_cases"] == 2
    with pytest.raises(ValueError, match=r"must both be \(B, 1, \*S\)"):
        per_case_scores(torch.from_numpy(masks), torch.from_numpy(truths[:2]))
