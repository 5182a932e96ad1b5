"""ProtoSegInferer: the wrapped inferer's prediction bit for bit, and whole-image features of every probed layer."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.utils import set_determinism
from torch import nn

from monai_protoseg import FeatureRecorder, sa_score
from monai_protoseg.handlers import SAScoreHandler
from monai_protoseg.inferers import ProtoSegInferer

UNET_LAYERS = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2", "model.2"]


def unet() -> UNet:
    set_determinism(seed=0)
    return UNet(3, 1, 1, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def shift_invariant_network() -> nn.Module:
    """Convolutions without normalisation: features away from the borders do not depend on the window."""
    set_determinism(seed=0)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
        nn.Conv3d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode="trilinear"), nn.Conv3d(8, 1, 3, padding=1),
    ).eval()


def ball_image(shape=(1, 1, 32, 48, 32)) -> torch.Tensor:
    axes = [torch.linspace(-1, 1, n) for n in shape[2:]]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).norm(dim=0)
    noise = 0.1 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    return (radius < 0.6).float().expand(shape) + noise


def layer_sa(features: dict[str, torch.Tensor], prediction: torch.Tensor) -> dict[str, float]:
    prob = torch.sigmoid(prediction)
    return {layer: sa_score(f, prob, prob > 0.5).item() for layer, f in features.items()}


def test_simple_inferer_records_the_one_forward_pass():
    network, image = unet(), ball_image()
    inferer = ProtoSegInferer(SimpleInferer(), UNET_LAYERS)
    with torch.no_grad():
        prediction = inferer(image, network)
        expected = network(image)
        with FeatureRecorder(network, UNET_LAYERS) as recorder:
            network(image)
    assert torch.equal(prediction, expected) and inferer.prediction is prediction
    assert all(torch.equal(inferer.features[layer], recorder[layer]) for layer in UNET_LAYERS)
    assert {layer: tuple(m.shape) for layer, m in inferer.prototype_maps(torch.sigmoid(prediction)).items()} == {
        layer: (1, 1, 32, 48, 32) for layer in UNET_LAYERS}


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_one_window_over_the_whole_volume_equals_simple_inference(mode):
    network, image = unet(), ball_image()
    window = SlidingWindowInferer(roi_size=(32, 48, 32), mode=mode)
    inferer = ProtoSegInferer(window, UNET_LAYERS)
    simple = ProtoSegInferer(SimpleInferer(), UNET_LAYERS)
    with torch.no_grad():
        prediction = inferer(image, network)
        assert torch.equal(prediction, window(image, network))
        simple_prediction = simple(image, network)
    assert list(inferer.features) == UNET_LAYERS
    for layer in UNET_LAYERS:
        torch.testing.assert_close(inferer.features[layer], simple.features[layer], atol=1e-5, rtol=1e-5)
    ours, reference = layer_sa(inferer.features, prediction), layer_sa(simple.features, simple_prediction)
    assert ours == pytest.approx(reference, abs=1e-4)


# Stated tolerances for windows of a quarter of the volume with 50% overlap: features near a window's border see its
# zero padding, and blending averages them in. Gaussian blending (small weights at window borders) keeps SA within
# 0.02 of whole-volume inference (measured 0.012); constant blending within 0.06 (measured 0.051).
OVERLAP_TOLERANCE = {"gaussian": {"sa": 0.02, "features": 0.05}, "constant": {"sa": 0.06, "features": 0.2}}


@pytest.mark.parametrize("mode", ["constant", "gaussian"])
def test_overlapping_windows_rebuild_shift_invariant_features(mode):
    network, image = shift_invariant_network(), ball_image()
    layers = ["1", "3", "5"]
    window = SlidingWindowInferer(roi_size=(16, 24, 16), overlap=0.5, sw_batch_size=4, mode=mode)
    inferer, simple = ProtoSegInferer(window, layers), ProtoSegInferer(SimpleInferer(), layers)
    with torch.no_grad():
        prediction = inferer(image, network)
        assert torch.equal(prediction, window(image, network))
        simple_prediction = simple(image, network)
    assert inferer.features["3"].shape == (1, 8, 16, 24, 16)
    for layer in layers:
        error = (inferer.features[layer] - simple.features[layer]).abs().mean() / simple.features[layer].abs().mean()
        assert error < OVERLAP_TOLERANCE[mode]["features"], layer
    ours, reference = layer_sa(inferer.features, prediction), layer_sa(simple.features, simple_prediction)
    assert ours == pytest.approx(reference, abs=OVERLAP_TOLERANCE[mode]["sa"])


def test_windows_off_a_layer_pixel_grid_are_refused():
    network, image = unet(), ball_image()
    inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.4), UNET_LAYERS)  # steps of 9
    with pytest.raises(ValueError, match=r"layer 'model.0' is at scale 0.5 .*window steps \[9, 16\].*step x scale"):
        with torch.no_grad():
            inferer(image, network)


def test_buffered_sliding_window_is_refused():
    with pytest.raises(ValueError, match="buffer_steps"):
        ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16, 16), buffer_steps=2), UNET_LAYERS)


def test_handler_wraps_the_sliding_window_inferer_and_puts_it_back():
    network = unet()
    label = (ball_image() > 0.5).float()
    data = [{"image": ball_image(), "label": label}]
    window = SlidingWindowInferer(roi_size=(32, 48, 32))
    results = {}
    for name, inferer in (("window", window), ("simple", SimpleInferer())):
        evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network,
                                        inferer=inferer, val_handlers=[SAScoreHandler(UNET_LAYERS)])
        evaluator.run()
        assert evaluator.inferer is inferer
        results[name] = {key: value for key, value in evaluator.state.metrics.items() if key.startswith("sa_")}
    assert results["window"] == pytest.approx(results["simple"], abs=1e-4)
    assert sum(len(m._forward_hooks) for m in network.modules()) == 0
