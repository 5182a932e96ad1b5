"""Lesion masks from maps: Otsu, thresholds, opening/closing, largest connected component, COIN's cleaning.

Each is checked against a plain numpy/Python oracle written here: a brute-force Otsu over every split of the
histogram, morphology by explicit neighbourhoods with the documented border rule, and breadth-first flood fill for
the connected components.
"""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
import torch

from monai_protoseg.weak.masks import (
    clean_mask,
    closing,
    largest_connected_component,
    opening,
    otsu_threshold,
    threshold_maps,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# ---------------------------------------------------------------- oracles


def brute_force_otsu(values: np.ndarray, bins: int) -> tuple[float, float, np.ndarray]:
    """Threshold, bin width and the between-class variance of every split (after bin k, k = 0 .. bins - 2).

    Histogram of ``bins`` equal bins over [min, max] (np.histogram), bin centres as class values; every split
    between two bins is tried and the one with the largest ``w0 * w1 * (m0 - m1) ** 2`` wins (the first if equal);
    the threshold is the edge between the two bins (foreground: above it).
    """
    values = values.astype(np.float64).ravel()
    counts, edges = np.histogram(values, bins=bins, range=(values.min(), values.max()))
    centres = (edges[:-1] + edges[1:]) / 2
    prob = counts / counts.sum()
    variances = []
    for k in range(bins - 1):
        w0, w1 = prob[: k + 1].sum(), prob[k + 1 :].sum()
        if w0 == 0 or w1 == 0:
            variances.append(-1.0)
            continue
        m0 = (prob[: k + 1] * centres[: k + 1]).sum() / w0
        m1 = (prob[k + 1 :] * centres[k + 1 :]).sum() / w1
        variances.append(w0 * w1 * (m0 - m1) ** 2)
    best = int(np.argmax(variances))
    return float(edges[best + 1]), float(edges[1] - edges[0]), np.asarray(variances)


def neighbour_offsets(spatial_dims: int, connectivity: int) -> list[tuple[int, ...]]:
    """Offsets in {-1, 0, 1}^n, not all zero, with at most ``connectivity`` non-zero entries."""
    return [
        offset
        for offset in itertools.product((-1, 0, 1), repeat=spatial_dims)
        if 0 < sum(o != 0 for o in offset) <= connectivity
    ]


def flood_fill_labels(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """Connected components by breadth-first search; labels 1, 2, ... in raster order of each component's first
    voxel (0: background)."""
    labels = np.zeros(mask.shape, dtype=np.int64)
    offsets = neighbour_offsets(mask.ndim, connectivity)
    current = 0
    for start in np.ndindex(mask.shape):
        if not mask[start] or labels[start]:
            continue
        current += 1
        labels[start] = current
        queue = collections.deque([start])
        while queue:
            voxel = queue.popleft()
            for offset in offsets:
                neighbour = tuple(v + o for v, o in zip(voxel, offset))
                inside = all(0 <= n < size for n, size in zip(neighbour, mask.shape))
                if inside and mask[neighbour] and not labels[neighbour]:
                    labels[neighbour] = current
                    queue.append(neighbour)
    return labels


def oracle_largest_component(mask: np.ndarray, connectivity: int) -> np.ndarray:
    """The largest flood-filled component; of equal sizes the smallest label (first in raster order)."""
    labels = flood_fill_labels(mask, connectivity)
    if labels.max() == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = [(labels == label).sum() for label in range(1, labels.max() + 1)]
    return labels == 1 + int(np.argmax(sizes))


def oracle_morphology(mask: np.ndarray, size: int, operation: str) -> np.ndarray:
    """Opening or closing by a cube of edge ``size``, by explicit neighbourhoods and the documented border rule.

    opening: p stays when some cube centred on an image voxel q (p in it) fits in the mask, voxels beyond the
    border counting as foreground. closing: p is set when every cube containing p, centred anywhere (also beyond
    the border), holds a mask voxel.
    """
    radius = size // 2
    cube = [np.asarray(o) for o in itertools.product(range(-radius, radius + 1), repeat=mask.ndim)]
    shape = np.asarray(mask.shape)

    def inside(point: np.ndarray) -> bool:
        return bool(np.all(point >= 0) and np.all(point < shape))

    def fits(centre: np.ndarray) -> bool:
        return all(not inside(centre + o) or mask[tuple(centre + o)] for o in cube)

    def touches(centre: np.ndarray) -> bool:
        return any(inside(centre + o) and mask[tuple(centre + o)] for o in cube)

    result = np.zeros(mask.shape, dtype=bool)
    for voxel in np.ndindex(mask.shape):
        p = np.asarray(voxel)
        if operation == "opening":
            result[voxel] = any(inside(p + o) and fits(p + o) for o in cube)
        else:
            result[voxel] = all(touches(p + o) for o in cube)
    return result


def random_mask(shape: tuple[int, ...], density: float, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random(shape) < density


def as_batch(*cases: np.ndarray, device: str = "cpu") -> torch.Tensor:
    """``(B, 1, *S)`` bool tensor of the cases."""
    return torch.as_tensor(np.stack(cases)[:, None], device=device)


# ---------------------------------------------------------------- Otsu


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("bins", [16, 256])
def test_otsu_matches_brute_force_on_random_data(seed, bins):
    rng = np.random.default_rng(seed)
    maps = np.stack([rng.random((20, 20)), rng.normal(size=(20, 20)) ** 2, rng.exponential(size=(20, 20))])
    thresholds = otsu_threshold(torch.as_tensor(maps), bins=bins).numpy()
    assert thresholds.shape == (3,)
    for case, threshold in zip(maps, thresholds):
        expected, width, variances = brute_force_otsu(case, bins)
        assert abs(threshold - expected) <= width * (1 + 1e-9)
        # the chosen split maximises the between-class variance
        split = int(round((threshold - case.min()) / width)) - 1
        assert variances[split] == pytest.approx(variances.max(), rel=1e-9)
        # the masks differ only by values within one bin width of the threshold
        differ = (case > threshold) != (case > expected)
        assert np.all(np.abs(case[differ] - expected) <= width * (1 + 1e-9))


@pytest.mark.parametrize("seed", range(3))
def test_otsu_splits_bimodal_data_between_the_modes(seed):
    rng = np.random.default_rng(seed)
    lesion = rng.random((2, 1, 24, 24)) < 0.3
    maps = np.where(lesion, rng.normal(0.8, 0.04, lesion.shape), rng.normal(0.2, 0.04, lesion.shape))
    maps[1] = maps[1] * 10 - 3  # another range in the second case
    thresholds = otsu_threshold(torch.as_tensor(maps))
    for case, threshold in zip(maps, thresholds.numpy()):
        expected, width, variances = brute_force_otsu(case, 256)
        # any split in the empty gap between the modes has the same (largest) between-class variance
        split = int(round((threshold - case.min()) / width)) - 1
        assert variances[split] == pytest.approx(variances.max(), rel=1e-9)
        np.testing.assert_array_equal(case > threshold, case > expected)
    np.testing.assert_array_equal(threshold_maps(torch.as_tensor(maps)).numpy(), lesion)


def test_otsu_threshold_is_an_upper_bin_edge_and_foreground_is_strictly_above():
    maps = torch.tensor([[0.0, 0.0, 1.0, 3.0, 4.0, 4.0]])
    threshold = otsu_threshold(maps, bins=4)  # bins of width 1: [0, 1], (1, 2], (2, 3], (3, 4]
    assert threshold.tolist() == [1.0]
    assert (maps > threshold).tolist() == [[False, False, False, True, True, True]]


def test_otsu_of_a_constant_case_is_its_value_and_gives_an_empty_mask():
    maps = torch.stack([torch.full((1, 4, 4), 0.7), torch.linspace(0, 1, 16).reshape(1, 4, 4)])
    threshold = otsu_threshold(maps)
    assert threshold[0].item() == pytest.approx(0.7)
    mask = threshold_maps(maps)
    assert not mask[0].any() and mask[1].any()


def test_otsu_dtypes_and_batch_independence():
    rng = np.random.default_rng(0)
    maps = torch.as_tensor(rng.random((3, 1, 8, 8)), dtype=torch.float32)
    together = otsu_threshold(maps)
    assert together.dtype == torch.float32
    alone = torch.cat([otsu_threshold(maps[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone)
    integers = otsu_threshold(torch.tensor([[0, 0, 0, 9, 9, 10]]))
    assert integers.dtype == torch.float32 and 0 <= integers.item() < 9


# ---------------------------------------------------------------- thresholds


def test_threshold_maps_fixed_threshold_is_strict():
    maps = torch.tensor([[[[0.2, 0.5], [0.51, 1.0]]]])
    mask = threshold_maps(maps, 0.5)
    assert mask.dtype == torch.bool and mask.shape == maps.shape
    assert mask.tolist() == [[[[False, False], [True, True]]]]
    assert threshold_maps(maps, 0).all()
    assert torch.equal(threshold_maps(maps, np.float32(0.5)), mask)


@pytest.mark.parametrize("spatial", [(30,), (12, 10), (6, 5, 4)])
def test_threshold_maps_otsu_per_case_in_1d_2d_3d(spatial):
    rng = np.random.default_rng(1)
    maps = torch.as_tensor(rng.random((2, 1, *spatial)))
    maps[1] = maps[1] * 0.1  # another range: one threshold for both would empty the second case
    mask = threshold_maps(maps, "otsu")
    expected = maps > otsu_threshold(maps).reshape(-1, *[1] * (maps.ndim - 1))
    assert torch.equal(mask, expected)
    assert mask[1].any() and not mask[1].all()


# ---------------------------------------------------------------- opening and closing


@pytest.mark.parametrize("operation", ["opening", "closing"])
@pytest.mark.parametrize(
    ("shape", "size", "seed"),
    [((17,), 3, 0), ((17,), 5, 1), ((9, 8), 3, 2), ((9, 8), 5, 3), ((8, 7), 3, 4), ((5, 6, 4), 3, 5)],
)
def test_opening_closing_match_the_explicit_neighbourhood_oracle(operation, shape, size, seed):
    cases = [random_mask(shape, density, seed + i) for i, density in enumerate((0.4, 0.7))]
    function = opening if operation == "opening" else closing
    result = function(as_batch(*cases), size)
    assert result.dtype == torch.bool and result.shape == (2, 1, *shape)
    for case, out in zip(cases, result[:, 0].numpy()):
        np.testing.assert_array_equal(out, oracle_morphology(case, size, operation))


@pytest.mark.parametrize("seed", range(3))
def test_opening_within_mask_within_closing(seed):
    mask = as_batch(random_mask((12, 11), 0.5, seed), random_mask((12, 11), 0.3, seed + 10))
    for size in (3, 5):
        opened, closed = opening(mask, size), closing(mask, size)
        assert not (opened & ~mask).any() and not (mask & ~closed).any()
        assert torch.equal(opening(opened, size), opened) and torch.equal(closing(closed, size), closed)  # idempotent
    assert torch.equal(opening(mask, 1), mask) and torch.equal(closing(mask, 1), mask)


def test_border_lesions_survive_opening_and_closing_never_joins_a_lesion_to_the_border():
    mask = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    mask[0, 0, :2, 3:7] = True  # 2 rows thick, cut by the top border: the 3x3 cube fits if it may stick out
    mask[0, 0, 7:, 7:] = True  # a 3x3 lesion cut by a corner
    assert torch.equal(opening(mask, 3), mask)
    artefacts = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    artefacts[0, 0, 9, :5] = True  # a one-pixel line along the border
    artefacts[0, 0, 0, 9] = True  # a corner speckle
    assert not opening(artefacts, 3).any()
    blob = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    blob[0, 0, 1:5, 1:5] = True  # one voxel off the border
    assert torch.equal(closing(blob, 3), blob)
    assert torch.equal(closing(blob, 5), blob)
    notch = torch.zeros(1, 1, 6, 6, dtype=torch.bool)
    notch[0, 0, :3, :] = True
    notch[0, 0, 0, 2] = False  # a one-pixel notch open to the border
    closed = closing(notch, 3)
    assert closed[0, 0, 0, 2] and closed.sum() == notch.sum() + 1


def test_opening_removes_a_speckle_and_closing_fills_a_hole_in_3d():
    mask = torch.zeros(1, 1, 9, 9, 9, dtype=torch.bool)
    mask[0, 0, 2:7, 2:7, 2:7] = True
    mask[0, 0, 0, 8, 0] = True  # a speckle in a corner
    mask[0, 0, 8, 4, 4] = True  # a speckle on a face
    expected = mask.clone()
    expected[0, 0, 0, 8, 0] = expected[0, 0, 8, 4, 4] = False
    assert torch.equal(opening(mask, 3), expected)
    expected[0, 0, 4, 4, 4] = False  # a hole
    closed = closing(expected, 3)
    assert closed[0, 0, 4, 4, 4] and closed.sum() == expected.sum() + 1


def test_morphology_accepts_0_1_masks():
    mask = torch.zeros(1, 1, 6, 6)
    mask[0, 0, 1:4, 1:4] = 1
    assert torch.equal(opening(mask), mask.bool())
    assert torch.equal(closing(mask.long()), mask.bool())


# ---------------------------------------------------------------- largest connected component


@pytest.mark.parametrize("connectivity", [1, 2, None])
@pytest.mark.parametrize("density", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", range(3))
def test_largest_component_matches_flood_fill_2d(connectivity, density, seed):
    cases = [random_mask((16, 13), density, seed * 7 + i) for i in range(3)]
    result = largest_connected_component(as_batch(*cases), connectivity)
    assert result.dtype == torch.bool and result.shape == (3, 1, 16, 13)
    for case, out in zip(cases, result[:, 0].numpy()):
        np.testing.assert_array_equal(out, oracle_largest_component(case, connectivity or 2))


@pytest.mark.parametrize("connectivity", [1, 2, 3])
@pytest.mark.parametrize("density", [0.25, 0.45])
@pytest.mark.parametrize("seed", range(2))
def test_largest_component_matches_flood_fill_3d(connectivity, density, seed):
    cases = [random_mask((7, 6, 8), density, seed * 5 + i) for i in range(2)]
    result = largest_connected_component(as_batch(*cases), connectivity)
    for case, out in zip(cases, result[:, 0].numpy()):
        np.testing.assert_array_equal(out, oracle_largest_component(case, connectivity))


@pytest.mark.parametrize("seed", range(3))
def test_largest_component_matches_flood_fill_1d(seed):
    cases = [random_mask((40,), 0.6, seed * 3 + i) for i in range(3)]
    result = largest_connected_component(as_batch(*cases))
    for case, out in zip(cases, result[:, 0].numpy()):
        np.testing.assert_array_equal(out, oracle_largest_component(case, 1))


def test_largest_component_of_a_long_winding_path():
    # a serpentine one voxel wide (rows joined at alternating ends): a path through all 113 voxels
    case = np.zeros((15, 17), dtype=bool)
    case[::2, :15] = True
    for row in range(1, 15, 2):
        case[row, 14 if row % 4 == 1 else 0] = True
    serpentine = case.copy()
    case[5, 16] = case[9, 16] = True  # speckles beyond an empty column
    mask = as_batch(case)
    np.testing.assert_array_equal(largest_connected_component(mask, 1)[0, 0].numpy(), serpentine)
    np.testing.assert_array_equal(largest_connected_component(mask)[0, 0].numpy(), serpentine)


def test_empty_and_full_masks():
    empty, full = np.zeros((5, 6), dtype=bool), np.ones((5, 6), dtype=bool)
    result = largest_connected_component(as_batch(empty, full, empty), 1)
    assert not result[0].any() and result[1].all() and not result[2].any()
    full_3d = torch.ones(2, 1, 4, 4, 4, dtype=torch.bool)
    assert largest_connected_component(full_3d, 1).all()


def test_ties_keep_the_component_first_in_raster_order():
    case = np.zeros((6, 6), dtype=bool)
    case[4:6, 0:2] = True  # 4 voxels, first voxel (4, 0)
    case[0:2, 4:6] = True  # 4 voxels, first voxel (0, 4): first in raster order
    case[3, 3] = True  # 1 voxel
    result = largest_connected_component(as_batch(case), 1)[0, 0].numpy()
    expected = np.zeros_like(case)
    expected[0:2, 4:6] = True
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_array_equal(result, oracle_largest_component(case, 1))
    # the same tie in 3D along the first axis
    volume = np.zeros((4, 3, 3), dtype=bool)
    volume[3, 0, 0] = volume[3, 0, 1] = True
    volume[0, 2, 1] = volume[0, 2, 2] = True
    out = largest_connected_component(as_batch(volume))[0, 0].numpy()
    np.testing.assert_array_equal(out, oracle_largest_component(volume, 3))
    assert out[0, 2, 1] and not out[3, 0, 0]


def test_diagonal_connections_depend_on_connectivity():
    case = np.zeros((5, 5), dtype=bool)
    case[0, 0] = case[1, 1] = case[2, 2] = True  # diagonal only: one component of 3 with 8 neighbours
    case[4, 0] = case[4, 1] = True  # 2 voxels joined by a face
    faces = largest_connected_component(as_batch(case), 1)[0, 0].numpy()
    assert faces.sum() == 2 and faces[4, 0] and faces[4, 1]
    full = largest_connected_component(as_batch(case), None)[0, 0].numpy()
    assert full.sum() == 3 and full[0, 0] and full[2, 2]
    volume = np.zeros((4, 4, 4), dtype=bool)
    volume[0, 0, 0] = volume[1, 1, 0] = True  # an edge neighbour (2 axes)
    volume[2, 2, 1] = True  # a corner neighbour of (1, 1, 0) (3 axes)
    volume[0, 3, 3] = volume[1, 3, 3] = True  # a face pair, apart
    sizes = {c: largest_connected_component(as_batch(volume), c).sum().item() for c in (1, 2, 3)}
    assert sizes == {1: 2, 2: 2, 3: 3}
    assert largest_connected_component(as_batch(volume), 2)[0, 0, 0, 0, 0]  # edge pair first in raster order


def test_components_touching_the_border_and_batch_cases_are_independent():
    first = np.zeros((8, 8), dtype=bool)
    first[:, 0] = True  # along the left border: 8 voxels
    first[0, 2:7] = True  # along the top, apart: 5 voxels
    second = np.zeros((8, 8), dtype=bool)
    second[7, :] = True  # the bottom row
    second[0:3, 7] = True  # the right column, apart
    together = largest_connected_component(as_batch(first, second), 1)
    for index, case in enumerate((first, second)):
        alone = largest_connected_component(as_batch(case), 1)
        assert torch.equal(together[index : index + 1], alone)
        np.testing.assert_array_equal(alone[0, 0].numpy(), oracle_largest_component(case, 1))
    # no component crosses from the last row of one case to the first row of the next
    stacked = np.zeros((2, 4, 4), dtype=bool)
    stacked[0, 3, :] = True
    stacked[1, 0, :] = True
    stacked[1, 1, 0] = True
    result = largest_connected_component(as_batch(*stacked), 1)
    assert result[0].sum() == 4 and result[1].sum() == 5


@pytest.mark.parametrize("device", DEVICES)
def test_largest_component_on_the_masks_device(device):
    cases = [random_mask((10, 9), 0.5, 3), random_mask((10, 9), 0.6, 4)]
    result = largest_connected_component(as_batch(*cases, device=device), 1)
    assert result.device.type == device
    for case, out in zip(cases, result[:, 0].cpu().numpy()):
        np.testing.assert_array_equal(out, oracle_largest_component(case, 1))
    maps = torch.rand(2, 1, 6, 6, 6, device=device)
    assert otsu_threshold(maps).device.type == device
    assert clean_mask(threshold_maps(maps)).device.type == device


# ---------------------------------------------------------------- clean_mask


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_clean_mask_removes_a_speckle_and_keeps_a_blob(spatial_dims):
    shape = (12,) * spatial_dims
    mask = torch.zeros(2, 1, *shape, dtype=torch.bool)
    mask[(0, 0) + (slice(2, 8),) * spatial_dims] = True  # a 6-wide cube blob
    mask[(0, 0) + (10,) * spatial_dims] = True  # a speckle
    mask[(1, 0) + (slice(0, 4),) * spatial_dims] = True  # second case: a blob at the corner
    mask[(1, 0) + (slice(7, 12),) * spatial_dims] = True  # and a bigger one at the far corner
    cleaned = clean_mask(mask)
    expected = mask.clone()
    expected[(0, 0) + (10,) * spatial_dims] = False
    expected[(1, 0) + (slice(0, 4),) * spatial_dims] = False
    assert torch.equal(cleaned, expected)


def test_clean_mask_is_opening_then_closing_then_largest_component_with_skippable_steps():
    rng = np.random.default_rng(4)
    mask = torch.as_tensor(rng.random((2, 1, 20, 20)) < 0.55)
    assert torch.equal(clean_mask(mask, 3, 5), largest_connected_component(closing(opening(mask, 3), 5)))
    assert torch.equal(clean_mask(mask, 3, 3, largest_component=False), closing(opening(mask, 3), 3))
    assert torch.equal(clean_mask(mask, 1, 3), largest_connected_component(closing(mask, 3)))
    assert torch.equal(clean_mask(mask, 1, 1, largest_component=False), mask)


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: threshold_maps(torch.rand(4, 4), 0.5), r"maps must have shape \(B, 1, \*S\).*\(4, 4\)"),
        (lambda: threshold_maps(torch.rand(1, 2, 4, 4), 0.5), r"maps must have shape.*\(1, 2, 4, 4\)"),
        (lambda: threshold_maps(torch.rand(1, 1, 2, 2, 2, 2), 0.5), r"ndim 3 to 5.*\(1, 1, 2, 2, 2, 2\)"),
        (lambda: threshold_maps(torch.rand(1, 1, 4), "mean"), r"threshold must be 'otsu' or a number.*'mean'"),
        (lambda: threshold_maps(torch.rand(1, 1, 4), True), r"threshold must be 'otsu' or a number.*True"),
        (lambda: threshold_maps(torch.rand(1, 1, 4), float("nan")), r"threshold must be.*nan"),
        (lambda: otsu_threshold(torch.rand(4)), r"maps must be a \(B, \.\.\.\) tensor.*\(4,\)"),
        (lambda: otsu_threshold(torch.rand(2, 0)), r"at least one value per case.*\(2, 0\)"),
        (lambda: otsu_threshold(torch.rand(2, 4), bins=1), r"bins must be an int >= 2, got 1"),
        (lambda: otsu_threshold(torch.tensor([[0.0, float("nan")]])), r"maps must be finite"),
        (lambda: opening(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 2), r"size must be an odd int >= 1, got 2"),
        (lambda: closing(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 0), r"size must be an odd int >= 1, got 0"),
        (lambda: opening(torch.full((1, 1, 4, 4), 0.5)), r"mask must be bool or hold only 0 and 1.*float32"),
        (lambda: opening(torch.zeros(4, 4, dtype=torch.bool)), r"mask must have shape.*\(4, 4\)"),
        (lambda: opening(np.zeros((1, 1, 4, 4), dtype=bool)), r"mask must be a torch.Tensor, got ndarray"),
        (lambda: largest_connected_component(torch.zeros(1, 1, 4, 4, dtype=torch.bool), 3), r"connectivity.*\(2\).*3"),
        (lambda: largest_connected_component(torch.zeros(1, 1, 4, dtype=torch.bool), 0), r"connectivity.*got 0"),
        (lambda: largest_connected_component(torch.zeros(1, 3, 4, 4, dtype=torch.bool)), r"mask must have shape"),
        (lambda: largest_connected_component(torch.zeros(0, 1, 4, 4, dtype=torch.bool)), r"must not be empty"),
        (lambda: clean_mask(torch.zeros(1, 1, 4, 4, dtype=torch.bool), open_size=4), r"open_size must be an odd"),
        (lambda: clean_mask(torch.zeros(1, 1, 4, 4, dtype=torch.bool), close_size=-1), r"close_size must be an odd"),
    ],
)
def test_bad_inputs_raise_value_errors_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()
