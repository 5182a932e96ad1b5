"""RISE and Kernel-Weighted Contribution against explicit one-pass-at-a-time computations; the network left as is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.networks.nets import UNet

from monai_protoseg import FeatureRecorder
from monai_protoseg.attribution.base import normalise
from monai_protoseg.attribution.kwc import KernelWeightedContribution
from monai_protoseg.attribution.rise import RISE, rise_masks

LAYERS = ["model.1.submodule.2", "model.2"]  # a decoder layer and the output block: two resolutions


def make_network(spatial_dims: int = 2) -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def make_images(batch: int = 2, size: int = 32, spatial_dims: int = 2) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    images = 0.2 * torch.randn(batch, 1, *(size,) * spatial_dims, generator=gen)
    images[(slice(None), 0, *(slice(size // 4, size // 2),) * spatial_dims)] += 1
    return images


def hook_count(network: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


def class_score(network, inputs, region):
    """Sum of the softmax class-1 probability over the region, per case, by hand."""
    with torch.no_grad():
        return (torch.softmax(network(inputs), 1)[:, 1:2] * region).flatten(1).sum(1)


# RISE


def test_rise_masks_are_reproducible_smooth_and_keep_the_probability():
    masks = rise_masks(200, (32, 32), grid_size=4, probability=0.3, generator=torch.Generator().manual_seed(0))
    again = rise_masks(200, (32, 32), grid_size=4, probability=0.3, generator=torch.Generator().manual_seed(0))
    other = rise_masks(200, (32, 32), grid_size=4, probability=0.3, generator=torch.Generator().manual_seed(1))
    assert masks.shape == (200, 1, 32, 32) and torch.equal(masks, again) and not torch.equal(masks, other)
    assert masks.min() >= 0 and masks.max() <= 1
    assert masks.mean().item() == pytest.approx(0.3, abs=0.05)
    assert (masks.diff(dim=-1).abs().max() <= 1 / 8 + 1e-6)  # linear ramps over a cell of 8 pixels, no jumps
    assert torch.equal(rise_masks(3, (5, 6, 7), grid_size=(2, 3, 4), probability=1.0), torch.ones(3, 1, 5, 6, 7))
    shifted = rise_masks(50, (16,), grid_size=2)
    assert len({tuple(mask.flatten().tolist()) for mask in shifted}) > 4  # the random shifts and cells vary


def test_rise_matches_one_forward_pass_per_mask():
    network, images = make_network(), make_images()
    result = RISE(network, n_masks=6, grid_size=4, probability=0.5, batch_size=4, seed=3)(images)
    masks = rise_masks(6, (32, 32), grid_size=4, probability=0.5, generator=torch.Generator().manual_seed(3))
    network.eval()
    with torch.no_grad():
        region = (network(images).argmax(1, keepdim=True) == 1).float()
    expected = torch.zeros(2, 1, 32, 32)
    for case in range(2):
        for mask in masks:
            expected[case] += class_score(network, images[case:case + 1] * mask, region[case:case + 1]) * mask
    expected /= 6 * 0.5
    torch.testing.assert_close(result.layer_maps["input"], expected, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(result.map, normalise(expected), atol=1e-4, rtol=0)
    torch.testing.assert_close(result.region, region)
    again = RISE(network, n_masks=6, grid_size=4, probability=0.5, batch_size=6, seed=3)(images)
    torch.testing.assert_close(again.map, result.map, atol=1e-5, rtol=0)


def test_rise_finds_the_region_of_a_pixelwise_network():
    network = Conv[Conv.CONV, 2](1, 2, kernel_size=1)
    with torch.no_grad():
        network.weight.copy_(torch.tensor([0.0, 4.0]).reshape(2, 1, 1, 1))
        network.bias.copy_(torch.tensor([0.0, -2.0]))
    images = torch.full((1, 1, 32, 32), 0.1)
    images[:, :, 8:20, 4:16] = 0.9
    result = RISE(network, n_masks=500, grid_size=4, batch_size=250)(images)
    inside = result.region.bool()
    assert result.map[inside].mean() > 2 * result.map[~inside].mean()


def test_rise_in_3d_leaves_the_network_as_it_was():
    network = make_network(3)
    network.train()
    weights = {name: value.clone() for name, value in network.state_dict().items()}
    with torch.no_grad():
        result = RISE(network, n_masks=4, grid_size=2, batch_size=4)(make_images(1, 16, 3))
    assert result.map.shape == (1, 1, 16, 16, 16) and 0 <= result.map.min() and result.map.max() <= 1
    assert all(module.training for module in network.modules()) and hook_count(network) == 0
    assert all(torch.equal(weights[name], value) for name, value in network.state_dict().items())


@pytest.mark.parametrize(
    "kwargs,message",
    [({"n_masks": 0}, "n_masks must be at least 1"), ({"probability": 0.0}, r"probability must be in \(0, 1\]"),
     ({"batch_size": 0}, "batch_size must be at least 1"), ({"grid_size": 0}, "grid_size must be at least 1")],
)
def test_rise_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RISE(make_network(), **kwargs)(make_images(1, 16))


# Kernel-Weighted Contribution


def oracle_kwc(network, images, layers, max_kernels=None):
    """Each layer's raw map with one forward pass per emptied (or lone) kernel, one case at a time."""
    network.eval()
    with torch.no_grad(), FeatureRecorder(network, layers, clone=True) as recorder:
        output = network(images)
        features = {layer: recorder[layer] for layer in layers}
    region = (output.argmax(1, keepdim=True) == 1).float()
    modules = dict(network.named_modules())
    maps = {}
    for layer in layers:
        activations = features[layer]
        layer_map = torch.zeros(images.shape[0], 1, *activations.shape[2:])
        for case in range(images.shape[0]):
            image, case_region = images[case:case + 1], region[case:case + 1]
            full = class_score(network, image, case_region).item()
            means = [F.relu(activations[case, k]).mean().item() for k in range(activations.shape[1])]
            kernels = sorted(range(len(means)), key=lambda k: -means[k])[:max_kernels or len(means)]
            for kernel in kernels:
                def emptied(module, args, out, kernel=kernel):
                    out = out.clone()
                    out[:, kernel] = 0
                    return out

                def alone(module, args, out, kernel=kernel):
                    kept = torch.zeros_like(out)
                    kept[:, kernel] = out[:, kernel]
                    return kept

                scores = []
                for hook in (emptied, alone):
                    handle = modules[layer].register_forward_hook(hook)
                    scores.append(class_score(network, image, case_region).item())
                    handle.remove()
                dependent, independent = (full - scores[0]) / full, scores[1] / full
                layer_map[case, 0] += max((dependent + independent) / 2, 0) * F.relu(activations[case, kernel])
        maps[layer] = layer_map
    return maps


@pytest.mark.parametrize("max_kernels,batch_size", [(None, 5), (2, 3)])
def test_kwc_matches_one_forward_pass_per_kernel(max_kernels, batch_size):
    network, images = make_network(), make_images()
    result = KernelWeightedContribution(network, layers=LAYERS, max_kernels=max_kernels, batch_size=batch_size)(images)
    expected = oracle_kwc(network, images, LAYERS, max_kernels)
    for layer in LAYERS:
        torch.testing.assert_close(result.layer_maps[layer], expected[layer], atol=1e-4, rtol=1e-4)
    assert result.map.shape == (2, 1, 32, 32)


def test_kwc_of_an_empty_region_is_undefined():
    network, images = make_network(), make_images()
    result = KernelWeightedContribution(network, layers=LAYERS, max_kernels=2)(images, region=torch.zeros(2, 1, 32, 32))
    assert result.map.isnan().all() and all(maps.isnan().all() for maps in result.layer_maps.values())


def network_state(network):
    return ({name: value.clone() for name, value in network.state_dict().items()},
            [module.training for module in network.modules()],
            [(parameter.requires_grad, None if parameter.grad is None else parameter.grad.clone())
             for parameter in network.parameters()])


def assert_state(network, state):
    weights, modes, parameters = state
    assert all(torch.equal(weights[name], value) for name, value in network.state_dict().items())
    assert [module.training for module in network.modules()] == modes
    for (requires_grad, grad), parameter in zip(parameters, network.parameters()):
        assert parameter.requires_grad == requires_grad
        assert (grad is None and parameter.grad is None) or torch.equal(grad, parameter.grad)
    assert hook_count(network) == 0


def messy_network():
    """In train mode with one block in eval mode, some frozen parameters and a stored gradient."""
    network = make_network()
    network.train()
    network.model[0].eval()
    network.model[2].requires_grad_(False)
    network.model[0].conv.unit0.conv.weight.grad = torch.ones_like(network.model[0].conv.unit0.conv.weight)
    return network


@pytest.mark.parametrize("context", [torch.enable_grad, torch.no_grad, torch.inference_mode])
def test_kwc_leaves_the_network_as_it_was(context):
    network = messy_network()
    state = network_state(network)
    with context():
        KernelWeightedContribution(network, layers=LAYERS, max_kernels=2, batch_size=4)(make_images())
    assert_state(network, state)


def test_kwc_leaves_the_network_as_it_was_when_a_forward_pass_raises(monkeypatch):
    network = messy_network()
    state = network_state(network)
    block = network.model[1].submodule[2]
    calls = []

    def failing(*args):  # the first pass records the features; a later batch of kernels fails
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return type(block).forward(block, *args)

    monkeypatch.setattr(block, "forward", failing)
    with pytest.raises(RuntimeError, match="boom"):
        KernelWeightedContribution(network, layers=LAYERS, max_kernels=2, batch_size=2)(make_images())
    monkeypatch.undo()
    assert_state(network, state)


def test_kwc_in_3d():
    network = make_network(3)
    result = KernelWeightedContribution(network, max_kernels=1, batch_size=4)(make_images(1, 16, 3))
    assert result.map.shape == (1, 1, 16, 16, 16) and 0 <= result.map.min() and result.map.max() <= 1
    assert list(result.layer_maps) == ["model.1.submodule.2"]
    assert hook_count(network) == 0


@pytest.mark.parametrize(
    "kwargs,message",
    [({"max_kernels": 0}, "max_kernels must be at least 1 or None"), ({"batch_size": 0}, "batch_size must be at"),
     ({"layers": ["model.7"]}, "layer 'model.7' is not a submodule")],
)
def test_kwc_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        KernelWeightedContribution(make_network(), **kwargs)
