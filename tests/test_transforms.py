"""MONAI transforms: probabilities against torch's activations, ProtoSegd against the core functions on batches."""

from __future__ import annotations

import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import AsDiscreted, Compose

from monai_protoseg import prototype_map, sa_score
from monai_protoseg.transforms import ForegroundProbability, ForegroundProbabilityd, ProtoSegd

SIZES = [(24, 20), (10, 12, 8)]
AFFINE = torch.tensor([[2.0, 0, 0, 5], [0, 3.0, 0, -1], [0, 0, 1.5, 2], [0, 0, 0, 1]], dtype=torch.float64)


def blob_case(size, channels=3, classes=2, seed=0):
    """An image whose channels respond to two side-by-side blobs, soft class probabilities and one-hot labels."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n) for n in size]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    shifts = torch.tensor([-0.45, 0.45][:classes])  # blob centres along the first axis
    grid = grid[None].repeat(classes, *[1] * grid.ndim)
    grid[:, 0] -= shifts.view(-1, *[1] * len(size))
    distance = grid.norm(dim=1)  # (K, *S)
    label = distance < 0.35
    prob = torch.sigmoid((0.35 - distance) * 10)
    weights = torch.randn(channels, classes, generator=gen)
    image = torch.einsum("ck,k...->c...", weights, label.float()) + 0.2 * torch.randn(channels, *size, generator=gen)
    return image, prob, label


def expected(image, prob, label=None, mask=None, **options):
    """The core functions on one batch of K images (one per class), independently of the per-class loop."""
    classes = prob.shape[0]
    features = image[None].expand(classes, *image.shape)
    batch_prob = prob[:, None]
    batch_mask = None if mask is None else mask[None].expand(classes, *mask.shape)
    unit_wise = options.get("unit_wise", False)
    maps = prototype_map(features, batch_prob, batch_mask, unit_wise=unit_wise).flatten(0, 1)
    scores = None if label is None else sa_score(features, batch_prob, label[:, None], batch_mask, **options)
    return maps, scores


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("include_background", [False, True])
def test_softmax_matches_torch(size, include_background):
    logits = torch.randn(3, *size, generator=torch.Generator().manual_seed(1))
    prob = ForegroundProbability("softmax", include_background)(logits)
    reference = torch.softmax(logits, dim=0)
    torch.testing.assert_close(prob.as_tensor(), reference if include_background else reference[1:])


@pytest.mark.parametrize("size", SIZES)
def test_sigmoid_matches_torch_and_background_rule(size):
    logits = torch.randn(3, *size, generator=torch.Generator().manual_seed(2))
    reference = torch.sigmoid(logits)
    torch.testing.assert_close(ForegroundProbability("sigmoid")(logits).as_tensor(), reference[1:])
    torch.testing.assert_close(ForegroundProbability("sigmoid", include_background=True)(logits).as_tensor(), reference)
    single = ForegroundProbability("sigmoid")(logits[:1])  # a single channel is the one class: always kept
    torch.testing.assert_close(single.as_tensor(), reference[:1])


def test_none_passes_probabilities_and_checks_range():
    probabilities = torch.rand(2, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    out = ForegroundProbability(None, include_background=True)(probabilities)
    assert out.dtype == torch.float64 and torch.equal(out.as_tensor(), probabilities)
    assert ForegroundProbability(None)(probabilities[:1].numpy()).shape == (1, 6, 6)
    for bad in (probabilities + 1, probabilities * float("nan")):
        with pytest.raises(ValueError, match=r"\[0, 1\].*shape \(2, 6, 6\)"):
            ForegroundProbability(None)(bad)


def test_output_is_float32_and_keeps_meta():
    logits = MetaTensor(torch.randn(2, 5, 4, 3).half(), affine=AFFINE, meta={"filename_or_obj": "case.nii.gz"})
    prob = ForegroundProbability("softmax")(logits)
    assert isinstance(prob, MetaTensor) and prob.dtype == torch.float32 and prob.shape == (1, 5, 4, 3)
    assert torch.equal(prob.affine, AFFINE) and prob.meta["filename_or_obj"] == "case.nii.gz"


def test_bad_arguments_and_shapes():
    with pytest.raises(ValueError, match="activation"):
        ForegroundProbability("relu")
    with pytest.raises(ValueError, match="activation"):
        ForegroundProbabilityd("pred", activation="tanh")
    with pytest.raises(ValueError, match="output_keys"):
        ForegroundProbabilityd(["a", "b"], output_keys="c")
    with pytest.raises(ValueError, match=r"key 'pred'.*single channel \(shape \(1, 4, 4\)\)"):
        ForegroundProbabilityd("pred")({"pred": torch.zeros(1, 4, 4)})
    with pytest.raises(ValueError, match=r"key 'pred'.*got shape \(4,\)"):
        ForegroundProbabilityd("pred", activation="sigmoid")({"pred": torch.zeros(4)})


def test_dict_version_output_keys_meta_and_missing_keys():
    logits = MetaTensor(torch.randn(3, 8, 8), affine=AFFINE)
    transform = ForegroundProbabilityd(["pred", "other"], output_keys=["prob", "other_prob"], allow_missing_keys=True)
    data = transform({"pred": logits})
    assert data["pred"] is logits and "other_prob" not in data
    torch.testing.assert_close(data["prob"].as_tensor(), torch.softmax(logits.as_tensor(), 0)[1:])
    assert torch.equal(data["prob"].affine, AFFINE)
    overwritten = ForegroundProbabilityd("pred", activation="sigmoid", include_background=True)({"pred": logits})
    torch.testing.assert_close(overwritten["pred"].as_tensor(), torch.sigmoid(logits.as_tensor()))
    with pytest.raises(KeyError):
        ForegroundProbabilityd("pred")({"image": logits})


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("masked", [False, True])
def test_protoseg_matches_core(size, masked):
    image, prob, label = blob_case(size)
    mask = (torch.rand(1, *size, generator=torch.Generator().manual_seed(4)) > 0.2) if masked else None
    data = {"image": image, "prob": prob, "label": label, "mask": mask}
    transform = ProtoSegd("image", prob_key="prob", label_key="label", mask_key="mask" if masked else None)
    out = transform(data)
    maps, scores = expected(image, prob, label, mask)
    assert out["image_protoseg_map"].shape == (2, *size) and out["image_protoseg_sa"].shape == (2,)
    torch.testing.assert_close(out["image_protoseg_map"].as_tensor(), maps, equal_nan=True)
    torch.testing.assert_close(out["image_protoseg_sa"], scores, equal_nan=True)
    assert type(out["image_protoseg_sa"]) is torch.Tensor


@pytest.mark.parametrize("size", SIZES)
def test_unit_wise_shapes_and_values(size):
    image, prob, label = blob_case(size, channels=3)
    out = ProtoSegd("image", prob_key="prob", label_key="label", unit_wise=True)({"image": image, "prob": prob,
                                                                                  "label": label})
    maps, scores = expected(image, prob, label, unit_wise=True)
    assert out["image_protoseg_map"].shape == (2 * 3, *size) and out["image_protoseg_sa"].shape == (2, 3)
    torch.testing.assert_close(out["image_protoseg_map"].as_tensor(), maps)  # class-major: k * C + c
    torch.testing.assert_close(out["image_protoseg_sa"], scores, equal_nan=True)
    single = prototype_map(image[None, 2:3], prob[None, 1:2])[0, 0]
    torch.testing.assert_close(out["image_protoseg_map"].as_tensor().unflatten(0, (2, 3))[1, 2], single)


def test_undefined_and_empty_scores_follow_core():
    image, prob, label = blob_case((16, 16))
    prob[1] = 0  # no foreground prototype for class 1
    label[0] = False  # empty label for class 0
    data = {"image": image, "prob": prob, "label": label}
    for ignore_empty in (True, False):
        out = ProtoSegd("image", prob_key="prob", label_key="label", ignore_empty=ignore_empty)(data)
        _, scores = expected(image, prob, label, ignore_empty=ignore_empty)
        torch.testing.assert_close(out["image_protoseg_sa"], scores, equal_nan=True)
        assert out["image_protoseg_sa"][1].isnan() and out["image_protoseg_sa"][0].isnan() == ignore_empty
        assert out["image_protoseg_map"][1].isnan().all()


def test_map_keeps_image_meta_and_custom_keys():
    image, prob, label = blob_case((12, 10, 8))
    image = MetaTensor(image, affine=AFFINE, meta={"filename_or_obj": "img.nii.gz"})
    prob = MetaTensor(prob, affine=torch.eye(4, dtype=torch.float64))
    data = {"image": image, "t2": image.clone(), "prob": prob, "label": label}
    out = ProtoSegd(["image", "t2"], prob_key="prob", label_key="label", map_keys=["m1", "m2"],
                    score_keys=["s1", "s2"])(data)
    for map_key in ("m1", "m2"):
        assert isinstance(out[map_key], MetaTensor) and torch.equal(out[map_key].affine, AFFINE)
        assert out[map_key].meta["filename_or_obj"] == "img.nii.gz"
    assert torch.equal(out["s1"], out["s2"]) and out["image"] is image
    with pytest.raises(ValueError, match="map_keys"):
        ProtoSegd(["image", "t2"], prob_key="prob", map_keys="m")


def test_missing_label_skips_score_and_missing_image_is_allowed():
    image, prob, _ = blob_case((16, 16))
    out = ProtoSegd(["image", "t2"], prob_key="prob", label_key="label", allow_missing_keys=True)(
        {"image": image, "prob": prob}
    )
    assert "image_protoseg_map" in out and "image_protoseg_sa" not in out and "t2_protoseg_map" not in out
    out = ProtoSegd("image", prob_key="prob")({"image": image, "prob": prob})
    assert "image_protoseg_sa" not in out
    with pytest.raises(KeyError, match="prob"):
        ProtoSegd("image", prob_key="prob")({"image": image})
    with pytest.raises(KeyError, match="mask"):
        ProtoSegd("image", prob_key="prob", mask_key="mask")({"image": image, "prob": prob})


def test_bad_inputs_name_the_keys():
    image, prob, label = blob_case((16, 16))
    transform = ProtoSegd("image", prob_key="prob", label_key="label", mask_key="mask")
    mask = torch.ones(1, 16, 16)
    cases = [
        ({"prob": prob * 2}, r"prob = 'prob'.*class channel 0: prob must be a foreground probability"),
        ({"label": label.float() * 0.5}, r"target = label 'label'.*target must be binary"),
        ({"mask": mask * 0.5}, r"mask = 'mask'.*mask must be binary"),
        ({"mask": torch.ones(2, 16, 16)}, r"mask = 'mask'.*mask must have shape"),
        ({"label": label[:1]}, r"label 'label' must have the shape of prob 'prob' \(2, 16, 16\)"),
        ({"prob": prob[:, :8]}, r"image 'image' .* and prob 'prob' .* must share the spatial grid"),
        ({"image": image.expand(2, *image.shape)}, r"image 'image' .* and prob 'prob'"),
    ]
    for change, message in cases:
        data = {"image": image, "prob": prob, "label": label, "mask": mask, **change}
        with pytest.raises(ValueError, match=message):
            transform(data)


def test_compose_pipeline_from_logits_and_class_index_label():
    size = (32, 28)
    image, _, label = blob_case(size, channels=2)
    class_index = (label.float() * torch.tensor([1.0, 2.0]).view(2, 1, 1)).sum(0, keepdim=True)  # (1, *S), 0..2
    logits = 4 * torch.cat([1 - label.any(0, keepdim=True).float(), label.float()]) - 2  # (3, *S)
    pipeline = Compose([
        ForegroundProbabilityd("pred", activation="softmax", output_keys="prob"),
        AsDiscreted("label", to_onehot=3),
        ForegroundProbabilityd("label", activation=None),  # drop the one-hot background channel
        ProtoSegd("image", prob_key="prob", label_key="label"),
    ])
    data = {"image": MetaTensor(image, affine=AFFINE[1:, 1:]), "pred": logits, "label": class_index}
    out = pipeline(data)
    maps, scores = expected(image, torch.softmax(logits, 0)[1:], label)
    torch.testing.assert_close(out["image_protoseg_map"].as_tensor(), maps)
    torch.testing.assert_close(out["image_protoseg_sa"], scores)
    assert torch.equal(out["image_protoseg_map"].affine, AFFINE[1:, 1:])


@pytest.mark.parametrize("size", [(48, 40), (20, 24, 16)])
def test_bright_blob_is_separable(size):
    axes = [torch.linspace(-1, 1, n) for n in size]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).norm(dim=0)[None]
    label = radius < 0.5
    prob = torch.sigmoid((0.5 - radius) * 20)  # a network-like guide, soft across the border
    image = 2 * label.float() + 0.2 * torch.randn(1, *size, generator=torch.Generator().manual_seed(5))
    out = ProtoSegd("image", prob_key="prob", label_key="label")({"image": image, "prob": prob, "label": label})
    assert out["image_protoseg_sa"].shape == (1,) and out["image_protoseg_sa"].item() > 0.9
