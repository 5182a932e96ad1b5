"""ProtoSeg math against hand-computed values, the naive formulation and MONAI's Dice."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from monai.data import MetaTensor
from monai.metrics import compute_dice

import monai_protoseg.protoseg as protoseg
from monai_protoseg import prototype_map, prototypes, sa_score
from tests.naive_protoseg import naive_prototype_map, naive_prototypes, naive_sa_score

# (feature spatial size, prob spatial size): equal, upsampled by 2, non-integer up, downsampled, mixed per axis.
RESOLUTIONS = [
    ((12,), (12,)),
    ((7,), (19,)),
    ((8, 8), (8, 8)),
    ((6, 5), (12, 10)),
    ((5, 7), (13, 11)),
    ((14, 12), (6, 9)),
    ((4, 5, 3), (4, 5, 3)),
    ((3, 4, 5), (6, 8, 10)),
    ((3, 6, 4), (7, 5, 9)),
]


def random_case(feature_size, size, batch=2, channels=5, masked=False, seed=0, dtype=torch.float32):
    """Gaussian features, a uniform probability, a random mask and target."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(batch, channels, *feature_size, generator=gen, dtype=dtype)
    prob = torch.rand(batch, 1, *size, generator=gen, dtype=dtype)
    mask = (torch.rand(batch, 1, *size, generator=gen) > 0.3) if masked else None
    target = torch.rand(batch, 1, *size, generator=gen) > 0.5
    return features, prob, mask, target


def blob_case(feature_size, size, batch=2, channels=4, seed=0, dtype=torch.float32):
    """Structured input: a soft ball as probability, features that respond to it in some channels, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    axes = [torch.linspace(-1, 1, n, dtype=dtype) for n in size]
    radius = torch.stack(torch.meshgrid(*axes, indexing="ij")).norm(dim=0)
    prob = torch.sigmoid((0.6 - radius) * 8).expand(batch, 1, *size).clone()
    small_axes = [torch.linspace(-1, 1, n, dtype=dtype) for n in feature_size]
    small_radius = torch.stack(torch.meshgrid(*small_axes, indexing="ij")).norm(dim=0)
    weights = torch.randn(batch, channels, *([1] * len(size)), generator=gen, dtype=dtype)
    features = weights * (small_radius < 0.6) + 0.3 * torch.randn(batch, channels, *feature_size, generator=gen)
    return features.to(dtype), prob, None, prob > 0.5


def assert_maps_match(ours: torch.Tensor, naive: torch.Tensor) -> None:
    """Within 1e-4 of the naive map, and the same binary map wherever the naive map is not at a tie."""
    assert ours.shape == naive.shape
    torch.testing.assert_close(ours.double(), naive, atol=1e-4, rtol=0, equal_nan=True)
    away_from_ties = (naive - 0.5).abs() > 1e-4
    assert torch.equal((ours > 0.5)[away_from_ties], (naive > 0.5)[away_from_ties])


def test_hand_computed_1d():
    features = torch.tensor([[[0.0, 0.0, 2.0, 2.0]]])
    prob = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])
    fg, bg = prototypes(features, prob)
    assert fg.tolist() == [[2.0]] and bg.tolist() == [[0.0]]
    low, high = 1 / (1 + math.exp(4)), 1 / (1 + math.exp(-4))  # exp(-d_fg) / (exp(-d_fg) + exp(-d_bg))
    torch.testing.assert_close(prototype_map(features, prob), torch.tensor([[[low, low, high, high]]]))
    assert sa_score(features, prob, prob > 0.5).tolist() == [1.0]
    assert sa_score(features, prob, torch.tensor([[[0, 1, 1, 1]]])).tolist() == [pytest.approx(0.8)]


def test_hand_computed_prototypes_with_mask():
    features = torch.tensor([[[0.0, 1.0, 2.0, 4.0], [1.0, 1.0, 1.0, 1.0]]])
    prob = torch.tensor([[[0.0, 0.5, 1.0, 1.0]]])
    mask = torch.tensor([[[1, 1, 1, 0]]])
    fg, bg = prototypes(features, prob, mask)
    torch.testing.assert_close(fg, torch.tensor([[2.5 / 1.5, 1.0]]))
    torch.testing.assert_close(bg, torch.tensor([[0.5 / 1.5, 1.0]]))


@pytest.mark.parametrize("feature_size,size", RESOLUTIONS)
@pytest.mark.parametrize("masked", [False, True])
def test_prototypes_match_naive(feature_size, size, masked):
    features, prob, mask, _ = random_case(feature_size, size, masked=masked)
    for ours, naive in zip(prototypes(features, prob, mask), naive_prototypes(features.double(), prob.double(), mask)):
        torch.testing.assert_close(ours.double(), naive, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("feature_size,size", RESOLUTIONS)
@pytest.mark.parametrize("unit_wise", [False, True])
@pytest.mark.parametrize("case", [random_case, blob_case])
def test_prototype_map_matches_naive(feature_size, size, unit_wise, case):
    for masked in ([False, True] if case is random_case else [False]):
        kwargs = {"masked": masked} if case is random_case else {}
        features, prob, mask, _ = case(feature_size, size, **kwargs)
        ours = prototype_map(features, prob, mask, unit_wise=unit_wise)
        assert ours.shape == (2, features.shape[1] if unit_wise else 1, *size) and ours.dtype == torch.float32
        assert_maps_match(ours, naive_prototype_map(features.double(), prob.double(), mask, unit_wise))


@pytest.mark.parametrize("feature_size,size", RESOLUTIONS)
@pytest.mark.parametrize("unit_wise", [False, True])
@pytest.mark.parametrize("case", [random_case, blob_case])
def test_sa_score_matches_naive(feature_size, size, unit_wise, case):
    # float64 keeps both formulations ~1e-12 apart, far from any tie, so the scores must agree exactly.
    features, prob, mask, target = case(feature_size, size, dtype=torch.float64)
    ours = sa_score(features, prob, target, mask, unit_wise=unit_wise)
    naive = naive_sa_score(features, prob, target, mask, unit_wise)
    assert ours.shape == ((2, features.shape[1]) if unit_wise else (2,)) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, naive, atol=1e-12, rtol=0, equal_nan=True)
    # float32 inputs: the same scores up to pixels at ties.
    ours32 = sa_score(features.float(), prob.float(), target, mask, unit_wise=unit_wise)
    torch.testing.assert_close(ours32.double(), naive, atol=0.02, rtol=0, equal_nan=True)


@settings(max_examples=100, deadline=None)
@given(
    spatial_dims=st.integers(1, 3),
    feature_edge=st.lists(st.integers(1, 9), min_size=3, max_size=3),
    edge=st.lists(st.integers(1, 11), min_size=3, max_size=3),
    batch=st.integers(1, 3),
    channels=st.integers(1, 6),
    scale=st.sampled_from([1e-2, 1.0, 10.0]),
    offset=st.sampled_from([0.0, 100.0, -1e4]),
    masked=st.booleans(),
    unit_wise=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_matches_naive(spatial_dims, feature_edge, edge, batch, channels, scale, offset, masked, unit_wise,
                                seed):
    features, prob, mask, target = random_case(
        tuple(feature_edge[:spatial_dims]), tuple(edge[:spatial_dims]), batch, channels, masked, seed
    )
    features = features * scale + offset
    naive_map = naive_prototype_map(features.double(), prob.double(), mask, unit_wise)
    assert_maps_match(prototype_map(features, prob, mask, unit_wise=unit_wise), naive_map)
    if ((naive_map - 0.5).abs() < 1e-9).any():
        return  # a tie (e.g. features that interpolate to a constant): either side of it is correct
    torch.testing.assert_close(
        sa_score(features.double(), prob.double(), target, mask, unit_wise=unit_wise),
        naive_sa_score(features.double(), prob.double(), target, mask, unit_wise),
        atol=1e-12, rtol=0, equal_nan=True,
    )


@pytest.mark.parametrize("ignore_empty", [True, False])
def test_dice_matches_monai(ignore_empty):
    features, prob, _, target = random_case((6, 7), (12, 14), batch=4, channels=3, dtype=torch.float64)
    target[1] = False  # one empty target
    features[3] = 0.0  # constant features: no pixel is nearer the foreground prototype, so an empty map
    target[3] = False
    binary = prototype_map(features, prob) > 0.5
    expected = compute_dice(binary, target, include_background=True, ignore_empty=ignore_empty)[:, 0]
    torch.testing.assert_close(sa_score(features, prob, target, ignore_empty=ignore_empty), expected.double(), equal_nan=True)


def test_empty_target_rule():
    features, prob, _, _ = blob_case((8, 8), (8, 8), batch=1, dtype=torch.float64)
    empty = torch.zeros_like(prob, dtype=torch.bool)
    assert sa_score(features, prob, empty).isnan().all()
    assert sa_score(features, prob, empty, ignore_empty=False).tolist() == [0.0]  # the map is not empty
    constant = torch.ones_like(features)
    assert sa_score(constant, prob, empty, ignore_empty=False).tolist() == [1.0]  # both empty
    assert sa_score(constant, prob, empty, ignore_empty=False, unit_wise=True).tolist() == [[1.0] * 4]


def test_undefined_prototypes_are_nan_per_image():
    features, prob, mask, target = random_case((5, 5), (10, 10), batch=4, channels=3, masked=True)
    prob[0] = 1.0  # no background weight
    prob[1] = 0.0  # no foreground weight
    mask[2] = False  # nothing feeds either prototype
    fg, bg = prototypes(features, prob, mask)
    assert bg[0].isnan().all() and not fg[0].isnan().any()
    assert fg[1].isnan().all() and not bg[1].isnan().any()
    assert fg[2].isnan().all() and bg[2].isnan().all()
    assert not (fg[3].isnan().any() or bg[3].isnan().any())
    assert prototype_map(features, prob, mask)[:3].isnan().all()
    for unit_wise in (False, True):
        scores = sa_score(features, prob, target, mask, unit_wise=unit_wise)
        assert scores[:3].isnan().all() and not scores[3].isnan().any()


def test_mask_excluding_all_foreground_is_nan():
    features, prob, _, target = blob_case((8, 8), (8, 8), batch=1)
    prob = (prob > 0.5).float()
    assert sa_score(features, prob, target, mask=prob < 0.5).isnan().all()


def test_batch_is_independent():
    features, prob, mask, target = random_case((4, 6, 5), (8, 9, 10), batch=3, masked=True)
    for unit_wise in (False, True):
        whole = sa_score(features, prob, target, mask, unit_wise=unit_wise)
        for b in range(3):
            alone = sa_score(features[b:b + 1], prob[b:b + 1], target[b:b + 1], mask[b:b + 1], unit_wise=unit_wise)
            torch.testing.assert_close(whole[b:b + 1], alone)


def test_unit_chunks_do_not_change_scores(monkeypatch):
    features, prob, mask, target = random_case((5, 6), (11, 13), batch=2, channels=7, masked=True)
    expected = sa_score(features, prob, target, mask, unit_wise=True)
    monkeypatch.setattr(protoseg, "UNIT_CHUNK_ELEMENTS", 1)  # one unit per chunk
    torch.testing.assert_close(sa_score(features, prob, target, mask, unit_wise=True), expected)


def test_unit_wise_equals_layer_wise_on_single_channels():
    features, prob, mask, target = random_case((6, 6), (9, 9), channels=4, masked=True)
    units = sa_score(features, prob, target, mask, unit_wise=True)
    for c in range(4):
        torch.testing.assert_close(units[:, c], sa_score(features[:, c:c + 1], prob, target, mask))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_computed_in_float32(dtype):
    features, prob, mask, target = random_case((6, 6), (12, 12), masked=True)
    features, prob = features.to(dtype), prob.to(dtype)
    expected_map = prototype_map(features.float(), prob.float(), mask)
    result = prototype_map(features, prob, mask)
    assert result.dtype == torch.float32
    torch.testing.assert_close(result, expected_map)
    scores = sa_score(features, prob, target, mask)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores, sa_score(features.float(), prob.float(), target, mask))


def test_float64_stays_float64_and_meta_tensors_are_plain():
    features, prob, mask, target = random_case((6, 6), (6, 6), dtype=torch.float64)
    assert prototype_map(features, prob).dtype == torch.float64
    result = sa_score(MetaTensor(features), MetaTensor(prob), MetaTensor(target), MetaTensor(mask if mask else prob > 2))
    assert type(result) is torch.Tensor


def test_gradients_are_not_needed():
    features, prob, _, target = random_case((6, 6), (6, 6))
    features.requires_grad_(True)
    assert not sa_score(features, prob, target).requires_grad


def test_input_image_separates_a_bright_blob():
    """Input-image ProtoSeg: a blob brighter than its background is segmented by intensity alone."""
    _, prob, _, target = blob_case((16, 16), (16, 16), batch=1)
    image = target.float() + 0.1 * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    assert sa_score(image, prob, target).item() > 0.95


def _bad(**changes):
    features, prob, mask, target = random_case((4, 4), (8, 8), masked=True)
    args = {"features": features, "prob": prob, "target": target, "mask": mask}
    args.update(changes)
    return args


BAD_INPUTS = [
    (_bad(features=torch.randn(3, 4, 4, 4)), "batch sizes differ: features has 3 images, prob has 2"),
    (_bad(features=torch.randn(5, 4)), r"features must have shape \(B, C, \*S_f\)"),
    (_bad(features=torch.randn(2, 3, 2, 2, 2, 2)), r"features must have shape \(B, C, \*S_f\)"),
    (_bad(features=torch.randn(2, 0, 4, 4)), r"features must have shape"),
    (_bad(prob=torch.rand(2, 8, 8)), r"prob must have shape \(B, 1, \*S\) with 2"),
    (_bad(prob=torch.rand(2, 2, 8, 8)), r"prob must have shape \(B, 1, \*S\)"),
    (_bad(prob=torch.rand(2, 1, 8, 8) * 2), r"prob must be a foreground probability in \[0, 1\]"),
    (_bad(prob=torch.full((2, 1, 8, 8), float("nan"))), r"prob must be a foreground probability"),
    (_bad(mask=torch.rand(2, 1, 8, 8)), "mask must be binary"),
    (_bad(mask=torch.ones(2, 1, 8, 9)), r"mask must have the shape of prob \(2, 1, 8, 8\)"),
    (_bad(mask=torch.ones(1, 1, 8, 8)), "batch sizes differ: features has 2 images, mask has 1"),
    (_bad(target=torch.rand(2, 1, 8, 8)), "target must be binary"),
    (_bad(target=torch.ones(3, 1, 8, 8)), "batch sizes differ: features has 2 images, target has 3"),
    (_bad(target=torch.ones(2, 1, 8)), r"target must have shape \(B, 1, \*S\)"),
    (_bad(features=torch.full((2, 4, 4, 4), float("nan"))), "features contain NaN or Inf"),
    (_bad(features=torch.full((2, 4, 4, 4), float("inf"))), "features contain NaN or Inf"),
    (_bad(features=torch.randn(2, 4, 4, 4).index_fill_(3, torch.tensor([1]), -float("inf"))),
     "features contain NaN or Inf"),
    (_bad(features=torch.randn(2, 4, 4, 4).index_fill_(1, torch.tensor([2]), float("nan"))),
     "features contain NaN or Inf"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_bad_input_names_the_argument(args, message):
    with pytest.raises(ValueError, match=message):
        sa_score(**args)
    if "target" not in message:
        with pytest.raises(ValueError, match=message):
            prototype_map(args["features"], args["prob"], args["mask"])


def test_non_tensor_input_is_a_type_error():
    with pytest.raises(TypeError, match="prob must be a torch.Tensor, got list"):
        prototypes(torch.rand(1, 2, 4), [[0.5] * 4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")
def test_cuda_matches_cpu():
    features, prob, mask, target = random_case((3, 6, 4), (7, 5, 9), masked=True, dtype=torch.float64)
    for unit_wise in (False, True):
        on_gpu = sa_score(features.cuda(), prob.cuda(), target.cuda(), mask.cuda(), unit_wise=unit_wise)
        assert on_gpu.device.type == "cuda"
        torch.testing.assert_close(on_gpu.cpu(), sa_score(features, prob, target, mask, unit_wise=unit_wise))
        gpu_map = prototype_map(features.cuda(), prob.cuda(), mask.cuda(), unit_wise=unit_wise)
        assert gpu_map.device.type == "cuda"
        torch.testing.assert_close(gpu_map.cpu(), prototype_map(features, prob, mask, unit_wise=unit_wise))
    with pytest.raises(ValueError, match="prob is on cpu but features are on cuda"):
        sa_score(features.cuda(), prob, target.cuda())


def test_resize_transpose_is_the_adjoint_of_resize():
    gen = torch.Generator().manual_seed(0)
    for feature_size, size in RESOLUTIONS:
        small = torch.randn(2, 3, *feature_size, generator=gen, dtype=torch.float64)
        weights = torch.randn(2, 3, *size, generator=gen, dtype=torch.float64)
        lhs = (protoseg._resize(small, size) * weights).sum()
        rhs = (small * protoseg._resize_transpose(weights, feature_size)).sum()
        torch.testing.assert_close(lhs, rhs)


def test_the_largest_finite_features_are_scored_as_in_float64():
    features, prob, _, target = random_case((4, 4), (8, 8))
    features[0, 0, :2] = torch.finfo(torch.float32).max  # their float32 mean and squares overflow, yet they are finite
    features[1, 1, :2] = -torch.finfo(torch.float32).max
    prepared, origin, scale = protoseg._prepare_features(features)
    assert prepared.abs().max() <= 4 and origin.isfinite().all() and scale.isfinite().all()
    torch.testing.assert_close(sa_score(features, prob, target), sa_score(features.double(), prob, target).float())


def test_resize_is_linear_interpolation():
    gen = torch.Generator().manual_seed(0)
    for feature_size, size in RESOLUTIONS:
        values = torch.randn(2, 3, *feature_size, generator=gen, dtype=torch.float64)[:, 1:]  # not contiguous
        mode = {1: "linear", 2: "bilinear", 3: "trilinear"}[len(size)]
        expected = torch.nn.functional.interpolate(values, size=size, mode=mode, align_corners=False)
        torch.testing.assert_close(protoseg._resize(values, size), expected, atol=1e-12, rtol=0)


def test_count_per_row():
    binary = torch.rand(3, 4, 50, generator=torch.Generator().manual_seed(0)) > 0.5
    assert torch.equal(protoseg._count(binary), binary.sum(-1))
    assert torch.equal(protoseg._count(binary[:, 1:]), binary[:, 1:].sum(-1))


def test_float32_maps_stay_within_1e_4_of_float64_at_128_cubed():
    """One float32 accumulator over 128^3 voxels put the map 7.9e-4 off on this case; block sums keep it ~3e-5."""
    n = 128
    gen = torch.Generator().manual_seed(0)
    prob = torch.zeros(1, 1, n, n, n)
    prob[..., n // 4:3 * n // 4, n // 4:3 * n // 4, n // 3:2 * n // 3] = 1
    prob = (0.8 * prob + 0.1 + 0.1 * torch.rand(1, 1, n, n, n, generator=gen)).clamp(0, 1)
    features = 10 * (torch.randn(1, 16, n, n, n, generator=gen) + prob)
    error = (prototype_map(features, prob).double() - prototype_map(features.double(), prob.double())).abs().max()
    assert error < 1e-4


def test_weighted_sums_are_exact_to_one_block():
    gen = torch.Generator().manual_seed(0)
    weights, features = torch.rand(2, 4, 300_000, generator=gen), 5 + torch.randn(2, 3, 300_000, generator=gen)
    exact = torch.bmm(weights.double(), features.double().transpose(1, 2))
    blocked = protoseg._weighted_sums(weights, features)
    plain = torch.bmm(weights, features.transpose(1, 2)).double()
    assert (blocked - exact).abs().max() < (plain - exact).abs().max() / 5


def test_the_binary_map_is_the_one_sa_score_scores_even_where_p_rounds_to_one_half():
    gen = torch.Generator().manual_seed(0)
    prob = torch.zeros(1, 1, 16, 16)
    prob[..., 4:12, 4:12] = 1
    # features whose two prototypes are 1e-5 apart: logits ~1e-10, where sigmoid rounds to exactly 0.5 in float32
    features = 1e-5 * (prob + 0.5 * torch.rand(1, 1, 16, 16, generator=gen)) + 1
    binary = prototype_map(features, prob, binary=True)
    soft = prototype_map(features, prob)
    assert binary.dtype == torch.bool and binary.any()
    assert (soft == 0.5).any() and not torch.equal(binary, soft > 0.5)
    for target in (binary, prob > 0.5, torch.rand(1, 1, 16, 16, generator=gen) > 0.5):
        dice = 2 * (binary & target).sum() / (binary.sum() + target.sum())
        torch.testing.assert_close(sa_score(features, prob, target), dice.reshape(1))
    assert (prototype_map(features, prob, binary=True, unit_wise=True) == binary).all()  # one channel: the same


@pytest.mark.parametrize("masked", [False, True])
def test_binary_guide_weights_the_prototypes_by_the_binarised_prediction(masked):
    features, prob, mask, target = random_case((4, 5), (8, 10), masked=masked, dtype=torch.float64)
    binarised = (prob > 0.5).double()
    for fn in (prototype_map, lambda *args, **kw: prototypes(*args, **kw)[0]):
        torch.testing.assert_close(fn(features, prob, mask, guide="binary"), fn(features, binarised, mask))
    torch.testing.assert_close(sa_score(features, prob, target, mask, guide="binary"),
                               naive_sa_score(features, binarised, target, mask), equal_nan=True)
    assert not torch.equal(sa_score(features, prob, target, mask, guide="binary"), sa_score(features, prob, target, mask))
    with pytest.raises(ValueError, match=r"guide must be one of \('soft', 'binary'\), got 'hard'"):
        sa_score(features, prob, target, guide="hard")
