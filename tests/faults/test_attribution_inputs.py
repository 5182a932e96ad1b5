"""Faulty inputs to the attribution methods, the faithfulness metrics and the weak-supervision maps are refused.

A NaN patch in the image used to give an all-zero map over an empty region and an Image Preserved of 0 (the best
score) without an error. Every entry point now refuses non-finite images, network outputs and features, regions,
masks and labels of the wrong shape or with non-binary values, and empty batches, with a ValueError naming the
method, the argument and its shape; a case whose region is empty gets NaN (undefined), never a best score.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from monai.networks.nets import UNet
from ignite.engine import Engine
from torch import nn
from torch.utils.data import DataLoader

from monai_protoseg.attribution import (
    RISE,
    GradCAM,
    GradCAMpp,
    KernelWeightedContribution,
    LayerCAM,
    ScoreCAM,
    SegmentationAttribution,
    combine,
    deletion_insertion,
    image_preserved,
    masked_prediction,
    normalise,
    prediction_preserved,
)
from monai_protoseg.handlers import AttributionHandler
from monai_protoseg.weak import (
    HEATMAP_METHODS,
    CoinGenerator,
    CoinTrainer,
    classifier_heatmaps,
    counterfactual_mask,
    heatmap_filtered,
    maps_to_masks,
    method_maps,
    per_case_scores,
    segmentation_scores,
    threshold_maps,
)

SIZE = 16
SHAPE = f"(1, 1, {SIZE}, {SIZE})"
METHODS = {GradCAM: {}, GradCAMpp: {}, LayerCAM: {}, ScoreCAM: {"max_channels": 2},
           RISE: {"n_masks": 4, "grid_size": 4}, KernelWeightedContribution: {"max_kernels": 2}}
LAYERED = [method for method in METHODS if method is not RISE]


class Poison(nn.Module):
    """Writes ``value`` into the first pixel of every channel of its input; the identity when ``value`` is None."""

    def __init__(self, value: float | None = None) -> None:
        super().__init__()
        self.value = value

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.value is None:
            return values
        values = values.clone()
        values[..., 0, 0] = self.value
        return values


class TinyNet(nn.Module):
    """Convolution, ``feature`` (a :class:`Poison`), a clamp to [-1, 1], a 1x1 convolution to two classes, ``out``.

    An infinite ``feature`` is clamped away, so the output stays finite; with ``zero_is_nan`` an all-zero input
    gives a NaN output (0 / 0), as a network normalising by the input's range would.
    """

    def __init__(self, feature: float | None = None, out: float | None = None, zero_is_nan: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.feature = Poison(feature)
        self.clamp = nn.Hardtanh()
        self.head = nn.Conv2d(4, 2, 1)
        self.out = Poison(out)
        self.zero_is_nan = zero_is_nan

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        output = self.out(self.head(self.clamp(self.feature(self.conv(images)))))
        if self.zero_is_nan:
            scale = images.abs().flatten(1).amax(1).reshape(-1, 1, 1, 1)
            output = output * scale / scale
        return output


def unet() -> UNet:
    torch.manual_seed(0)
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2))


def explainer(method: type[SegmentationAttribution], network: nn.Module, layers: list[str] | None = None,
              **kwargs) -> SegmentationAttribution:
    """``method`` on ``network`` with cheap options; ``layers`` for all but RISE (which records none)."""
    if method is RISE:
        return RISE(network, **METHODS[RISE], **kwargs)
    return method(network, layers, **METHODS[method], **kwargs)


def images(batch: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(0))


def with_patch(value: float, batch: int = 1, size: int = SIZE) -> torch.Tensor:
    patched = images(batch, size)
    patched[..., 4:8, 4:8] = value
    return patched


def refused(call: Callable[[], object], *parts: str) -> str:
    """Assert that ``call`` raises a ValueError whose message holds every one of ``parts``; return the message."""
    with pytest.raises(ValueError) as error:
        call()
    message = str(error.value)
    for part in parts:
        assert part in message, f"{part!r} not in {message!r}"
    return message


@pytest.mark.parametrize("value,kind", [(float("nan"), "NaN"), (float("inf"), "infinite"), (-float("inf"), "infinite")])
@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_a_non_finite_patch_in_the_image_is_refused(method, value, kind):
    message = refused(lambda: explainer(method, unet())(with_patch(value)), method.__name__, "inputs", SHAPE, kind)
    assert "16 " in message  # how many values: the 4x4 patch


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_an_empty_batch_is_refused(method):
    refused(lambda: explainer(method, unet())(torch.rand(0, 1, SIZE, SIZE)), method.__name__, "inputs",
            f"(0, 1, {SIZE}, {SIZE})")


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_a_non_finite_network_output_is_refused(method):
    network = TinyNet(out=float("nan"))
    refused(lambda: explainer(method, network, ["feature"])(images()), method.__name__, "network output",
            f"(1, 2, {SIZE}, {SIZE})", "NaN")


@pytest.mark.parametrize("method", LAYERED, ids=lambda method: method.__name__)
def test_a_non_finite_layer_output_is_refused(method):
    network = TinyNet(feature=float("inf"))
    assert torch.isfinite(network(images())).all()  # the fault is only in the layer
    refused(lambda: explainer(method, network, ["feature"])(images()), method.__name__, "'feature'",
            f"(1, 4, {SIZE}, {SIZE})", "infinite")


def test_a_non_finite_output_of_a_perturbed_input_is_refused():
    network = TinyNet(zero_is_nan=True)  # Score-CAM's baseline and the end of the deletion curve are all-zero inputs
    refused(lambda: ScoreCAM(network, ["feature"])(images()), "ScoreCAM", "network output", "NaN")
    refused(lambda: deletion_insertion(network, images(), torch.rand(1, 1, SIZE, SIZE), steps=2),
            "deletion_insertion", "network output", "NaN")


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_a_region_of_the_wrong_shape_or_not_binary_is_refused(method):
    network = unet()
    refused(lambda: explainer(method, network, region=torch.ones(1, 1, 8, 8))(images()), method.__name__, "region",
            "(1, 1, 8, 8)", SHAPE)
    for value in (0.5, float("nan")):
        region = torch.ones(1, 1, SIZE, SIZE)
        region[..., 0, 0] = value
        refused(lambda: explainer(method, network, region=region)(images()), method.__name__, "region", SHAPE,
                "binary", str(value))


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_a_label_of_the_wrong_shape_or_with_bad_values_is_refused(method):
    network = unet()
    explain = explainer(method, network, region="label")
    refused(lambda: explain(images(), label=torch.ones(1, 1, 8, 8)), method.__name__, "label", "(1, 1, 8, 8)")
    for value in (float("nan"), 0.5, 2.0, -1.0):  # class indices: integers in [0, 2)
        label = torch.ones(1, 1, SIZE, SIZE)
        label[..., 0, 0] = value
        refused(lambda: explain(images(), label=label), method.__name__, "label", SHAPE, "[0, 2)", str(value))
    one_hot = torch.ones(1, 2, SIZE, SIZE)
    one_hot[:, 1, 0, 0] = 0.7
    refused(lambda: explain(images(), label=one_hot), method.__name__, "label", f"(1, 2, {SIZE}, {SIZE})", "binary")


@pytest.mark.parametrize("method", METHODS, ids=lambda method: method.__name__)
def test_an_empty_region_gives_nan_not_a_best_score(method):
    network, batch = unet(), images(2)
    region = torch.zeros(2, 1, SIZE, SIZE)
    region[0, :, 4:12, 4:12] = 1  # case 1: nothing to explain
    result = explainer(method, network, region=region)(batch)
    assert result.map[1].isnan().all() and not result.map[0].isnan().any()
    assert all(maps[1].isnan().all() and not maps[0].isnan().any() for maps in result.layer_maps.values())
    assert result.score[1] == 0
    preserved = image_preserved(result.map)
    assert preserved[1].isnan() and 0 <= preserved[0] <= 1
    prob_masked = masked_prediction(network, batch, result.map)
    assert prob_masked[1].isnan().all() and not prob_masked[0].isnan().any()
    kept = prediction_preserved(masked_prediction(network, batch, torch.ones_like(result.map)), prob_masked)
    assert kept[1].isnan() and not kept[0].isnan()
    deletion, insertion, _ = deletion_insertion(network, batch, result.map, steps=2, region=result.region)
    assert deletion[1].isnan() and insertion[1].isnan() and not deletion[0].isnan() and not insertion[0].isnan()
    deletion, insertion, _ = deletion_insertion(network, batch, result.map, steps=2)  # the predicted region
    assert deletion[1].isnan() and insertion[1].isnan()


def test_the_attribution_handler_refuses_a_nan_patch_and_leaves_an_empty_region_out_of_its_means():
    network = unet()
    region = torch.zeros(2, 1, SIZE, SIZE)
    region[0, :, 4:12, 4:12] = 1
    engine = Engine(lambda engine, batch: {"image": batch})
    handler = AttributionHandler(GradCAM(network, region=region), deletion_steps=2)
    handler.attach(engine)
    engine.run([images(2)])
    values = handler.values.get_buffer()
    assert values[1].isnan().all() and not values[0].isnan().any()  # Image Preserved 0 would be the best score
    assert engine.state.metrics["attribution_image_preserved"] == pytest.approx(values[0, 1].item())
    faulty = Engine(lambda engine, batch: {"image": batch})
    AttributionHandler(GradCAM(network), deletion_steps=2).attach(faulty)
    refused(lambda: faulty.run([with_patch(float("nan"))]), "GradCAM", "inputs", SHAPE, "NaN")


def test_faithfulness_refuses_non_finite_and_partly_nan_inputs_and_maps():
    network, maps = unet(), torch.rand(1, 1, SIZE, SIZE)
    refused(lambda: masked_prediction(network, with_patch(float("nan")), maps), "masked_prediction", "inputs",
            SHAPE, "NaN")
    refused(lambda: deletion_insertion(network, with_patch(float("inf")), maps, steps=2), "deletion_insertion",
            "inputs", SHAPE, "infinite")
    partly = maps.clone()
    partly[..., 0, 0] = float("nan")  # neither a map nor wholly undefined
    refused(lambda: image_preserved(partly), "image_preserved", "maps", SHAPE, "NaN")
    refused(lambda: masked_prediction(network, images(), partly), "masked_prediction", "maps", SHAPE, "NaN")
    refused(lambda: deletion_insertion(network, images(), partly, steps=2), "deletion_insertion", "maps", SHAPE,
            "NaN")
    refused(lambda: prediction_preserved(maps, partly), "prediction_preserved", "prob_masked", SHAPE, "NaN")
    refused(lambda: deletion_insertion(network, images(), maps, steps=2, baseline=torch.tensor(float("nan"))),
            "deletion_insertion", "baseline", "NaN")
    refused(lambda: masked_prediction(TinyNet(out=float("nan")), images(), maps), "masked_prediction",
            "network output", "NaN")


def test_faithfulness_refuses_bad_regions_and_empty_batches():
    network, maps = unet(), torch.rand(1, 1, SIZE, SIZE)
    region = torch.ones(1, 1, SIZE, SIZE)
    region[..., 0, 0] = float("nan")
    refused(lambda: deletion_insertion(network, images(), maps, steps=2, region=region), "deletion_insertion",
            "region", SHAPE, "binary")
    refused(lambda: prediction_preserved(maps, maps, region), "prediction_preserved", "region", SHAPE, "binary")
    empty = torch.rand(0, 1, SIZE, SIZE)
    refused(lambda: image_preserved(empty), "image_preserved", "maps", f"(0, 1, {SIZE}, {SIZE})")
    refused(lambda: prediction_preserved(empty, empty), "prediction_preserved", "prob", f"(0, 1, {SIZE}, {SIZE})")
    refused(lambda: masked_prediction(network, empty, empty), "masked_prediction", "inputs",
            f"(0, 1, {SIZE}, {SIZE})")
    refused(lambda: deletion_insertion(network, empty, empty, steps=2), "deletion_insertion", "inputs",
            f"(0, 1, {SIZE}, {SIZE})")


def test_normalise_and_combine_refuse_non_finite_maps():
    maps = torch.rand(2, 1, 4, 4)
    maps[1] = float("nan")  # used to become an all-zero map, as if no evidence
    refused(lambda: normalise(maps), "maps", "(2, 1, 4, 4)", "NaN")
    refused(lambda: combine({"up": maps}, (8, 8)), "'up'", "(2, 1, 4, 4)", "NaN")


def classifier() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2))


@pytest.mark.parametrize("method", sorted(HEATMAP_METHODS))
def test_classifier_heatmaps_refuse_a_non_finite_image_and_an_empty_batch(method):
    options = {"n_masks": 4} if method == "rise" else {}
    refused(lambda: classifier_heatmaps(classifier(), with_patch(float("nan")), method, ["0"], **options),
            method, "images", SHAPE, "NaN")
    refused(lambda: classifier_heatmaps(classifier(), torch.rand(0, 1, SIZE, SIZE), method, ["0"], **options),
            method, "images", f"(0, 1, {SIZE}, {SIZE})")


class NaNGenerator(nn.Module):
    """A broken COIN generator: a NaN counterfactual."""

    def forward(self, images: torch.Tensor, target_class: torch.Tensor) -> torch.Tensor:
        return torch.full_like(images, float("nan"))


def test_coin_maps_and_masks_refuse_non_finite_images_and_counterfactuals():
    generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
    refused(lambda: method_maps("coin", with_patch(float("nan"), size=32), classifier(), generator=generator),
            "coin", "images", "(1, 1, 32, 32)", "NaN")
    refused(lambda: method_maps("coin", images(size=32), classifier(), generator=NaNGenerator()), "coin",
            "counterfactuals", "(1, 1, 32, 32)", "NaN")
    for threshold in ("otsu", 0.1):
        refused(lambda: counterfactual_mask(images(), with_patch(float("nan")), threshold), "counterfactual_mask",
                "counterfactuals", SHAPE, "NaN")
    refused(lambda: counterfactual_mask(with_patch(float("inf")), images()), "counterfactual_mask", "images", SHAPE,
            "infinite")


def test_coin_training_refuses_a_non_finite_batch():
    torch.manual_seed(0)
    generator = CoinGenerator(2, features=(4, 4, 8, 8, 16, 4))
    discriminator = nn.Sequential(nn.Conv2d(1, 2, 4, stride=4), nn.Flatten(), nn.Linear(2 * 8 * 8, 1))
    data = [{"image": with_patch(float("nan"), size=32)[0], "label": torch.tensor(1)}] * 2
    trainer = CoinTrainer("cpu", 1, DataLoader(data, batch_size=2), generator, discriminator, classifier(),
                          torch.optim.Adam(generator.parameters()), torch.optim.Adam(discriminator.parameters()))
    refused(trainer.run, "CoinTrainer", "'image'", "(2, 1, 32, 32)", "NaN")


def test_weak_masks_and_scores_refuse_non_finite_maps_and_non_binary_masks():
    maps = torch.rand(1, 1, SIZE, SIZE)
    maps[..., 0, 0] = float("nan")  # NaN > threshold is False: it used to vanish into the background
    refused(lambda: threshold_maps(maps, 0.5), "maps", SHAPE, "NaN")
    refused(lambda: maps_to_masks(maps, torch.tensor([True]), 0.5), "maps", SHAPE, "NaN")
    truths = torch.zeros(1, 1, SIZE, SIZE, dtype=torch.bool)
    for value in (0.5, float("nan")):  # .bool() made both foreground
        masks = torch.zeros(1, 1, SIZE, SIZE)
        masks[..., 0, 0] = value
        refused(lambda: per_case_scores(masks, truths), "masks", SHAPE, "0 and 1")
        refused(lambda: segmentation_scores(truths, masks), "truths", SHAPE, "0 and 1")
    refused(lambda: heatmap_filtered(images(), maps), "heatmap_filtered", "heatmaps", SHAPE, "NaN")
    refused(lambda: heatmap_filtered(images(), maps.nan_to_num(2.0)), "heatmap_filtered", "heatmaps", SHAPE,
            "[0, 1]")
    refused(lambda: heatmap_filtered(with_patch(float("nan")), maps.nan_to_num(0.0)), "heatmap_filtered", "images",
            SHAPE, "NaN")
