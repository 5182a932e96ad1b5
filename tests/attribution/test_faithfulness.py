"""Faithfulness metrics against explicit loops and a network whose output is a known function of its input."""

from __future__ import annotations

import math

import pytest
import torch
from monai.networks.layers import Conv, GaussianFilter
from monai.networks.nets import UNet

from monai_protoseg.attribution.faithfulness import (
    deletion_insertion,
    image_preserved,
    masked_prediction,
    prediction_preserved,
)


def pixel_network(spatial_dims: int) -> torch.nn.Module:
    """Logits ``(0, 4 x - 2)`` pixel by pixel: the softmax probability of class 1 is ``sigmoid(4 x - 2)``."""
    network = Conv[Conv.CONV, spatial_dims](1, 2, kernel_size=1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([0.0, 4.0]).reshape(2, 1, *(1,) * spatial_dims))
        network.bias.copy_(torch.tensor([0.0, -2.0]))
    return network


def class_prob(values: float) -> float:
    """The pixel network's class-1 probability of an input value, by hand."""
    return 1 / (1 + math.exp(-(4 * values - 2)))


def square_images(batch: int, size: int, spatial_dims: int = 2, seed: int = 0) -> torch.Tensor:
    """Bright boxes (value 0.9) on a dim background (0.1), one box per case at a random place."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.full((batch, 1, *(size,) * spatial_dims), 0.1)
    for case in range(batch):
        corner = torch.randint(0, size // 2, (spatial_dims,), generator=gen).tolist()
        images[(case, 0, *(slice(c, c + size // 3) for c in corner))] = 0.9
    return images


def hook_count(network: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


def test_prediction_preserved_matches_an_explicit_loop():
    gen = torch.Generator().manual_seed(0)
    prob, prob_masked = torch.rand(3, 1, 4, 5, generator=gen), torch.rand(3, 1, 4, 5, generator=gen)
    region = torch.rand(3, 1, 4, 5, generator=gen) > 0.5
    for given in (None, region):
        expected = []
        for case in range(3):
            kept = total = 0.0
            for i in range(4):
                for j in range(5):
                    if given is None or given[case, 0, i, j]:
                        kept += min(prob[case, 0, i, j].item(), prob_masked[case, 0, i, j].item())
                        total += prob[case, 0, i, j].item()
            expected.append(kept / total)
        torch.testing.assert_close(prediction_preserved(prob, prob_masked, given).double(),
                                   torch.tensor(expected, dtype=torch.float64), atol=1e-6, rtol=0)


def test_prediction_preserved_3d_nan_for_nothing_predicted_and_one_for_a_larger_prediction():
    prob = torch.zeros(3, 1, 4, 4, 4)
    prob[1, :, :2] = 0.5
    prob[2, :, 1:3] = 0.8
    prob_masked = prob.clone()
    prob_masked[1] = 1.0  # more than P everywhere: counts as P
    prob_masked[2, :, 1] = 0.2  # half the prediction, a quarter of it left there
    scores = prediction_preserved(prob, prob_masked)
    assert math.isnan(scores[0]) and scores[1] == 1.0
    assert scores[2].item() == pytest.approx((0.8 + 0.2) / (2 * 0.8))


def test_image_preserved_is_the_mean_of_each_map():
    maps = torch.rand(2, 1, 3, 4, 5)
    expected = [sum(maps[case].flatten().tolist()) / 60 for case in range(2)]
    torch.testing.assert_close(image_preserved(maps), torch.tensor(expected), atol=1e-6, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_masked_prediction_of_a_known_network(spatial_dims):
    network = pixel_network(spatial_dims)
    inputs = square_images(2, 8, spatial_dims)
    maps = torch.rand(2, 1, *(8,) * spatial_dims)
    masked = masked_prediction(network, inputs, maps)
    expected = torch.tensor([class_prob(x) for x in (inputs * maps).flatten().tolist()]).reshape(masked.shape)
    torch.testing.assert_close(masked, expected, atol=1e-6, rtol=0)
    unmasked = masked_prediction(network, inputs, torch.ones_like(maps))
    torch.testing.assert_close(unmasked, torch.sigmoid(4 * inputs - 2), atol=1e-6, rtol=0)
    single = pixel_network(spatial_dims)
    with torch.no_grad():
        single.weight.fill_(4.0)  # both channels 4 x - 2
        single.bias.fill_(-2.0)
    torch.testing.assert_close(masked_prediction(single, inputs, maps, class_index=0, activation="sigmoid"),
                               expected, atol=1e-6, rtol=0)


def oracle_curves(images: torch.Tensor, maps: torch.Tensor, steps: int, filler: torch.Tensor) -> list:
    """Deletion and insertion curves and areas by hand: pixels sorted by the map (raster order for ties), the
    pixel network's class probability summed over the region ``x > 0.5`` (its own prediction)."""
    results = []
    for case in range(images.shape[0]):
        image, baseline = images[case, 0].flatten().tolist(), filler[case, 0].flatten().tolist()
        values = maps[case, 0].flatten().tolist()
        order = sorted(range(len(values)), key=lambda index: (-values[index], index))
        region = [index for index, value in enumerate(image) if value > 0.5]
        full = sum(class_prob(image[index]) for index in region)
        curves = {"deletion": [], "insertion": []}
        for step in range(steps + 1):
            first = set(order[:step * len(image) // steps])
            deleted = [baseline[i] if i in first else image[i] for i in range(len(image))]
            inserted = [image[i] if i in first else baseline[i] for i in range(len(image))]
            curves["deletion"].append(sum(class_prob(deleted[i]) for i in region) / full)
            curves["insertion"].append(sum(class_prob(inserted[i]) for i in region) / full)
        fractions = [(step * len(image) // steps) / len(image) for step in range(steps + 1)]
        areas = {kind: sum((fractions[t + 1] - fractions[t]) * (curve[t] + curve[t + 1]) / 2 for t in range(steps))
                 for kind, curve in curves.items()}
        results.append((curves, areas))
    return results


@pytest.mark.parametrize("baseline", ["zero", "constant", "blur"])
def test_deletion_and_insertion_match_an_explicit_computation(baseline):
    network = pixel_network(2)
    images = square_images(2, 6)
    maps = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    maps[0, 0, :2] = 0.5  # ties: raster order
    filler = {"zero": torch.zeros_like(images), "constant": torch.full_like(images, 0.7),
              "blur": GaussianFilter(2, 5.0)(images)}[baseline]
    given = filler if baseline == "constant" else baseline
    deletion, insertion, curves = deletion_insertion(network, images, maps, steps=5, baseline=given, batch_size=5)
    assert curves["fraction"].tolist() == [(step * 36 // 5) / 36 for step in range(6)]
    for case, (expected_curves, expected_areas) in enumerate(oracle_curves(images, maps, 5, filler)):
        for kind in ("deletion", "insertion"):
            torch.testing.assert_close(curves[kind][case], torch.tensor(expected_curves[kind], dtype=torch.float64),
                                       atol=1e-5, rtol=0)
        assert deletion[case].item() == pytest.approx(expected_areas["deletion"], abs=1e-5)
        assert insertion[case].item() == pytest.approx(expected_areas["insertion"], abs=1e-5)


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_the_region_itself_beats_a_random_map(spatial_dims, size):
    network = pixel_network(spatial_dims)
    images = square_images(2, size, spatial_dims)
    perfect = (images > 0.5).float()
    random = torch.rand(perfect.shape, generator=torch.Generator().manual_seed(0))
    deletion_perfect, insertion_perfect, curves = deletion_insertion(network, images, perfect, steps=8)
    deletion_random, insertion_random, _ = deletion_insertion(network, images, random, steps=8)
    assert (deletion_perfect < deletion_random).all() and (insertion_perfect > insertion_random).all()
    torch.testing.assert_close(curves["deletion"][:, 0], torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(curves["insertion"][:, -1], torch.ones(2, dtype=torch.float64))


def test_a_given_region_and_an_empty_prediction():
    network = pixel_network(2)
    images = square_images(2, 8)
    images[1] = 0.1  # nothing predicted in case 1
    maps = torch.rand(2, 1, 8, 8)
    deletion, insertion, curves = deletion_insertion(network, images, maps, steps=2)
    assert math.isnan(deletion[1]) and math.isnan(insertion[1]) and curves["deletion"][1].isnan().all()
    region = torch.zeros(2, 1, 8, 8)
    region[:, :, :4] = 1
    deletion, _, curves = deletion_insertion(network, images, maps, steps=2, region=region)
    assert not deletion.isnan().any()
    full = torch.sigmoid(4 * images[1, 0, :4] - 2).sum()
    assert curves["insertion"][1, 0].item() == pytest.approx((torch.sigmoid(torch.tensor(-2.0)) * 32 / full).item())


def test_the_network_is_left_as_it_was_also_under_no_grad_and_inference_mode():
    network = UNet(2, 1, 2, channels=(4, 8), strides=(2,), dropout=0.2)
    network.train()
    network.model[0].eval()
    network.model[2].requires_grad_(False)
    weights = {name: value.clone() for name, value in network.state_dict().items()}
    modes = [module.training for module in network.modules()]
    flags = [parameter.requires_grad for parameter in network.parameters()]
    inputs, maps = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    first = deletion_insertion(network, inputs, maps, steps=2)[0]  # eval mode: dropout off, reproducible
    with torch.no_grad():
        torch.testing.assert_close(deletion_insertion(network, inputs, maps, steps=2)[0], first)
    with torch.inference_mode():
        masked_prediction(network, inputs, maps)
    assert [module.training for module in network.modules()] == modes
    assert [parameter.requires_grad for parameter in network.parameters()] == flags
    assert all(torch.equal(weights[name], value) for name, value in network.state_dict().items())
    assert hook_count(network) == 0


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda: prediction_preserved(torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)), "must have one shape"),
        (lambda: prediction_preserved(torch.rand(1, 1, 4) + 1, torch.rand(1, 1, 4)), r"prob must be in \[0, 1\]"),
        (lambda: prediction_preserved(torch.rand(1, 1, 4), torch.rand(1, 1, 4), torch.rand(1, 1, 4)),
         "region must be binary"),
        (lambda: image_preserved(torch.rand(4, 4)), r"maps must be \(B, 1, \*S\)"),
        (lambda: masked_prediction(pixel_network(2), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 5)),
         r"maps have shape \(1, 1, 4, 5\); expected"),
        (lambda: masked_prediction(pixel_network(2), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), class_index=2),
         "class_index 2 is out of range"),
        (lambda: deletion_insertion(pixel_network(2), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4), steps=0),
         "steps must be at least 1"),
        (lambda: deletion_insertion(pixel_network(2), torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4),
                                    baseline="noise"), 'baseline must be "zero", "blur" or a tensor'),
    ],
)
def test_bad_input_is_a_clear_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()
