"""Grad-CAM, Grad-CAM++, LayerCAM and Score-CAM against independent oracles: captum, hand gradients, slow loops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerAttribution, LayerGradCam
from monai.networks.nets import UNet
from monai.utils import set_determinism
from torch import nn

from monai_protoseg import resolve_layers
from monai_protoseg.attribution import (
    GradCAM,
    GradCAMpp,
    LayerCAM,
    ScoreCAM,
    decoder_layers,
    normalise,
    target_region,
    target_score,
)


def unet(spatial_dims: int = 2, out_channels: int = 2) -> UNet:
    set_determinism(seed=0)
    return UNet(spatial_dims, 1, out_channels, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1).eval()


def blob_image(spatial_dims: int = 2, size: int = 32, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(0)
    image = 0.2 * torch.rand(batch, 1, *(size,) * spatial_dims)
    image[(..., *(slice(size // 4, 3 * size // 4),) * spatial_dims)] += 1.0
    return image


def captum_gradcam(network, image, layer, region, class_index=1, use="logit", activation="softmax"):
    """captum's LayerGradCam (ReLU applied) of the target score: the Grad-CAM oracle."""
    def forward(x):
        return target_score(network(x), region, class_index, use, activation)

    module = resolve_layers(network, [layer])[layer]
    return LayerGradCam(forward, module).attribute(image, relu_attributions=True).detach()


def test_gradcam_of_one_layer_equals_captum():
    network, image = unet(), blob_image()
    layer = "model.1.submodule.2"
    result = GradCAM(network, layers=[layer])(image)
    with torch.no_grad():
        region = target_region(network(image), "pred", 1)
    expected = captum_gradcam(network, image, layer, region)
    assert expected.abs().sum() > 0 and region.sum() > 0
    torch.testing.assert_close(result.layer_maps[layer], expected, rtol=0, atol=1e-5)  # before normalisation
    resized = LayerAttribution.interpolate(expected, (32, 32), interpolate_mode="bilinear")  # align_corners=False
    torch.testing.assert_close(result.map, normalise(resized), rtol=0, atol=1e-5)       # after resize + normalise


@pytest.mark.parametrize("use", ["logit", "prob"])
def test_gradcam_per_class_softmax_and_sigmoid_multi_label_equals_captum(use):
    image = blob_image()
    network = unet(out_channels=3)
    layer = "model.1.submodule.1.submodule.2"
    for class_index in (0, 2):
        result = GradCAM(network, layers=[layer], class_index=class_index, use=use)(image)
        expected = captum_gradcam(network, image, layer, result.region, class_index, use)
        torch.testing.assert_close(result.layer_maps[layer], expected, rtol=0, atol=1e-5)
    label = torch.zeros(2, 3, 32, 32)  # multi-label: overlapping channels
    label[:, 0, 4:20, 4:20] = 1
    label[:, 1, 10:28, 10:28] = 1
    for class_index in (0, 1):
        method = GradCAM(network, [layer], class_index, region="label", use=use, activation="sigmoid")
        result = method(image, label=label)
        torch.testing.assert_close(result.region, label[:, class_index:class_index + 1])
        expected = captum_gradcam(network, image, layer, result.region, class_index, use, "sigmoid")
        torch.testing.assert_close(result.layer_maps[layer], expected, rtol=0, atol=1e-5)


def test_gradcam_3d_decoder_layers_equal_captum_and_combine_equally():
    network, image = unet(spatial_dims=3), blob_image(spatial_dims=3, size=16, batch=1)
    result = GradCAM(network)(image)
    layers = decoder_layers(network)
    assert list(result.layer_maps) == layers and result.map.shape == (1, 1, 16, 16, 16)
    expected = {layer: captum_gradcam(network, image, layer, result.region) for layer in layers}
    for layer in layers:
        torch.testing.assert_close(result.layer_maps[layer], expected[layer], rtol=0, atol=1e-5)
    resized = [normalise(LayerAttribution.interpolate(m, (16, 16, 16), interpolate_mode="trilinear"))
               for m in expected.values()]
    torch.testing.assert_close(result.map, normalise(sum(resized) / len(resized)), rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", [GradCAM, GradCAMpp, LayerCAM])
def test_gradient_methods_treat_each_case_alone(method):
    network, image = unet(), blob_image(batch=3)
    together = method(network)(image)
    for case in range(3):
        alone = method(network)(image[case:case + 1])
        torch.testing.assert_close(together.map[case:case + 1], alone.map, rtol=0, atol=1e-5)
        torch.testing.assert_close(together.score[case:case + 1], alone.score)


class Tiny(nn.Sequential):
    """``logits = W2 relu(A) + b2`` with ``A = conv3x3(x)``: the score's gradients are known in closed form."""

    def __init__(self) -> None:
        super().__init__(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Conv2d(3, 2, 1))
        torch.manual_seed(1)
        for parameter in self.parameters():
            nn.init.normal_(parameter)


def hand_gradients(network: Tiny, image: torch.Tensor, region: torch.Tensor, class_index: int = 1):
    """Activations of layers "0" (A) and "1" (relu(A)) and the gradients of the summed region logit by hand."""
    with torch.no_grad():
        pre = network[0](image)
        w2 = network[2].weight[class_index, :, 0, 0].reshape(1, -1, 1, 1)
        post_gradient = w2 * region                # d(sum_R z)/d relu(A)_c = W2[class, c] on the region
        pre_gradient = post_gradient * (pre > 0)   # through the ReLU
    return {"0": (pre, pre_gradient), "1": (F.relu(pre), post_gradient)}


def slow_gradcampp(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ channel by channel, from the paper's equation 19 (closed form for an exponential score)."""
    maps = torch.zeros(activations.shape[0], 1, *activations.shape[2:])
    for b in range(activations.shape[0]):
        for c in range(activations.shape[1]):
            a, g = activations[b, c], gradients[b, c]
            denominator = 2 * g**2 + a.sum() * g**3 + 1e-6
            alpha = torch.where(g != 0, g**2 / denominator, torch.zeros_like(g))
            weight = (alpha * g.clamp(min=0)).sum()
            maps[b, 0] += weight * a
    return maps.clamp(min=0)


def slow_layercam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    maps = torch.zeros(activations.shape[0], 1, *activations.shape[2:])
    for c in range(activations.shape[1]):
        maps[:, 0] += gradients[:, c].clamp(min=0) * activations[:, c]
    return maps.clamp(min=0)


@pytest.mark.parametrize("method, slow", [(GradCAMpp, slow_gradcampp), (LayerCAM, slow_layercam)])
def test_gradcampp_and_layercam_equal_hand_formulas(method, slow):
    network = Tiny().eval()
    image = torch.randn(2, 1, 12, 12)
    region = torch.zeros(2, 1, 12, 12)
    region[0, 0, 2:9, 3:10] = 1
    region[1, 0, 5:12, 0:6] = 1
    result = method(network, layers=["0", "1"], region=region)(image)
    expected = {}
    for layer, (activations, gradients) in hand_gradients(network, image, region).items():
        expected[layer] = slow(activations, gradients)
        assert expected[layer].abs().sum() > 0
        torch.testing.assert_close(result.layer_maps[layer], expected[layer], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result.map, normalise(normalise(expected["0"]) + normalise(expected["1"])),
                               rtol=1e-5, atol=1e-5)


def test_gradcam_equals_hand_formula():
    network, image = Tiny().eval(), torch.randn(2, 1, 12, 12)
    region = (torch.rand(2, 1, 12, 12) > 0.5).float()
    result = GradCAM(network, layers=["0"], region=region)(image)
    activations, gradients = hand_gradients(network, image, region)["0"]
    weights = gradients.mean((2, 3), keepdim=True)
    torch.testing.assert_close(result.layer_maps["0"], (weights * activations).sum(1, keepdim=True).clamp(min=0))


def slow_scorecam(network, image, layer, region, channels, class_index=1, use="logit", activation="softmax"):
    """Score-CAM one masked forward pass at a time: ``w_k = s(x * H_k) - s(0)``, map ``ReLU(sum_k w_k A_k)``."""
    module = resolve_layers(network, [layer])[layer]
    recorded = {}
    handle = module.register_forward_hook(lambda m, a, out: recorded.__setitem__("A", out.detach()))
    with torch.no_grad():
        network(image)
        activations = recorded["A"]
        handle.remove()
        maps = torch.zeros(image.shape[0], 1, *activations.shape[2:])
        for b in range(image.shape[0]):
            baseline = target_score(network(torch.zeros_like(image[b:b + 1])), region[b:b + 1], class_index, use,
                                    activation)
            for k in channels[b]:
                upsampled = F.interpolate(activations[b:b + 1, k:k + 1], size=image.shape[2:], mode="bilinear",
                                          align_corners=False)
                low, high = upsampled.min(), upsampled.max()
                mask = (upsampled - low) / (high - low) if high > low else torch.zeros_like(upsampled)
                score = target_score(network(image[b:b + 1] * mask), region[b:b + 1], class_index, use, activation)
                maps[b, 0] += (score - baseline)[0] * activations[b, k]
    return maps.clamp(min=0)


@pytest.mark.parametrize("use", ["logit", "prob"])
def test_scorecam_equals_a_loop_over_channels_batched_or_not(use):
    network, image = unet(), blob_image()
    layer = "model.1.submodule.2"
    with torch.no_grad():
        region = target_region(network(image), "pred", 1)
    channels = [range(4), range(4)]  # the layer's 4 channels
    expected = slow_scorecam(network, image, layer, region, channels, use=use)
    assert expected.abs().sum() > 0
    for batch_size in (1, 3, 16):
        result = ScoreCAM(network, layers=[layer], use=use, batch_size=batch_size)(image)
        torch.testing.assert_close(result.layer_maps[layer], expected, rtol=1e-4, atol=1e-4)


def test_scorecam_max_channels_keeps_the_channels_of_highest_mean_activation():
    network, image = unet(), blob_image()
    layer = "model.1.submodule.2"
    with torch.no_grad():
        region = target_region(network(image), "pred", 1)
        activations = {}
        handle = resolve_layers(network, [layer])[layer].register_forward_hook(
            lambda m, a, out: activations.__setitem__("A", out))
        network(image)
        handle.remove()
    top = activations["A"].mean((2, 3)).topk(3, dim=1).indices.tolist()
    expected = slow_scorecam(network, image, layer, region, top)
    result = ScoreCAM(network, layers=[layer], batch_size=2, max_channels=3)(image)
    torch.testing.assert_close(result.layer_maps[layer], expected, rtol=1e-4, atol=1e-4)
    everything = ScoreCAM(network, layers=[layer], max_channels=4)(image)
    torch.testing.assert_close(everything.map, ScoreCAM(network, layers=[layer])(image).map)


@pytest.mark.parametrize("method", [GradCAM, GradCAMpp, LayerCAM, ScoreCAM])
def test_every_method_in_3d_and_with_an_empty_region(method):
    network, image = unet(spatial_dims=3), blob_image(spatial_dims=3, size=16, batch=2)
    region = torch.zeros(2, 1, 16, 16, 16)
    region[0, 0, 4:12, 4:12, 4:12] = 1
    result = method(network, region=region)(image)
    assert result.map.shape == (2, 1, 16, 16, 16)
    assert list(result.layer_maps) == decoder_layers(network)
    assert result.map[0].amin() == 0 and result.map[0].amax() == 1
    assert result.score[1] == 0 and result.map[1].isnan().all()  # empty region: nothing to explain, undefined
