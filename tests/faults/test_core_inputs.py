"""The core and the recorder on inputs at the edges: any finite scale, values just outside a range, complex
features, empty batches, a string for a list, a reused block, a compiled network."""

from __future__ import annotations

import warnings

import pytest
import torch
from monai.networks.nets import UNet
from torch import nn

from monai_protoseg import FeatureRecorder, SAScoreHandler, prototype_map, prototypes, sa_score
from tests.naive_protoseg import naive_sa_score


def structured_case(size: int = 24) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features that separate a square from the rest, with noise; the square's probability; a shifted target."""
    gen = torch.Generator().manual_seed(0)
    prob = torch.zeros(2, 1, size, size)
    prob[..., 6:16, 5:15] = 0.9
    features = torch.cat([prob, 1 - prob, prob * 0.5], 1) + 0.3 * torch.randn(2, 3, size, size, generator=gen)
    target = torch.roll(prob > 0.5, 2, dims=-1)
    return features, prob, target


@pytest.mark.parametrize("magnitude", [1e20, 1e-30, 3e37, 1e-37])
def test_any_finite_float32_scale_gives_the_float64_answer(magnitude):
    features, prob, target = structured_case()
    scaled = features * magnitude  # float32 throughout
    assert scaled.isfinite().all() and (scaled != 0).any()
    expected = naive_sa_score(scaled.double(), prob.double(), target)
    torch.testing.assert_close(sa_score(scaled, prob, target).double(), expected, rtol=0, atol=1e-7)  # same counts
    torch.testing.assert_close(sa_score(scaled, prob, target), sa_score(features, prob, target))
    probabilities = prototype_map(scaled, prob)
    assert probabilities.isfinite().all()
    torch.testing.assert_close(probabilities, prototype_map(scaled.double(), prob).float(), rtol=0, atol=1e-6)
    fg, bg = prototypes(scaled, prob)
    fg64, bg64 = prototypes(scaled.double(), prob)
    torch.testing.assert_close(fg.double(), fg64, rtol=0, atol=1e-6 * magnitude)
    torch.testing.assert_close(bg.double(), bg64, rtol=0, atol=1e-6 * magnitude)


def test_probability_just_above_one_is_shown_with_enough_digits():
    features, prob, target = structured_case()
    prob[0, 0, 0, 0] = 1.0000001
    with pytest.raises(ValueError, match=r"prob must be .* got values in \[0, 1.00000012\]"):
        sa_score(features, prob, target)


def test_complex_features_and_an_empty_batch_are_refused():
    features, prob, target = structured_case()
    with pytest.raises(ValueError, match=r"features must be real-valued, got dtype torch.complex64"):
        sa_score(features.to(torch.complex64), prob, target)
    with pytest.raises(ValueError, match=r"batch size 0, shape \(0, 3, 24, 24\)"):
        sa_score(features[:0], prob[:0], target[:0])


def small_unet() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 1, 1, channels=(4, 8), strides=(2,)).eval()


def test_a_string_for_the_layer_list_is_named():
    with pytest.raises(TypeError, match=r"got the string 'model.0': write \['model.0'\]"):
        FeatureRecorder(small_unet(), "model.0")
    with pytest.raises(TypeError, match=r"got the string 'model.0'"):
        SAScoreHandler("model.0")


class Reusing(nn.Module):
    """A network that runs one block twice per forward pass (weight sharing)."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Conv2d(1, 1, 3, padding=1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.block(torch.relu(self.block(image)))


def test_a_block_run_twice_in_one_pass_is_warned_about_once():
    network, image = Reusing(), torch.rand(1, 1, 8, 8)
    with torch.no_grad(), FeatureRecorder(network, ["block"]) as recorder:
        with pytest.warns(UserWarning, match=r"layer 'block' \(Conv2d\) ran more than once in one forward pass"):
            output = network(image)
        torch.testing.assert_close(recorder["block"], output)  # the last output, as the warning says
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            network(image)  # warned once per recorder
            network.block(image)  # a call outside the network's pass is no reuse


def test_a_compiled_network_called_before_the_hooks_is_named():
    network = small_unet()
    compiled = torch.compile(network, backend="eager")
    image = torch.rand(1, 1, 16, 16)
    with torch.no_grad():
        compiled(image)  # compiled without hooks
        with FeatureRecorder(compiled, ["model.0"]) as recorder:
            compiled(image)
            with pytest.raises(KeyError, match=r"the network is compiled \(torch.compile\).*network._orig_mod"):
                recorder["model.0"]
        with FeatureRecorder(network, ["model.0"]) as recorder:  # the uncompiled module records
            network(image)
            assert recorder["model.0"].shape == (1, 4, 8, 8)
