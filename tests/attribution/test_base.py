"""The shared base of the attribution methods: layers, target, normalise-resize-combine, and a network left as is."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.networks.nets import AttentionUnet, BasicUNet, DynUNet, FlexibleUNet, SegResNet, SegResNetDS, SwinUNETR, UNet
from monai.utils import set_determinism
from torch import nn

from monai_protoseg import candidate_layers
from monai_protoseg.attribution import (
    GradCAM,
    ScoreCAM,
    combine,
    decoder_layers,
    normalise,
    resize_to,
    target_region,
    target_score,
)


def networks(spatial_dims: int) -> dict[str, tuple[nn.Module, int]]:
    """Small MONAI networks and an input size each accepts."""
    set_determinism(seed=0)
    return {
        "UNet": (UNet(spatial_dims, 1, 2, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1), 16),
        "BasicUNet": (BasicUNet(spatial_dims, 1, 2, features=(2, 2, 2, 2, 2, 2)), 32),
        "SegResNet": (SegResNet(spatial_dims, 4, 1, 2, blocks_down=(1, 2, 2), blocks_up=(1, 1),
                                norm=("group", {"num_groups": 2})), 16),
        "DynUNet": (DynUNet(spatial_dims, 1, 2, kernel_size=[3, 3, 3, 3], strides=[1, 2, 2, 2],
                            upsample_kernel_size=[2, 2, 2]), 16),
    }


def hook_count(network: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in network.modules())


EXPECTED_DECODERS = {
    "UNet": ["model.1.submodule.1.submodule.2", "model.1.submodule.2"],
    "BasicUNet": ["upcat_4", "upcat_3", "upcat_2", "upcat_1"],
    "SegResNet": ["up_layers.0", "up_layers.1"],
    "DynUNet": ["upsamples.0", "upsamples.1", "upsamples.2"],
}
OUTPUT_BLOCKS = {"UNet": "model.2", "BasicUNet": "final_conv", "SegResNet": "conv_final", "DynUNet": "output_block"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_decoder_layers_follow_the_bottleneck_measured_by_a_shape_probe(spatial_dims):
    for name, (network, size) in networks(spatial_dims).items():
        example = torch.rand(1, 1, *(size,) * spatial_dims)
        layers = decoder_layers(network)
        assert layers == EXPECTED_DECODERS[name], name
        assert decoder_layers(network, include_output=True) == layers + [OUTPUT_BLOCKS[name]]
        assert decoder_layers(network, example_input=example) == layers, name  # the probe agrees with the structure
        # oracle: each candidate's spatial output size; the bottleneck is the last smallest one
        outputs = {}
        hooks = [module.register_forward_hook(lambda m, a, out, n=n: outputs.__setitem__(n, out.shape[2:].numel()))
                 for n, module in network.named_modules() if n in candidate_layers(network)]
        with torch.no_grad():
            network.eval()(example)
        for hook in hooks:
            hook.remove()
        names = candidate_layers(network)
        smallest = min(outputs.values())
        bottleneck = max(i for i, n in enumerate(names) if outputs[n] == smallest)
        assert names[bottleneck + 1:] == layers + [OUTPUT_BLOCKS[name]]


def test_decoder_layers_of_flexible_unet_and_wrapped_networks():
    network = FlexibleUNet(1, 2, "resnet10", spatial_dims=2)
    assert decoder_layers(network) == [f"decoder.blocks.{i}" for i in range(5)]
    unet = networks(2)["UNet"][0]
    assert decoder_layers(nn.DataParallel(unet)) == [f"module.{n}" for n in EXPECTED_DECODERS["UNet"]]
    assert decoder_layers(torch.compile(unet, backend="eager")) == [
        f"_orig_mod.{n}" for n in EXPECTED_DECODERS["UNet"]
    ]


def test_decoder_layers_of_every_network_whose_roles_are_known_agree_with_the_probe():
    set_determinism(seed=0)
    for network, size in ((AttentionUnet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2)), 32),
                          (SegResNetDS(2, 4, 1, 2, blocks_down=(1, 1, 1)), 32),
                          (SwinUNETR(in_channels=1, out_channels=2, spatial_dims=2, feature_size=12), 64)):
        known = decoder_layers(network)  # from the layers' roles, no forward pass
        assert known and known == decoder_layers(network, example_input=torch.rand(1, 1, size, size)), network


def test_decoder_layers_of_other_networks_need_a_probe():
    network = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU()),
        nn.Sequential(nn.Upsample(scale_factor=2), nn.Conv2d(8, 4, 3, padding=1)),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(4, 2, 1), nn.Identity()),
    ).train()
    with pytest.raises(ValueError, match="does not know Sequential; pass example_input"):
        decoder_layers(network)
    assert decoder_layers(network, example_input=torch.rand(1, 1, 16, 16)) == ["2", "3"]
    assert network.training and all(m.training for m in network.modules())
    small = UNet(2, 1, 2, channels=(4, 8), strides=(2,))
    with pytest.raises(ValueError, match="no decoder layer between its bottleneck 'model.1.submodule'"):
        decoder_layers(small)
    assert decoder_layers(small, include_output=True) == ["model.2"]


def test_target_region_pred_softmax_sigmoid_and_probabilities():
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, -1.0, 3.0], [-1.0, 0.5, 4.0]]).reshape(1, 3, 1, 3)  # rows: classes
    # softmax: the argmax of the three pixels is class 1, 0, 2
    assert target_region(logits, "pred", 1).tolist() == [[[[1.0, 0.0, 0.0]]]]
    assert target_region(logits, "pred", 0).tolist() == [[[[0.0, 1.0, 0.0]]]]
    assert target_region(logits, "pred", 2).tolist() == [[[[0.0, 0.0, 1.0]]]]
    # sigmoid: logit > 0 per channel, independent of the others
    assert target_region(logits, "pred", 1, activation="sigmoid").tolist() == [[[[1.0, 0.0, 1.0]]]]
    assert target_region(logits, "pred", 2, activation="sigmoid").tolist() == [[[[0.0, 1.0, 1.0]]]]
    prob = torch.tensor([[0.2, 0.5, 0.9]]).reshape(1, 1, 1, 3)
    assert target_region(prob, "pred", 0, activation=None).tolist() == [[[[0.0, 0.0, 1.0]]]]


def test_target_region_label_and_user_mask():
    output = torch.randn(2, 3, 4, 5)
    indices = torch.randint(0, 3, (2, 1, 4, 5))
    expected = (indices == 2).float()
    torch.testing.assert_close(target_region(output, "label", 2, label=indices), expected)
    torch.testing.assert_close(target_region(output, "label", 2, label=F.one_hot(indices[:, 0], 3).permute(0, 3, 1, 2)),
                               expected)
    binary = torch.randint(0, 2, (2, 1, 4, 5))  # a single-channel (sigmoid) output: the label is its mask
    torch.testing.assert_close(target_region(output[:, :1], "label", 0, "sigmoid", label=binary), binary.float())
    mask = torch.rand(2, 1, 4, 5) > 0.5
    torch.testing.assert_close(target_region(output, mask, 1), mask.float())
    torch.testing.assert_close(target_region(output, MetaTensor(mask.float()), 1), mask.float())


def test_target_region_errors_name_the_problem():
    output = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="class_index 3 is out of range for a network output with 3 channel"):
        target_region(output, "pred", 3)
    with pytest.raises(ValueError, match="single-channel sigmoid output is class_index=0"):
        target_region(output[:, :1], "pred", 1, "sigmoid")
    with pytest.raises(ValueError, match=r"region has shape \(2, 1, 4, 4\); expected \(B, 1, \*S\) = \(2, 1, 4, 5\)"):
        target_region(output, torch.ones(2, 1, 4, 4))
    with pytest.raises(ValueError, match="region must be binary"):
        target_region(output, torch.full((2, 1, 4, 5), 0.5))
    with pytest.raises(ValueError, match='region="label" needs a label'):
        target_region(output, "label")
    with pytest.raises(ValueError, match="the label has 2 channels; expected 1 .* or 3"):
        target_region(output, "label", label=torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="the label has shape"):
        target_region(output, "label", label=torch.zeros(2, 1, 4, 4))
    with pytest.raises(ValueError, match='region must be "pred", "label"'):
        target_region(output, "prediction")
    with pytest.raises(ValueError, match="activation must be"):
        target_region(output, "pred", activation="relu")


def test_target_score_by_hand():
    logits = torch.tensor([[0.0, 2.0, 1.0], [1.0, 1.0, 3.0]]).reshape(1, 2, 1, 3)
    region = torch.tensor([[1.0, 0.0, 1.0]]).reshape(1, 1, 1, 3)
    assert target_score(logits, region, 1).item() == pytest.approx(1.0 + 3.0)
    assert target_score(logits, region, 0).item() == pytest.approx(0.0 + 1.0)
    softmax_1 = [1 / (1 + torch.e ** (0.0 - 1.0)), 1 / (1 + torch.e ** (1.0 - 3.0))]
    assert target_score(logits, region, 1, use="prob").item() == pytest.approx(sum(softmax_1))
    sigmoid_0 = [1 / (1 + torch.e ** -0.0), 1 / (1 + torch.e ** -1.0)]
    assert target_score(logits, region, 0, use="prob", activation="sigmoid").item() == pytest.approx(sum(sigmoid_0))
    assert target_score(logits, region.bool(), 1, use="prob", activation=None).item() == pytest.approx(4.0)
    assert target_score(logits, torch.zeros_like(region), 1).item() == 0.0
    with pytest.raises(ValueError, match='use must be "logit" or "prob"'):
        target_score(logits, region, 1, use="probability")
    with pytest.raises(ValueError, match="region_mask has shape"):
        target_score(logits, region[..., :2], 1)


def test_normalise_by_hand():
    maps = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]], [[[4.0, 4.0], [4.0, 4.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [0.25, 1.0]]], [[[0.0, 0.0], [0.0, 0.0]]]])
    torch.testing.assert_close(normalise(maps), expected)
    volume = torch.randn(3, 1, 4, 5, 6, dtype=torch.float64)
    normalised = normalise(volume)
    assert normalised.dtype == torch.float64
    assert torch.equal(normalised.flatten(1).amin(1), torch.zeros(3))
    assert torch.equal(normalised.flatten(1).amax(1), torch.ones(3, dtype=torch.float64))


def test_resize_to_is_linear_interpolation_without_aligned_corners():
    maps = torch.tensor([[[0.0, 1.0]]])  # 1D, 2 -> 4: sample points (i + 0.5) / 2 - 0.5, clamped at the borders
    torch.testing.assert_close(resize_to(maps, (4,)), torch.tensor([[[0.0, 0.25, 0.75, 1.0]]]))
    image = torch.rand(2, 1, 5, 7)
    torch.testing.assert_close(resize_to(image, (5, 7)), image)
    separable = resize_to(torch.tensor([[[[0.0, 1.0], [2.0, 3.0]]]]), (4, 4))  # bilinear = 1D along each axis
    torch.testing.assert_close(separable[0, 0, 0], torch.tensor([0.0, 0.25, 0.75, 1.0]))
    torch.testing.assert_close(separable[0, 0, :, 0], torch.tensor([0.0, 0.5, 1.5, 2.0]))
    volume = torch.rand(1, 1, 2, 3, 4)
    torch.testing.assert_close(resize_to(volume, (4, 6, 8)),
                               F.interpolate(volume, size=(4, 6, 8), mode="trilinear", align_corners=False))
    with pytest.raises(ValueError, match="cannot be resized to spatial size"):
        resize_to(image, (5, 7, 9))


def test_combine_by_hand():
    coarse = torch.tensor([[[[0.0, 2.0], [2.0, 4.0]]]])  # normalised and resized to 4x4
    fine = torch.zeros(1, 1, 4, 4)
    fine[..., 0, 0] = 5.0
    resized = normalise(F.interpolate(coarse, size=(4, 4), mode="bilinear", align_corners=False))
    equal = combine({"coarse": coarse, "fine": fine}, (4, 4))
    torch.testing.assert_close(equal, normalise(0.5 * resized + 0.5 * normalise(fine)))
    weighted = combine({"coarse": coarse, "fine": fine}, (4, 4), weights={"fine": 3.0, "coarse": 1.0})
    torch.testing.assert_close(weighted, normalise(0.25 * resized + 0.75 * normalise(fine)))
    only = combine({"coarse": coarse, "fine": fine}, (4, 4), weights={"fine": 0.0, "coarse": 2.0})
    torch.testing.assert_close(only, resized)
    assert combine({"flat": torch.ones(2, 1, 2, 2)}, (4, 4)).abs().sum() == 0  # no evidence: zeros


def test_combine_weights_must_cover_exactly_the_layers():
    maps = {"a": torch.rand(1, 1, 2, 2), "b": torch.rand(1, 1, 2, 2)}
    with pytest.raises(ValueError, match=r"weights must name exactly the layers \['a', 'b'\]; missing \['b'\]"):
        combine(maps, (4, 4), weights={"a": 1.0})
    with pytest.raises(ValueError, match=r"unknown \['c'\]"):
        combine(maps, (4, 4), weights={"a": 1.0, "b": 1.0, "c": 1.0})
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        combine(maps, (4, 4), weights={"a": -1.0, "b": 2.0})
    with pytest.raises(ValueError, match="non-negative and not all zero"):
        combine(maps, (4, 4), weights={"a": 0.0, "b": 0.0})
    with pytest.raises(ValueError, match="at least one layer"):
        combine({}, (4, 4))


def small_unet(out_channels: int = 2) -> UNet:
    set_determinism(seed=0)
    return UNet(2, 1, out_channels, channels=(4, 8, 16, 32), strides=(2, 2, 2), num_res_units=1, norm="batch")


@pytest.mark.parametrize("method", [GradCAM, ScoreCAM])
def test_the_network_is_left_exactly_as_it_was(method):
    network = small_unet()
    network.train()
    network.model[0].eval()  # a mixed state must survive too
    frozen = network.model[1].submodule[0]
    for parameter in frozen.parameters():
        parameter.requires_grad_(False)
    network(torch.rand(2, 1, 32, 32)).sum().backward()  # pre-existing gradients (and BatchNorm statistics)
    grads = {name: None if p.grad is None else p.grad.clone() for name, p in network.named_parameters()}
    grad_objects = {name: p.grad for name, p in network.named_parameters()}
    state = {key: value.clone() for key, value in network.state_dict().items()}
    modes = {name: module.training for name, module in network.named_modules()}
    requires_grad = {name: p.requires_grad for name, p in network.named_parameters()}
    hooks = hook_count(network)

    result = method(network)(torch.rand(2, 1, 32, 32))

    assert result.map.shape == (2, 1, 32, 32)
    assert all(torch.equal(value, state[key]) for key, value in network.state_dict().items())  # BN stats included
    assert {name: module.training for name, module in network.named_modules()} == modes
    assert {name: p.requires_grad for name, p in network.named_parameters()} == requires_grad
    for name, parameter in network.named_parameters():
        assert parameter.grad is grad_objects[name]
        assert (parameter.grad is None and grads[name] is None) or torch.equal(parameter.grad, grads[name])
    assert hook_count(network) == hooks


def test_no_grad_is_created_on_a_fresh_network_and_hooks_come_off_when_a_method_raises():
    network = small_unet()

    class Failing(GradCAM):
        def layer_maps(self, inputs, output, features, region_mask):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        Failing(network)(torch.rand(1, 1, 32, 32))
    assert hook_count(network) == 0 and network.training
    GradCAM(network)(torch.rand(1, 1, 32, 32))
    assert all(p.grad is None for p in network.parameters())


def test_works_under_no_grad_and_inference_mode_and_with_frozen_or_meta_inputs():
    network = small_unet().eval()
    image = torch.rand(2, 1, 32, 32)
    expected = GradCAM(network)(image)
    with torch.no_grad():
        under_no_grad = GradCAM(network)(image)
    with torch.inference_mode():
        under_inference = GradCAM(network)(image.clone())
    for parameter in network.parameters():
        parameter.requires_grad_(False)  # a frozen network: gradients still reach the layers through the input
    frozen = GradCAM(network)(MetaTensor(image))
    assert all(not p.requires_grad for p in network.parameters())
    for result in (under_no_grad, under_inference, frozen):
        torch.testing.assert_close(result.map, expected.map)
        torch.testing.assert_close(result.score, expected.score)
        assert type(result.map) is torch.Tensor and not result.map.requires_grad
    assert expected.map.abs().sum() > 0 and not image.requires_grad


def test_result_region_score_and_per_call_region():
    network = small_unet(out_channels=3).eval()
    image = torch.rand(2, 1, 32, 32)
    with torch.no_grad():
        output = network(image)
    method = GradCAM(network, class_index=2)
    result = method(image)
    region = (output.argmax(1, keepdim=True) == 2).float()
    torch.testing.assert_close(result.region, region)
    torch.testing.assert_close(result.score, (output[:, 2:] * region).flatten(1).sum(1))
    label = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    label[:, :, 8:24, 8:24] = 2
    by_label = method(image, label=label, region="label")
    torch.testing.assert_close(by_label.region, (label == 2).float())
    mask = torch.zeros(2, 1, 32, 32, dtype=torch.bool)
    mask[0, 0, :16] = True
    by_mask = GradCAM(network, class_index=2, region=mask)(image)
    torch.testing.assert_close(by_mask.region, mask.float())
    torch.testing.assert_close(by_mask.score[1], torch.tensor(0.0))
    assert by_mask.map[1].isnan().all()  # an empty region: nothing to explain, undefined (not an all-zero map)
    assert by_mask.map[0].amax() == 1


def test_constructor_errors_name_the_problem():
    network = small_unet()
    with pytest.raises(ValueError, match="layer 'model.9' is not a submodule of UNet"):
        GradCAM(network, layers=["model.9"])
    with pytest.raises(ValueError, match="weights must name exactly the layers"):
        GradCAM(network, weights={"model.1.submodule.2": 1.0})
    with pytest.raises(ValueError, match="at least one layer"):
        GradCAM(network, layers=[])
    with pytest.raises(ValueError, match='use must be "logit" or "prob"'):
        GradCAM(network, use="score")
    with pytest.raises(ValueError, match="activation must be"):
        GradCAM(network, activation="tanh")
    with pytest.raises(ValueError, match="class_index 2 is out of range"):
        GradCAM(network, class_index=2)(torch.rand(1, 1, 32, 32))
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        ScoreCAM(network, batch_size=0)
    with pytest.raises(ValueError, match="max_channels must be at least 1"):
        ScoreCAM(network, max_channels=0)
    assert hook_count(network) == 0


def test_a_layer_changed_in_place_later_is_refused_by_gradient_methods_and_copied_by_the_others():
    network = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(3, 2, 1))
    image = torch.randn(1, 1, 8, 8)
    with pytest.raises(RuntimeError, match="layer '0' is modified in place .* explain the layer after"):
        GradCAM(network, layers=["0"])(image)
    assert hook_count(network) == 0
    assert GradCAM(network, layers=["1"])(image).map.shape == (1, 1, 8, 8)
    region = torch.ones(1, 1, 8, 8)
    result = ScoreCAM(network, layers=["0"], region=region)(image)
    with torch.no_grad():  # Score-CAM's weights, from the recorded (pre-ReLU) activations
        before_relu = network[0](image)
        baseline = target_score(network(torch.zeros_like(image)), region)
        weights = [target_score(network(image * normalise(before_relu[:, k:k + 1])), region) - baseline
                   for k in range(3)]
    assert (before_relu < 0).any()
    expected = F.relu(sum(w.reshape(1, 1, 1, 1) * before_relu[:, k:k + 1] for k, w in enumerate(weights)))
    torch.testing.assert_close(result.layer_maps["0"], expected)
