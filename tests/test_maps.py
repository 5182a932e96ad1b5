"""Prototype-map snapshots: slice choice, SA in the titles, .npz round trip and its errors, figures, tiles."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from monai_protoseg import prototype_map
from monai_protoseg.maps import (
    SNAPSHOT_VERSION,
    MapSnapshot,
    plot_prototype_maps,
    read_snapshot,
    save_snapshot,
    take_snapshot,
    tile_snapshot,
)
from tests.naive_protoseg import naive_dice


def blobs(size: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """A two-channel image, its soft foreground probability (a smoothed random blob mask) and two layers' maps."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.rand(1, 1, *size, generator=gen)
    pool = torch.nn.functional.avg_pool2d if len(size) == 2 else torch.nn.functional.avg_pool3d
    smooth = pool(noise, 3, stride=1, padding=1, count_include_pad=False)[0, 0]
    prob = torch.sigmoid(40 * (smooth - smooth.median()))
    image = torch.stack([prob + 0.1 * torch.randn(size, generator=gen), torch.randn(size, generator=gen)])
    coarse = torch.rand(1, 4, *(n // 2 for n in size), generator=gen)  # a layer at half resolution
    maps = {
        "model.0": prototype_map(image[None], prob[None, None])[0, 0],
        "model.1.submodule": prototype_map(coarse, prob[None, None])[0, 0],
    }
    return image, prob, maps


def test_2d_snapshot_keeps_the_case_and_scores_sa_against_the_label():
    image, prob, maps = blobs((24, 20))
    label = prob > 0.6
    snapshot = take_snapshot(image, prob, maps, label, case="case_7", class_name="tumour")
    assert snapshot.slice_index is None and snapshot.spatial_shape == (24, 20) and snapshot.reference == "label"
    assert snapshot.layers == ("model.0", "model.1.submodule")
    np.testing.assert_array_equal(snapshot.image, image.numpy())
    np.testing.assert_array_equal(snapshot.prob, prob.numpy())
    np.testing.assert_array_equal(snapshot.label, label.numpy())
    np.testing.assert_array_equal(snapshot.maps, torch.stack(list(maps.values())).numpy())
    expected = [naive_dice(value > 0.5, label) for value in maps.values()]
    np.testing.assert_allclose(snapshot.sa, expected, rtol=0, atol=1e-12)
    assert 0 < snapshot.sa.min() and snapshot.sa.max() <= 1


def test_3d_slice_is_the_one_with_the_most_label_foreground():
    image, prob, maps = blobs((12, 10, 9))
    label = torch.zeros(12, 10, 9, dtype=torch.bool)
    label[2:6, 3:8, 2] = True   # 20 voxels
    label[5:11, 1:9, 6] = True  # 48 voxels: the most
    label[0:4, 0:4, 7] = True   # 16 voxels
    per_slice = label.numpy().sum(axis=(0, 1))
    snapshot = take_snapshot(image, prob, maps, label)
    assert snapshot.slice_index == int(np.argmax(per_slice)) == 6
    assert snapshot.spatial_shape == (12, 10, 9)
    np.testing.assert_array_equal(snapshot.image, image[..., 6].numpy())
    np.testing.assert_array_equal(snapshot.label, label[..., 6].numpy())
    np.testing.assert_array_equal(snapshot.maps, torch.stack([m[..., 6] for m in maps.values()]).numpy())
    expected = [naive_dice(value > 0.5, label) for value in maps.values()]  # SA over the whole volume
    np.testing.assert_allclose(snapshot.sa, expected, rtol=0, atol=1e-12)


def test_3d_slice_without_label_follows_the_prediction_and_a_given_index_wins():
    image, prob, maps = blobs((12, 10, 9), seed=3)
    prediction = prob > 0.5
    snapshot = take_snapshot(image, prob, maps)
    assert snapshot.label is None and snapshot.reference == "prediction"
    assert snapshot.slice_index == int(np.argmax(prediction.numpy().sum(axis=(0, 1))))
    np.testing.assert_allclose(snapshot.sa, [naive_dice(m > 0.5, prediction) for m in maps.values()], atol=1e-12)
    own = torch.zeros_like(prediction)
    own[..., 3] = True  # an explicit (e.g. argmax) prediction is the reference
    assert take_snapshot(image, prob, maps, prediction=own).slice_index == 3
    empty = torch.zeros_like(prediction)
    assert take_snapshot(image, prob, maps, empty, prediction=own).slice_index == 3  # empty label: the prediction
    assert take_snapshot(image, prob, maps, empty, prediction=empty).slice_index == 9 // 2  # nothing: the middle
    assert math.isnan(take_snapshot(image, prob, maps, empty).sa[0])  # empty reference: undefined SA
    assert take_snapshot(image, prob, maps, slice_index=-1).slice_index == 8


@pytest.mark.parametrize("with_label, size", [(True, (16, 12)), (False, (8, 6, 5))])
def test_save_and_read_round_trip_is_exact(tmp_path, with_label, size):
    image, prob, maps = blobs(size)
    maps["model.0"][0, 0] = float("nan")
    snapshot = take_snapshot(image, prob, maps, prob > 0.5 if with_label else None, case="BRATS_001", class_name="WT")
    path = save_snapshot(tmp_path / "maps" / "BRATS_001_WT.npz", snapshot)
    assert [p.name for p in path.parent.iterdir()] == ["BRATS_001_WT.npz"]  # no temporary file left
    read = read_snapshot(path)
    for field in ("case", "class_name", "layers", "reference", "spatial_shape", "slice_index"):
        assert getattr(read, field) == getattr(snapshot, field), field
    for field in ("image", "prob", "label", "maps", "sa"):
        original, restored = getattr(snapshot, field), getattr(read, field)
        if original is None:
            assert restored is None
        else:
            assert restored.dtype == original.dtype and np.array_equal(restored, original, equal_nan=True), field


def test_unreadable_files_are_errors_naming_them(tmp_path):
    image, prob, maps = blobs((8, 8))
    good = save_snapshot(tmp_path / "good.npz", take_snapshot(image, prob, maps))
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        read_snapshot(tmp_path / "missing.npz")
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match=f"{corrupt} is not a readable prototype-map snapshot"):
        read_snapshot(corrupt)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match=f"{garbage} is not a readable"):
        read_snapshot(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, values=np.zeros(3))
    with pytest.raises(ValueError, match=f"{other} is not a prototype-map snapshot \\(no format field"):
        read_snapshot(other)
    with np.load(good) as data:
        fields = dict(data)
    np.savez(tmp_path / "newer.npz", **{**fields, "version": np.array(SNAPSHOT_VERSION + 1)})
    with pytest.raises(ValueError, match=f"newer.npz: snapshot format version {SNAPSHOT_VERSION + 1}"):
        read_snapshot(tmp_path / "newer.npz")
    np.savez(tmp_path / "bad_shape.npz", **{**fields, "maps": np.zeros((3, 8, 8), np.float32)})
    with pytest.raises(ValueError, match=r"bad_shape.npz: invalid MapSnapshot .*maps must be \(2, 8, 8\)"):
        read_snapshot(tmp_path / "bad_shape.npz")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"image": torch.zeros(1, 8, 9)}, r"image must be \(C, \*\(8, 8\)\)"),
        ({"prob": torch.full((8, 8), 2.0)}, r"prob must be a foreground probability in \[0, 1\]"),
        ({"label": torch.full((8, 8), 2.0)}, "label must be binary"),
        ({"label": torch.zeros(8, 7)}, r"label must have prob's shape \(8, 8\)"),
        ({"maps": {}}, "maps is empty"),
        ({"maps": {"model.0": torch.zeros(4, 4)}}, r"the map of layer 'model.0' has shape \(4, 4\)"),
        ({"slice_index": 2}, "slice_index is for 3D cases"),
        ({"prob": torch.zeros(8)}, "needs a 2D or 3D case"),
    ],
)
def test_bad_input_is_a_clear_error(change, message):
    image, prob, maps = blobs((8, 8))
    arguments = {"image": image, "prob": prob, "maps": maps, **change}
    with pytest.raises(ValueError, match=message):
        take_snapshot(**arguments)


def test_3d_slice_index_out_of_range_is_named():
    image, prob, maps = blobs((8, 8, 4))
    with pytest.raises(ValueError, match="slice_index 4 is out of range for 4 slices"):
        take_snapshot(image, prob, maps, slice_index=4)


def test_figure_has_a_row_per_case_and_a_panel_per_layer():
    image, prob, maps = blobs((16, 16))
    with_label = take_snapshot(image, prob, maps, prob > 0.5, case="a")
    undefined = take_snapshot(image, prob, {"model.0": torch.full((16, 16), float("nan"))}, case="b")
    figure = plot_prototype_maps([with_label, undefined])
    panels, colorbars = 2 * (3 + 2), 1
    assert len(figure.axes) == panels + colorbars
    titles = [axis.get_title() for axis in figure.axes]
    assert f"model.0\nSA {with_label.sa[0]:.3f}" in titles and "model.0\nSA undefined vs pred" in titles
    assert not figure.axes[2 * 5 - 1].axison  # the second row has one layer: its last panel is hidden
    figure.savefig(__import__("io").BytesIO(), format="png")  # renders
    assert len(plot_prototype_maps(with_label).axes) == 3 + 2 + 1
    with pytest.raises(ValueError, match="at least one snapshot"):
        plot_prototype_maps([])


def test_tile_puts_the_panels_side_by_side():
    image, prob, maps = blobs((10, 6))
    snapshot = take_snapshot(image, prob, maps, prob > 0.5)
    tile = tile_snapshot(snapshot, gap=1)
    assert tile.shape == (1, 10, 5 * 6 + 4) and tile.dtype == np.float32
    assert tile.min() >= 0 and tile.max() <= 1
    panels = [tile[0, :, i * 7:i * 7 + 6] for i in range(5)]
    first = image[0].numpy()
    np.testing.assert_allclose(panels[0], (first - first.min()) / (first.max() - first.min()), atol=1e-6)
    np.testing.assert_array_equal(panels[1], snapshot.label)
    np.testing.assert_array_equal(panels[2], snapshot.prob)
    np.testing.assert_array_equal(np.stack(panels[3:]), snapshot.maps)
    np.testing.assert_array_equal(tile[0, :, 6], 1)  # separator


def test_snapshot_checks_its_own_consistency():
    with pytest.raises(ValueError, match="a 2D case has no slice index"):
        MapSnapshot("a", "k", ("l",), np.zeros((1, 4, 4)), np.zeros((4, 4)), None, np.zeros((1, 4, 4)), np.zeros(1),
                    "label", (4, 4), 2)
