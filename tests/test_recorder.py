"""FeatureRecorder: records what the layers output, never changes the network, always removes its hooks."""

from __future__ import annotations

import pytest
import torch
from monai.networks.nets import FlexibleUNet, UNet
from monai.utils import set_determinism
from torch import nn

from monai_protoseg import FeatureRecorder, candidate_layers, resolve_layers, sa_score
from tests.naive_protoseg import naive_sa_score


def small_unet(spatial_dims: int = 2) -> UNet:
    set_determinism(seed=0)
    return UNet(spatial_dims, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def hook_count(network: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


def test_records_what_each_layer_outputs():
    network, image = small_unet(), torch.rand(2, 1, 16, 16)
    with torch.no_grad(), FeatureRecorder(network, ["model.0", "model.2"]) as recorder:
        output = network(image)
        first = network.model[0](image)
    torch.testing.assert_close(recorder["model.0"], first, rtol=0, atol=0)
    torch.testing.assert_close(recorder["model.2"], output, rtol=0, atol=0)  # the last block gives the output
    assert set(recorder.features) == {"model.0", "model.2"} and recorder.layers == ["model.0", "model.2"]


def test_outputs_weights_and_mode_are_unchanged_and_no_hook_remains():
    network, image = small_unet(), torch.rand(2, 1, 16, 16)
    network.train()
    state = {k: v.clone() for k, v in network.state_dict().items()}
    hooks_before = hook_count(network)
    set_determinism(seed=1)
    plain = network(image)
    set_determinism(seed=1)
    with FeatureRecorder(network, candidate_layers(network)) as recorder:
        recorded = network(image)
        assert hook_count(network) == hooks_before + len(recorder.layers) + 2  # and the pass boundaries
    assert torch.equal(plain, recorded)
    assert network.training and hook_count(network) == hooks_before
    assert all(torch.equal(v, state[k]) for k, v in network.state_dict().items())
    assert all(not f.requires_grad for f in recorder.features.values()) and recorded.requires_grad


def test_hooks_are_removed_when_the_block_raises():
    network = small_unet()
    with pytest.raises(RuntimeError, match="boom"):
        with FeatureRecorder(network, ["model.0"]):
            network(torch.rand(1, 1, 16, 16))
            raise RuntimeError("boom")
    assert hook_count(network) == 0
    with pytest.raises(RuntimeError):  # a forward pass that fails inside the network
        with FeatureRecorder(network, ["model.0"]):
            network(torch.rand(1, 3, 16, 16))
    assert hook_count(network) == 0


def test_non_tensor_output_names_the_layer_and_leaves_no_hook():
    network = FlexibleUNet(1, 2, "resnet10", spatial_dims=2).eval()
    with pytest.raises(TypeError, match="layer 'encoder' .*returned list, not a tensor"):
        with FeatureRecorder(network, ["encoder"]):
            network(torch.rand(1, 1, 64, 64))
    assert hook_count(network) == 0


def test_each_forward_pass_replaces_the_last():
    network = small_unet()
    with torch.no_grad(), FeatureRecorder(network, ["model.0"]) as recorder:
        network(torch.rand(1, 1, 16, 16))
        network(torch.rand(3, 1, 16, 16))
    assert recorder["model.0"].shape[0] == 3
    recorder.clear()
    with pytest.raises(KeyError, match="was not run in the last forward pass"):
        recorder["model.0"]
    with pytest.raises(KeyError, match="'model.1' is not recorded"):
        recorder["model.1"]


def test_cannot_be_entered_twice():
    network = small_unet()
    recorder = FeatureRecorder(network, ["model.0"])
    with recorder:
        with pytest.raises(RuntimeError, match="already active"):
            recorder.__enter__()
    assert hook_count(network) == 0


def test_in_place_overwrite_is_detected_and_clone_keeps_the_value():
    network = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True))
    image = torch.randn(1, 1, 8, 8)
    with torch.no_grad(), FeatureRecorder(network, ["0"]) as recorder:
        network(image)
    with pytest.raises(RuntimeError, match=r"layer '0' was modified in place.*clone=True"):
        recorder["0"]
    with torch.no_grad(), FeatureRecorder(network, ["0"], clone=True) as recorder:
        network(image)
        expected = network[0](image)
    assert (recorder["0"] < 0).any()
    torch.testing.assert_close(recorder["0"], expected)


def test_inference_mode_outputs_are_copied():
    network = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(inplace=True))
    image = torch.randn(1, 1, 8, 8)
    with torch.inference_mode(), FeatureRecorder(network, ["0"]) as recorder:
        network(image)
        expected = network[0](image)
    torch.testing.assert_close(recorder["0"], expected)


def test_wrapper_prefixes_resolve_both_ways():
    network = small_unet()
    wrapped = nn.DataParallel(network)  # names gain "module.", as with DistributedDataParallel
    assert resolve_layers(wrapped, ["model.0"])["model.0"] is network.model[0]
    assert resolve_layers(wrapped, ["module.model.0"])["module.model.0"] is network.model[0]
    assert resolve_layers(network, ["module.model.0"])["module.model.0"] is network.model[0]
    compiled = torch.compile(network, backend="eager")  # names gain "_orig_mod."
    assert resolve_layers(compiled, ["model.2"])["model.2"] is network.model[2]
    assert resolve_layers(compiled, ["_orig_mod.model.2"])["_orig_mod.model.2"] is network.model[2]
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad(), FeatureRecorder(wrapped, ["model.2"]) as recorder:
        output = wrapped(image)
    torch.testing.assert_close(recorder["model.2"], output, rtol=0, atol=0)
    assert hook_count(network) == 0


def test_recording_through_torch_compile():
    network = small_unet()
    compiled = torch.compile(network, backend="eager")
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        expected = network.model[0](image)
        with FeatureRecorder(compiled, ["model.0"]) as recorder:
            compiled(image)
    torch.testing.assert_close(recorder["model.0"], expected)
    assert hook_count(network) == 0


def test_unknown_layer_lists_the_closest_names():
    network = small_unet()
    with pytest.raises(ValueError, match=r"layer 'model.O' is not a submodule of UNet; closest names: .*'model.0'"):
        FeatureRecorder(network, ["model.0", "model.O"])
    with pytest.raises(ValueError, match="closest names: none close"):
        resolve_layers(network, ["decoder_block_that_does_not_exist_anywhere"])
    assert hook_count(network) == 0


def test_recorded_features_give_the_naive_sa_score():
    network = small_unet(3)
    image = torch.rand(2, 1, 16, 16, 16)
    with torch.no_grad(), FeatureRecorder(network, candidate_layers(network)) as recorder:
        prob = torch.softmax(network(image), dim=1)[:, 1:]
    target = prob > 0.5
    for name, features in recorder.features.items():
        expected = naive_sa_score(features.double(), prob.double(), target)
        torch.testing.assert_close(sa_score(features.double(), prob.double(), target), expected, equal_nan=True,
                                   msg=name)
