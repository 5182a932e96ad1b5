"""The handlers inside a real MONAI evaluator whose pipeline changes the grid, as the model zoo's do: NIfTI cases with
anisotropic, non-RAS affines, ``Orientationd`` + ``Spacingd`` preprocessing and ``Invertd(keys=[pred, label])``
postprocessing. SA must be that of the network's grid (an independent naive computation on the preprocessed case), or
refused with both grids named; never silently wrong."""

from __future__ import annotations

import logging

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet
from monai.transforms import (
    Activationsd,
    AsDiscreted,
    Compose,
    CopyItemsd,
    EnsureChannelFirstd,
    Invertd,
    LoadImaged,
    Orientationd,
    ScaleIntensityd,
    Spacingd,
)

from monai_protoseg import FeatureRecorder
from monai_protoseg.handlers import MeanSAQualityHandler, PrototypeMapHandler, SAScoreHandler
from tests.naive_protoseg import naive_sa_score

LAYERS = ["model.0", "model.1.submodule.2", "model.2"]
ALIASES = {"model.0": "encoder.1", "model.1.submodule.2": "decoder.1", "model.2": "output"}
PIXDIM = (1.5, 1.5, 2.0)
AFFINES = {  # LPS-like (x and y flipped) and anisotropic: Orientationd flips, Spacingd resamples
    "resampled": np.diag([-0.9, -1.2, 8 / 3, 1.0]),  # (20, 20, 12) becomes (12, 16, 16)
    "flipped": np.diag([-1.5, -1.5, 2.0, 1.0]),  # the pixdim already: only Orientationd acts, the shape survives
}


def write_cases(folder, affine: np.ndarray, count: int = 3) -> list[dict[str, str]]:
    """NIfTI image/label pairs, a bright ellipsoid labelled 1, and a tissue mask that covers the whole image."""
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (20, 20, 12)), indexing="ij"), -1)
    cases = []
    for i in range(count):
        centre = rng.uniform([6, 6, 4], [14, 14, 8])
        label = (((grid - centre) / [5, 4, 3]) ** 2).sum(-1) < 1
        image = label * 100.0 + rng.normal(0, 30, label.shape)
        names = {}
        for key, data in {"image": image, "label": label, "mask": np.ones_like(label)}.items():
            names[key] = str(folder / f"case{i}_{key}.nii.gz")
            nib.save(nib.Nifti1Image(data.astype(np.float32), affine), names[key])
        cases.append(names)
    return cases


def preprocessing(keys=("image", "label")) -> Compose:
    nearest = ["bilinear"] + ["nearest"] * (len(keys) - 1)
    return Compose([
        LoadImaged(keys), EnsureChannelFirstd(keys), Orientationd(keys, axcodes="RAS"),
        Spacingd(keys, pixdim=PIXDIM, mode=nearest), ScaleIntensityd("image"),
    ])


def make_network() -> UNet:
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()


def zoo_evaluator(network, cases, handlers, *, keys=("image", "label"), inferer=None, decollate=True):
    """An evaluator as spleen_ct_segmentation's evaluate.json builds it: softmax, Invertd(pred, label), argmax."""
    pre = preprocessing(keys)
    post = Compose([
        Activationsd("pred", softmax=True),
        Invertd(["pred", "label"], transform=pre, orig_keys="image", nearest_interp=[False, True], to_tensor=True),
        AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2),
    ])
    loader = DataLoader(Dataset(cases, pre), batch_size=1, num_workers=0)
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=loader, network=network, inferer=inferer or SimpleInferer(),
        postprocessing=post, key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                                       output_transform=from_engine(["pred", "label"]))},
        val_handlers=handlers, decollate=decollate,
    )


def reference_sa(network, cases) -> dict[str, list[float]]:
    """SA of each layer and case on the network's grid: the preprocessed case, plain hooks, the naive formulation."""
    scores = {layer: [] for layer in LAYERS}
    for case in cases:
        data = preprocessing()(case)
        with torch.no_grad(), FeatureRecorder(network, LAYERS) as recorder:
            prob = torch.softmax(network(data["image"][None].as_tensor()), 1)[:, 1:]
        target = data["label"][None].as_tensor() == 1
        for layer in LAYERS:
            scores[layer].append(float(naive_sa_score(recorder[layer].double(), prob.double(), target)[0]))
    return scores


@pytest.mark.parametrize("grid", ["resampled", "flipped"])
@pytest.mark.parametrize("inferer", [SimpleInferer(), SlidingWindowInferer(roi_size=(-1, -1, -1))])  # one window
def test_sa_of_an_inverting_evaluator_is_that_of_the_network_grid(grid, inferer, tmp_path):
    cases = write_cases(tmp_path, AFFINES[grid])
    network = make_network()
    handler = SAScoreHandler(LAYERS, output_dir=tmp_path)
    evaluator = zoo_evaluator(network, cases, [handler], inferer=inferer)
    evaluator.run()
    expected = reference_sa(network, cases)
    for layer in LAYERS:
        got = evaluator.state.metric_details[f"sa_{ALIASES[layer]}"][:, 0].tolist()
        assert got == pytest.approx(expected[layer], abs=1e-6), layer
    assert np.isfinite(evaluator.state.metrics["val_mean_dice"])  # the evaluator's own metric is untouched


@pytest.mark.parametrize("grid", ["resampled", "flipped"])
def test_a_label_read_after_invertd_is_refused_with_both_grids(grid, tmp_path):
    cases = write_cases(tmp_path, AFFINES[grid], count=1)
    handler = SAScoreHandler(LAYERS, output_transform=from_engine(["pred", "label"]))
    with pytest.raises(ValueError) as error:
        zoo_evaluator(make_network(), cases, [handler]).run()
    message = str(error.value)
    assert "the label from output_transform" in message and "is not on the grid the network saw" in message
    assert "in LPS" in message and "in RAS" in message  # both grids, with their orientation
    assert "Invertd(keys=('pred', 'label'))" in message and "Leave output_transform unset" in message


def test_quality_and_map_handlers_read_the_network_grid_and_a_mask_in_a_decollated_batch(tmp_path):
    cases = write_cases(tmp_path, AFFINES["resampled"])
    network = make_network()
    sa = SAScoreHandler(LAYERS, mask_key="mask", name="masked")
    quality = MeanSAQualityHandler(LAYERS[1:], output_dir=tmp_path)
    maps = PrototypeMapHandler(LAYERS, num_cases=1)
    evaluator = zoo_evaluator(network, cases, [sa, quality, maps], keys=("image", "label", "mask"))
    evaluator.run()
    expected = reference_sa(network, cases)
    for layer in LAYERS:  # a mask of ones changes nothing
        got = evaluator.state.metric_details[f"masked_{ALIASES[layer]}"][:, 0].tolist()
        assert got == pytest.approx(expected[layer])
    rows = (tmp_path / "quality.csv").read_text().splitlines()
    true_dice = [float(row.split(",")[rows[0].split(",").index("true_dice")]) for row in rows[1:]]
    for case, dice in zip(cases, true_dice):  # Dice of the argmax prediction on the network's grid
        data = preprocessing()(case)
        with torch.no_grad():
            pred = network(data["image"][None].as_tensor()).argmax(1) == 1
        label = data["label"][None, 0].as_tensor() == 1
        assert dice == pytest.approx(2 * (pred & label).sum().item() / (pred.sum() + label.sum()).item(), abs=1e-6)
    assert maps.snapshots[0].label is not None and maps.snapshots[0].spatial_shape == tuple(
        preprocessing()(cases[0])["image"].shape[1:])


def test_activation_auto_follows_the_postprocessing_and_is_logged_once(tmp_path, caplog):
    cases = write_cases(tmp_path, AFFINES["flipped"], count=2)
    auto, explicit = SAScoreHandler(LAYERS, name="auto"), SAScoreHandler(LAYERS, activation="sigmoid", name="sig")
    with caplog.at_level(logging.INFO):
        zoo_evaluator(make_network(), cases, [auto, explicit]).run()
    assert auto.output_activation == "softmax" and explicit.output_activation == "sigmoid"
    chosen = [r.message for r in caplog.records if "activation 'softmax', Activationsd(keys='pred', softmax=True)" in
              r.message]
    assert len(chosen) == 1
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "activation='sigmoid' is used" in r.message]
    assert len(warned) == 1


def test_softmax_on_one_channel_is_refused(tmp_path):
    network = UNet(3, 1, 1, channels=(4, 8), strides=(2,))
    handler = SAScoreHandler(LAYERS[:1], activation="softmax", network=network)
    engine = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=[{
        "image": torch.rand(1, 1, 8, 8, 8), "label": torch.zeros(1, 1, 8, 8, 8)}], network=network,
        val_handlers=[handler])
    with pytest.raises(ValueError, match="activation 'softmax' \\(given\\) on a one-channel output"):
        engine.run()


def test_candidate_layers_are_the_default(tmp_path):
    cases = write_cases(tmp_path, AFFINES["flipped"], count=1)
    network = make_network()
    handler = SAScoreHandler()
    zoo_evaluator(network, cases, [handler]).run()
    assert handler.layers == ["model.0", "model.1.submodule.0", "model.1.submodule.1.submodule",
                              "model.1.submodule.2", "model.2"]
    assert np.isfinite(handler.metric.layer_scores().numpy()).all()


def test_postprocessing_that_copies_pred_keeps_its_activation(tmp_path):
    """A copy of ``pred`` discretised (multi_organ's evaluate.yaml) does not change what ``pred`` gets."""
    from monai_protoseg.handlers.postprocessing import postprocessing_activation

    post = Compose([Activationsd("pred", softmax=True), CopyItemsd("pred", names="pred_save"),
                    AsDiscreted("pred_save", argmax=True)])
    assert postprocessing_activation(post)[0] == "softmax"
    assert postprocessing_activation(Compose([AsDiscreted("pred", threshold=0.5)]))[0] is None
    assert postprocessing_activation(Compose([AsDiscreted("pred", threshold=0.0)]))[0] == "sigmoid"
    assert postprocessing_activation(Compose([AsDiscreted("label", argmax=True)])) is None
