"""PrototypeMapSaver writes each probed layer's prototype map as NIfTI in the original image's space: an input with an
oblique, non-RAS affine and anisotropic spacing, ``Orientationd`` + ``Spacingd`` + ``DivisiblePadd`` before the
network and ``Invertd`` after. Read back with nibabel, a map lies on the input's grid and affine, beside the
prediction, and holds the naive prototype map of the network's grid resampled to the input's voxels."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    DivisiblePadd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    SaveImaged,
    Spacingd,
)
from scipy.ndimage import map_coordinates

from monai_protoseg.handlers import PrototypeMapSaver, map_postfix
from tests.naive_protoseg import naive_prototype_map

SHAPE = (14, 18, 10)
LAYERS = {"model.0": "encoder.1", "model.2": "output"}  # qualified name: readable alias (the file names)


def oblique_affine() -> np.ndarray:
    """Voxel axes along world (-y, x, -z) turned by 0.3 rad about z, spacing (1.3, 0.8, 2.5): Orientationd permutes
    and flips them, Spacingd resamples to 1.1 mm while keeping the rotation."""
    turn = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    axes = np.array([[0, 1, 0], [-1, 0, 0], [0, 0, -1]])  # columns: world directions of the voxel axes
    affine = np.eye(4)
    affine[:3, :3] = turn @ axes @ np.diag([1.3, 0.8, 2.5])
    affine[:3, 3] = [12.0, -30.0, 45.0]
    return affine


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nifti")
    grid = np.meshgrid(*[np.linspace(-1, 1, size) for size in SHAPE], indexing="ij")
    image = 20 * (np.sqrt(grid[0] ** 2 + (grid[1] - 0.2) ** 2 + grid[2] ** 2) < 0.6).astype(np.float32)
    image += np.random.default_rng(0).normal(0, 2.0, SHAPE).astype(np.float32)
    path = folder / "case_001.nii.gz"
    nib.save(nib.Nifti1Image(image, oblique_affine()), path)
    return folder, path


def preprocessing(pad: bool = True) -> Compose:
    return Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"), Orientationd("image", axcodes="RAS"),
        Spacingd("image", pixdim=1.1, mode="bilinear"), *([DivisiblePadd("image", k=8)] if pad else []),
    ])


def network() -> UNet:
    torch.manual_seed(0)
    return UNet(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), strides=(2,), norm=None).eval()


def run_inference(path, output_dir, inferer, mode: str) -> None:
    """A bundle's inference: the prediction inverted and saved as ``{stem}_seg``, the maps by the handler."""
    transform = preprocessing()
    postprocessing = Compose([
        Activationsd("pred", sigmoid=True),
        Invertd("pred", transform=transform, orig_keys="image", nearest_interp=False),
        AsDiscreted("pred", threshold=0.5),
        SaveImaged("pred", output_dir=output_dir, output_postfix="seg", output_dtype=np.uint8, resample=False,
                   separate_folder=False, print_log=False),
    ])
    saver = PrototypeMapSaver(list(LAYERS), transform=transform, output_dir=output_dir, activation="sigmoid", mode=mode)
    loader = DataLoader(Dataset([{"image": str(path)}], transform))
    SupervisedEvaluator(torch.device("cpu"), loader, network(), inferer=inferer, postprocessing=postprocessing,
                        val_handlers=[saver]).run()


def expected_maps(path) -> tuple[dict[str, np.ndarray], MetaTensor, MetaTensor]:
    """The naive prototype map of each layer on the network's grid (plain forward hooks), the network's input, and
    the resampled image before padding."""
    image = preprocessing()({"image": str(path)})["image"]
    model, features = network(), {}
    for layer in LAYERS:
        model.get_submodule(layer).register_forward_hook(
            lambda module, args, output, layer=layer: features.__setitem__(layer, output.detach()))
    with torch.no_grad():
        prob = torch.sigmoid(model(image.as_tensor()[None]))
    maps = {layer: naive_prototype_map(features[layer].double(), prob.double())[0, 0].numpy() for layer in LAYERS}
    return maps, image, preprocessing(pad=False)({"image": str(path)})["image"]


def grid_position(world: np.ndarray, image: MetaTensor) -> np.ndarray:
    """Voxel coordinates on ``image``'s grid of world points ``(4, N)``."""
    return (np.linalg.inv(image.affine.numpy()) @ world)[:3]


def resampled_to_input(network_map: np.ndarray, network_input: MetaTensor, resampled: MetaTensor):
    """The network-grid map linearly interpolated at every input voxel's centre, and where that centre lies inside
    the resampled image, away from its border (``Invertd`` crops the padding first, then resamples with border
    padding: there the two differ)."""
    voxels = np.stack(np.meshgrid(*[np.arange(size) for size in SHAPE], indexing="ij"), 0).reshape(3, -1)
    world = oblique_affine() @ np.vstack([voxels, np.ones(voxels.shape[1])])
    unpadded = grid_position(world, resampled)
    inside = np.all((unpadded >= 0.5) & (unpadded <= np.array(resampled.shape[1:])[:, None] - 1.5), axis=0)
    values = map_coordinates(network_map, grid_position(world, network_input), order=1, mode="nearest")
    return values.reshape(SHAPE), inside.reshape(SHAPE)


@pytest.mark.parametrize("inferer, mode", [("simple", "auto"), ("sliding_window", "stitch"), ("sliding_window", "stream")])
def test_maps_lie_on_the_input_grid_beside_the_prediction(case, tmp_path, inferer, mode):
    folder, path = case
    network_maps, network_input, resampled = expected_maps(path)
    assert network_input.shape[1:] != resampled.shape[1:] != SHAPE  # padded, resampled: three grids
    # one window over the whole input: the sliding-window paths (stitched or streamed maps) give the same maps
    inferer = SimpleInferer() if inferer == "simple" else SlidingWindowInferer(roi_size=network_input.shape[1:])
    run_inference(path, tmp_path, inferer, mode)

    source = nib.load(path)
    expected_names = {"case_001_seg.nii.gz"} | {f"case_001_{map_postfix(alias, 'class0')}.nii.gz"
                                                for alias in LAYERS.values()}
    assert {file.name for file in tmp_path.iterdir()} == expected_names
    assert "case_001_map_encoder.1_class0.nii.gz" in expected_names
    for layer, alias in LAYERS.items():
        saved = nib.load(tmp_path / f"case_001_map_{alias}_class0.nii.gz")
        assert saved.shape == SHAPE and np.allclose(saved.affine, source.affine, atol=1e-5)
        assert saved.get_data_dtype() == np.float32
        values = np.asarray(saved.dataobj)
        expected, inside = resampled_to_input(network_maps[layer], network_input, resampled)
        assert inside.mean() > 0.5  # most of the input is compared
        assert np.abs(values[inside] - expected[inside]).max() < 1e-4, layer
        assert 0 <= values.min() and values.max() <= 1 and values.std() > 0.01
    prediction = nib.load(tmp_path / "case_001_seg.nii.gz")
    assert prediction.shape == SHAPE and np.allclose(prediction.affine, source.affine, atol=1e-5)


def test_map_postfix_makes_file_names():
    assert map_postfix("decoder.1", "TC") == "map_decoder.1_TC"
    assert map_postfix("up_layers/0", "left lung") == "map_up_layers_0_left_lung"


def test_an_image_without_applied_operations_is_refused(tmp_path):
    image = torch.rand(1, 1, 16, 16, 16)
    saver = PrototypeMapSaver(["model.0"], transform=preprocessing(), output_dir=tmp_path, activation="sigmoid")
    evaluator = SupervisedEvaluator(torch.device("cpu"), [{"image": image}], network(), val_handlers=[saver])
    with pytest.raises(ValueError, match="MetaTensor holding the transforms applied to it"):
        evaluator.run()
