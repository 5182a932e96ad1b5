"""ProtoSegInferer(mode="stream"): the prototype logits, maps and SA of stitched features, from passes over the
sliding windows that never build a layer's whole-image features; mode="auto" chooses by the memory budget."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.utils import set_determinism
from torch import nn

from benchmarks.bench_core import extra_peak_bytes
from monai_protoseg import prototype_map, sa_scores, streaming
from monai_protoseg.inferers import ProtoSegInferer

UNET_LAYERS = ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule", "model.1.submodule.2", "model.2"]


def unet(spatial_dims: int, channels=(4, 8, 16), dtype=torch.float64) -> UNet:
    """Two output classes; the layers at scales 1/2, 1/4, 1/4, 1/2 and 1 of the window."""
    set_determinism(seed=0)
    return UNet(spatial_dims, 1, 2, channels=channels, strides=(2, 2), num_res_units=1).to(dtype).eval()


def image(shape, dtype=torch.float64) -> torch.Tensor:
    """A bright blob in noise."""
    axes = [torch.linspace(-1, 1, n, dtype=dtype) for n in shape[2:]]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).norm(dim=0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype)
    return (radius < 0.6).to(dtype).expand(shape) + 0.3 * noise


def run_both(window: SlidingWindowInferer, network: nn.Module, inputs: torch.Tensor, layers=UNET_LAYERS):
    """The stitching and the streaming inferer after one call each, and the plain prediction."""
    stitch, stream = ProtoSegInferer(window, layers), ProtoSegInferer(window, layers, mode="stream")
    with torch.no_grad():
        plain = window(inputs, network)
        assert torch.equal(stitch(inputs, network), plain)
        assert torch.equal(stream(inputs, network), plain)  # the wrapped inferer's prediction, bit for bit
    assert not stitch.streamed and stream.streamed and stream.features == {}
    # the output layer's logits come from the prediction itself, not from blended windows (one full-size buffer less)
    if layers == UNET_LAYERS:
        assert stream._source.output_layers == {"model.2"}
    return stitch, stream, plain


def raw_logits(inferer: ProtoSegInferer, logits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The logits in the features' own units: times each image's scale squared."""
    return {layer: value * inferer.logit_scales[layer].view(-1, *(1,) * (value.ndim - 1)) ** 2
            for layer, value in logits.items()}


def assert_same_protoseg(stitch, stream, prob, mask, targets, logit_tolerance, map_tolerance, sa_tolerance):
    """Logits (relative to their largest magnitude), maps and SA of both inferers agree."""
    ours, reference = raw_logits(stream, stream.prototype_logits(prob, mask)), raw_logits(
        stitch, stitch.prototype_logits(prob, mask))
    assert list(ours) == list(reference) == list(stitch.features)
    for layer in reference:
        assert ours[layer].shape == reference[layer].shape == (*prob.shape[:2], *stitch.features[layer].shape[2:])
        error = (ours[layer].double() - reference[layer]).abs().max() / reference[layer].abs().max()
        assert error <= logit_tolerance, layer
    maps, reference_maps = stream.prototype_maps(prob, mask), stitch.prototype_maps(prob, mask)
    for layer in reference_maps:
        assert maps[layer].shape == prob.shape
        torch.testing.assert_close(maps[layer].double(), reference_maps[layer].double(), atol=map_tolerance, rtol=0)
    scores, reference_scores = stream.sa_scores(prob, targets, mask), stitch.sa_scores(prob, targets, mask)
    for ours_per_target, reference_per_target in zip(scores, reference_scores, strict=True):
        for layer, value in reference_per_target.items():
            assert value.shape == prob.shape[:2]
            torch.testing.assert_close(ours_per_target[layer].double(), value.double(), atol=sa_tolerance, rtol=0,
                                       equal_nan=True)


def guide(prediction: torch.Tensor, with_mask: bool):
    """Softmax probability of the two classes, a mask without the first rows, and two references."""
    prob = torch.softmax(prediction, 1)
    mask = None
    if with_mask:
        mask = torch.ones_like(prob[:, :1])
        mask[:, :, :5] = 0
    return prob, mask, [prob > 0.5, prob > 0.3]


@pytest.mark.parametrize("with_mask", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("overlap", [0, 0.25, 0.5, 0.6])
@pytest.mark.parametrize("blend", ["constant", "gaussian"])
def test_streamed_2d_equals_stitched(blend, overlap, with_mask):
    # Steps of the window are multiples of 4 (the deepest layer's scale is 1/4): roi 20 with overlap 0.6 (steps 8);
    # the second axis (12) is smaller than the window and padded. Two images, windows in batches of 3 that mix them.
    roi = 20 if overlap == 0.6 else 16
    window = SlidingWindowInferer(roi_size=(roi, roi), overlap=overlap, sw_batch_size=3, mode=blend)
    stitch, stream, prediction = run_both(window, unet(2), image((2, 1, roi + 24, 12)))
    prob, mask, targets = guide(prediction, with_mask)
    assert_same_protoseg(stitch, stream, prob, mask, targets, 1e-10, 1e-10, 1e-6)


def test_streamed_2d_without_padding_equals_stitched(monkeypatch):
    # the whole-size weights are divided in place for the full-size layer: the other layers' weights come first;
    # windows are taken in blocks of one or a few rows
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 64)
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    stitch, stream, prediction = run_both(window, unet(2), image((2, 1, 40, 32)))
    prob, mask, targets = guide(prediction, True)
    assert_same_protoseg(stitch, stream, prob, mask, targets, 1e-10, 1e-10, 1e-6)


def test_streamed_3d_equals_stitched(monkeypatch):
    monkeypatch.setattr(streaming, "CHUNK_ELEMENTS", 1000)  # windows in blocks of rows
    window = SlidingWindowInferer(roi_size=(16, 16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    stitch, stream, prediction = run_both(window, unet(3), image((2, 1, 24, 8, 20)))  # the second axis padded
    prob, mask, targets = guide(prediction, True)
    assert_same_protoseg(stitch, stream, prob, mask, targets, 1e-10, 1e-10, 1e-6)


def test_streamed_float32_within_1e4_of_stitched():
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    stitch, stream, prediction = run_both(window, unet(2, dtype=torch.float32), image((2, 1, 40, 12), torch.float32))
    prob, mask, targets = guide(prediction, True)
    assert all(value.dtype == torch.float32 for value in stream.prototype_logits(prob, mask).values())
    assert_same_protoseg(stitch, stream, prob, mask, targets, 1e-4, 1e-4, 1e-2)


class Offset(nn.Module):
    """Adds a constant: features whose mean is far larger than their spread."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + 1000.0


def test_streamed_float32_within_1e4_of_exact_far_from_the_origin():
    # Features near 1000 with a spread of 1: streaming translates each image's features by a reference (float32
    # stitching, which sums the windows' features untranslated, is 1.4e-4 off here).
    set_determinism(seed=0)
    network = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(), Offset(), nn.Conv2d(8, 8, 3, stride=2, padding=1),
                            nn.Upsample(scale_factor=2), nn.Conv2d(8, 2, 3, padding=1)).eval()
    layers = ["1", "2", "3", "5"]
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    inputs = image((2, 1, 40, 32), torch.float32)
    _, stream, _ = run_both(window, network, inputs, layers)
    assert stream._source.output_layers == {"5"}  # the last module's output is the network's
    exact, _, _ = run_both(window, copy.deepcopy(network).double(), inputs.double(), layers)
    prob, mask, targets = guide(torch.cat([inputs, 1 - inputs], 1) * 4, False)  # the random network's saturates
    assert_same_protoseg(exact, stream, prob, mask, targets, 1e-4, 1e-4, 1e-2)


def test_undefined_prototypes_are_nan_in_both_modes():
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.25, sw_batch_size=2)
    stitch, stream, prediction = run_both(window, unet(2), image((2, 1, 28, 16)))
    prob = torch.softmax(prediction, 1)
    prob[1, 0] = 0  # no foreground of class 0 in the second image
    for inferer in (stitch, stream):
        logits = inferer.prototype_logits(prob)
        assert all(value[1, 0].isnan().all() and not value[0].isnan().any() for value in logits.values())
        scores = inferer.sa_scores(prob, prob > 0.5, ignore_empty=False)
        assert all(value[1, 0].isnan() and not value[0].isnan().any() for value in scores.values())


def test_stitch_mode_is_todays_bit_for_bit():
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    network, inputs = unet(2, dtype=torch.float32), image((2, 1, 40, 12), torch.float32)
    inferer = ProtoSegInferer(window, UNET_LAYERS)
    with torch.no_grad():
        prediction = inferer(inputs, network)
    prob = torch.softmax(prediction, 1)[:, 1:]
    maps = inferer.prototype_maps(prob)
    assert all(torch.equal(maps[layer], prototype_map(f, prob)) for layer, f in inferer.features.items())
    scores = inferer.sa_scores(prob, prob > 0.5)
    expected = sa_scores(inferer.features, prob, prob > 0.5)
    assert all(torch.equal(scores[layer], expected[layer]) for layer in expected)


def test_auto_mode_chooses_by_the_budget_and_logs_when_the_choice_changes(caplog):
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3)
    network, inputs = unet(2), image((2, 1, 40, 12))
    # MONAI stitches on the padded grid (40 x 16): 2 images x (4 x 20 x 8 + 8 x 10 x 4 + 16 x 10 x 4 + 4 x 20 x 8 +
    # 2 x 40 x 16) channels x pixels x 8 bytes (float64)
    stitched = 2 * (4 * 160 + 8 * 40 + 16 * 40 + 4 * 160 + 2 * 640) * 8
    inferer = ProtoSegInferer(window, UNET_LAYERS, mode="auto", memory_budget=stitched - 1)
    caplog.set_level(logging.INFO, logger="monai_protoseg.inferers")
    with torch.no_grad():
        plain = window(inputs, network)
        for _ in range(2):
            assert torch.equal(inferer(inputs, network), plain)
        assert inferer.streamed and inferer.features == {}
        inferer.memory_budget = stitched
        for _ in range(2):
            assert torch.equal(inferer(inputs, network), plain)
    assert not inferer.streamed
    assert sum(f.untyped_storage().nbytes() for f in inferer.features.values()) == stitched
    messages = [record.getMessage() for record in caplog.records if "mode='auto'" in record.getMessage()]
    assert len(messages) == 2
    assert "over the memory budget" in messages[0] and messages[0].endswith("streaming.")
    assert "within the memory budget" in messages[1] and messages[1].endswith("stitching.")
    prob = torch.softmax(plain, 1)
    assert set(inferer.prototype_logits(prob)) == set(UNET_LAYERS)


def test_streaming_memory_does_not_grow_with_channels():
    # A large image and a small window: one window's activations are small against the whole-image features.
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0, sw_batch_size=1)
    inputs = image((1, 1, 96, 96), torch.float32)
    stitched, streamed = {}, {}
    for width in (1, 4):
        network = unet(2, channels=(4 * width, 8 * width, 16 * width), dtype=torch.float32)
        stitch, stream, prediction = run_both(window, network, inputs)
        prob = torch.softmax(prediction, 1)
        stitched[width] = sum(f.numel() * f.element_size() for f in stitch.features.values())
        with torch.no_grad():
            streamed[width] = extra_peak_bytes(lambda: stream.prototype_logits(prob), torch.device("cpu"))
    # what stitching holds grows with the channels (4x: 0.2 to 0.6 MB); what streaming allocates does not (its
    # logits, weights and count maps have K or 2K channels, its sums are (B, 2K, C)): measured 7 kB more
    assert stitched[4] - stitched[1] > 3e5
    assert streamed[4] - streamed[1] < 0.05 * (stitched[4] - stitched[1])


def test_arguments_are_checked():
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5)
    with pytest.raises(ValueError, match="mode must be one of"):
        ProtoSegInferer(window, UNET_LAYERS, mode="streaming")
    with pytest.raises(ValueError, match="mode='stream' reruns the windows of a SlidingWindowInferer, got Simple"):
        ProtoSegInferer(SimpleInferer(), UNET_LAYERS, mode="stream")
    for budget in (0, -1.0, float("inf"), "2GB", True):
        with pytest.raises(ValueError, match="memory_budget must be a positive number of bytes"):
            ProtoSegInferer(window, UNET_LAYERS, mode="auto", memory_budget=budget)
    inferer = ProtoSegInferer(window, UNET_LAYERS, mode="stream")
    with pytest.raises(RuntimeError, match="no features yet"):
        inferer.prototype_logits(torch.rand(1, 1, 16, 16))
    network, inputs = unet(2), image((2, 1, 40, 12))
    with torch.no_grad():
        prob = torch.softmax(inferer(inputs, network), 1)
    with pytest.raises(ValueError, match=r"prob must have shape \(B, K, \*S\) with the 2 images"):
        inferer.prototype_logits(prob[:1])
    with pytest.raises(ValueError, match=r"mask must have shape \(B, 1, \*S\)"):
        inferer.prototype_logits(prob, prob)
    with pytest.raises(ValueError, match=r"prob must be a foreground probability in \[0, 1\]"):
        inferer.prototype_logits(prob * 2)
    with pytest.raises(ValueError, match="unit_wise maps need every channel's map"):
        inferer.prototype_maps(prob, unit_wise=True)
    with pytest.raises(ValueError, match="target must be binary"):
        inferer.sa_scores(prob, prob)


def test_streaming_refuses_windows_off_a_layer_grid_and_non_finite_features():
    network, inputs = unet(2), image((1, 1, 32, 32))
    inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16), overlap=0.4), UNET_LAYERS, mode="stream")
    with pytest.raises(ValueError, match=r"layer 'model.0' is at scale 0.5 .*window steps \[9, 16\]"):
        with torch.no_grad():
            inferer(inputs, network)

    class Log(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.log()  # NaN where x < 0

    network = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), Log()).double().eval()
    inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16)), ["0", "1"], mode="stream")
    with torch.no_grad():
        prediction = inferer(inputs, network)
    with pytest.raises(ValueError, match="layer '1': features contain NaN or Inf"):
        inferer.prototype_logits(torch.full_like(prediction[:, :1], 0.5))


class _ShiftedOutput(nn.Module):
    """A UNet whose last layer's output is changed in place afterwards: that layer's features are not the output."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = unet(2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output = self.unet(inputs)
        return output.mul_(2).add_(0.5)


def test_a_layer_whose_output_changes_after_it_ran_is_blended_not_taken_from_the_prediction():
    network = _ShiftedOutput().double().eval()
    layers = ["unet.model.0", "unet.model.2"]
    window = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5, sw_batch_size=3, mode="gaussian")
    stitch, stream = ProtoSegInferer(window, layers), ProtoSegInferer(window, layers, mode="stream")
    inputs = image((2, 1, 40, 12))
    with torch.no_grad():
        prediction = stitch(inputs, network)
        stream(inputs, network)
    assert stream._source.output_layers == frozenset()
    prob, mask, targets = guide(prediction, False)
    assert_same_protoseg(stitch, stream, prob, mask, targets, 1e-10, 1e-10, 1e-6)
