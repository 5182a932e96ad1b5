"""The five dataset bundles (BraTS, ISIC 2018, COVID-19-20, Decathlon prostate and pancreas) on tiny fake datasets.

Each fake dataset has the public on-disk layout the bundle documents (file formats, folder and file names, the
Decathlon ``dataset.json``), with a few small cases. Every bundle then runs its real configs shrunk by overrides (one
epoch, tiny windows and feature sizes, no workers, no caching) in a fresh process (``bundle_driver.py``): train, which
must write SA metrics and the quality calibration; evaluate; inference, which must write ``quality.csv`` and the
predictions; ``check_properties``; and the multi-GPU configs resolved in a one-process ``gloo`` group. One test runs
``python -m monai.bundle run`` itself. The rest checks every bundle's files, metadata, and the consistency of its
configs without running them (the metadata schema: test_bundle_metadata.py).
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, verify_net_in_out
from monai.bundle.reference_resolver import ReferenceResolver
from PIL import Image

from monai_protoseg import QualityCalibration, candidate_layers, last_decoder_layers, resolve_layers
from monai_protoseg.layer_names import read_layer_names

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUNDLES_DIR = ROOT / "bundles"
DRIVER = pathlib.Path(__file__).with_name("bundle_driver.py")
REQUIRED_FILES = [
    "configs/metadata.json", "configs/train.json", "configs/evaluate.json", "configs/inference.json",
    "configs/multi_gpu_train.json", "configs/multi_gpu_evaluate.json", "configs/logging.conf", "docs/README.md",
    "LICENSE", "large_files.yml",
]
# a fresh process per bundle: one thread each (2 cores, no oversubscription), the package importable from the checkout
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


# ----------------------------------------------------------------------------------------------- fake datasets


def _ball(shape, center, scale=(1, 1, 1)):
    grids = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    return np.sqrt(sum(((g - c) * s) ** 2 for g, c, s in zip(grids, center, scale)))


def _decathlon(root: pathlib.Path, modality: dict, labels: dict, cases: list, affine: np.ndarray) -> None:
    """``dataset.json``, ``imagesTr``/``labelsTr`` and ``imagesTs`` as the Medical Segmentation Decathlon ships them."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for name, image, label in cases:
        if label is None:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
        else:
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    (root / "dataset.json").write_text(json.dumps({
        "name": root.name, "modality": modality, "labels": labels, "numTraining": len(training),
        "numTest": len(test), "training": training, "test": test}, indent=4))


def make_brats(root: pathlib.Path, n_train: int = 5, n_test: int = 2) -> pathlib.Path:
    """Task01_BrainTumour: 4D NIfTI (x, y, z, 4) FLAIR, T1w, T1gd, T2w; labels 1 edema, 2 non-enhancing, 3 enhancing."""
    rng = np.random.default_rng(1)
    cases = []
    for i in range(n_train + n_test):
        distance = _ball((32, 32, 16), [rng.integers(12, 20), rng.integers(12, 20), 8])
        label = np.zeros((32, 32, 16), np.uint8)
        label[distance < 9] = 1
        label[distance < 6] = 2
        label[distance < 3] = 3
        image = np.stack([label * (k + 1.0) + 5 + rng.normal(0, 0.5, label.shape) for k in range(4)], -1)
        cases.append((f"BRATS_{i + 1:03d}.nii.gz", image.astype(np.float32), label if i < n_train else None))
    target = root / "Task01_BrainTumour"
    _decathlon(target, {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
               {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}, cases, np.eye(4))
    return target


def make_prostate(root: pathlib.Path, n_train: int = 5, n_test: int = 2) -> pathlib.Path:
    """Task05_Prostate: 4D NIfTI (x, y, z, 2) T2 and ADC at anisotropic spacing; labels 1 PZ, 2 TZ."""
    rng = np.random.default_rng(5)
    cases = []
    for i in range(n_train + n_test):
        distance = _ball((24, 24, 12), [rng.integers(10, 14), rng.integers(10, 14), 6], (1, 1, 2))
        label = np.zeros(distance.shape, np.uint8)
        label[distance < 8] = 1
        label[distance < 4] = 2
        zone = label.astype(np.float32)
        t2 = zone * 100 + 200 + rng.normal(0, 20, zone.shape)
        adc = (2 - zone) * 300 + 500 + rng.normal(0, 40, zone.shape)
        image = np.stack([t2, adc], -1)
        cases.append((f"prostate_{i:02d}.nii.gz", image.astype(np.float32), label if i < n_train else None))
    target = root / "Task05_Prostate"
    _decathlon(target, {"0": "T2", "1": "ADC"}, {"0": "background", "1": "PZ", "2": "TZ"}, cases,
               np.diag([1.0, 1.0, 2.0, 1.0]))
    return target


def make_pancreas(root: pathlib.Path, n_train: int = 5, n_test: int = 2) -> pathlib.Path:
    """Task07_Pancreas: 3D CT in HU; labels 1 pancreas, 2 cancer."""
    rng = np.random.default_rng(7)
    cases = []
    for i in range(n_train + n_test):
        distance = _ball((20, 20, 16), [rng.integers(8, 12), rng.integers(8, 12), 8])
        label = np.zeros(distance.shape, np.uint8)
        label[distance < 7] = 1
        label[distance < 3] = 2
        ct = np.where(label == 1, 100, np.where(label == 2, 40, -50)) + rng.normal(0, 15, label.shape)
        cases.append((f"pancreas_{i:03d}.nii.gz", ct.astype(np.int16), label if i < n_train else None))
    target = root / "Task07_Pancreas"
    _decathlon(target, {"0": "CT"}, {"0": "background", "1": "pancreas", "2": "cancer"}, cases,
               np.diag([2.0, 2.0, 2.0, 1.0]))
    return target


def make_covid(root: pathlib.Path, n_train: int = 5, n_test: int = 2) -> tuple[pathlib.Path, pathlib.Path]:
    """COVID-19-20_v2: ``Train`` with ``*_ct.nii.gz`` and ``*_seg.nii.gz`` side by side, ``Validation`` CTs only."""
    rng = np.random.default_rng(19)
    train, validation = root / "COVID-19-20_v2" / "Train", root / "COVID-19-20_v2" / "Validation"
    train.mkdir(parents=True)
    validation.mkdir(parents=True)
    affine = np.diag([-1.25, -1.25, 5.0, 1.0])
    for i in range(n_train + n_test):
        shape = (40 + 2 * i, 44, 12)
        label = (_ball(shape, [rng.integers(12, shape[0] - 12), rng.integers(12, 32), 6], (1, 1, 4)) < 9).astype(
            np.uint8)
        ct = np.where(label > 0, -300, -850) + rng.normal(0, 50, shape)
        name = f"volume-covid19-A-{i:04d}"
        folder = train if i < n_train else validation
        nib.save(nib.Nifti1Image(ct.astype(np.int16), affine), folder / f"{name}_ct.nii.gz")
        if i < n_train:
            nib.save(nib.Nifti1Image(label, affine), folder / f"{name}_seg.nii.gz")
    return train, validation


def make_isic(root: pathlib.Path, n_train: int = 8, n_test: int = 2) -> pathlib.Path:
    """ISIC 2018 Task 1: RGB ``ISIC_*.jpg`` inputs, ``ISIC_*_segmentation.png`` 0/255 masks, a test input folder."""
    rng = np.random.default_rng(2018)
    target = root / "ISIC2018"
    folders = ["ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth", "ISIC2018_Task1-2_Test_Input"]
    for folder in folders:
        (target / folder).mkdir(parents=True)
    for i in range(n_train + n_test):
        h, w = 48 + 4 * i, 64 + 2 * i  # landscape images of different sizes, as in ISIC
        yy, xx = np.mgrid[:h, :w]
        mask = (yy - rng.integers(16, h - 16)) ** 2 + (xx - rng.integers(16, w - 16)) ** 2 < 13 ** 2
        rgb = np.stack([np.where(mask, 90, 200), np.where(mask, 60, 170), np.where(mask, 40, 150)], -1)
        image = Image.fromarray(np.clip(rgb + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))
        name = f"ISIC_{i:07d}"
        if i < n_train:
            image.save(target / folders[0] / f"{name}.jpg")
            Image.fromarray(mask.astype(np.uint8) * 255).save(target / folders[1] / f"{name}_segmentation.png")
        else:
            image.save(target / folders[2] / f"{name}.jpg")
    return target


# ------------------------------------------------------------------------------------------------ bundle specs

LOADERS = {"train#dataloader#num_workers": 0, "validate#dataloader#num_workers": 0}
NO_CACHE = {"train#dataset#cache_rate": 0, "validate#dataset#cache_rate": 0}


# Every 3D bundle's validation and inference volumes span several sliding windows (BraTS 32x32x16 in 16^3 windows,
# COVID 48x48x16 in 32x32x16, prostate 64^3 in 32^3, pancreas 48x48x32 in 32^3), so SA is stitched across windows.
SPECS = {
    "brats_mri_protoseg": dict(
        make=lambda root: (make_brats(root),) * 2, n_val=3, n_test=2, classes=["TC", "WT", "ET"],
        network={"network_def#init_filters": 8}, roi={"roi_size": [16, 16, 16]},
        train={"epochs": 1, "patch_size": [32, 32, 16], "val_fraction": 0.6, **LOADERS},
        test_names=["BRATS_006", "BRATS_007"], test_input="imagesTs/{}.nii.gz", prediction="{}_seg.nii.gz",
        label_values={0, 1, 2, 3}),
    "isic_skin_protoseg": dict(
        make=lambda root: (make_isic(root),) * 2, n_val=4, n_test=2, classes=["lesion"],
        network={}, roi={"image_size": [64, 64]},
        train={"epochs": 1, "val_fraction": 0.5, **LOADERS, **NO_CACHE},
        test_names=["ISIC_0000008", "ISIC_0000009"], test_input="ISIC2018_Task1-2_Test_Input/{}.jpg",
        prediction="{}_segmentation.png", label_values={0, 255}),
    "covid_ct_protoseg": dict(
        make=make_covid, n_val=3, n_test=2, classes=["lesion"],
        network={"network_def#features": [8, 8, 16, 32, 64, 8]}, roi={"roi_size": [32, 32, 16]},
        train={"epochs": 1, "patch_size": [32, 32, 16], "val_fraction": 0.6, **LOADERS, **NO_CACHE},
        test_names=["volume-covid19-A-0005_ct", "volume-covid19-A-0006_ct"], test_input="{}.nii.gz",
        prediction="{}_seg.nii.gz", label_values={0, 1}),
    "prostate_mri_protoseg": dict(
        make=lambda root: (make_prostate(root),) * 2, n_val=3, n_test=2, classes=["PZ", "TZ"],
        network={"network_def#channels": [4, 8, 16, 32, 64, 128], "network_def#num_res_units": 1},
        roi={"roi_size": [32, 32, 32]},
        train={"epochs": 1, "val_interval": 1, "patch_size": [32, 32, 32], "val_fraction": 0.6, **LOADERS, **NO_CACHE},
        test_names=["prostate_05", "prostate_06"], test_input="imagesTs/{}.nii.gz", prediction="{}_seg.nii.gz",
        label_values={0, 1, 2}),
    "pancreas_ct_protoseg": dict(
        make=lambda root: (make_pancreas(root),) * 2, n_val=3, n_test=2, classes=["pancreas", "tumour"],
        network={"network_def#filters": [4, 8, 16, 32, 64]}, roi={"roi_size": [32, 32, 32]},
        train={"epochs": 1, "val_interval": 1, "patch_size": [32, 32, 32], "val_fraction": 0.6, **LOADERS, **NO_CACHE},
        test_names=["pancreas_005", "pancreas_006"], test_input="imagesTs/{}.nii.gz", prediction="{}_seg.nii.gz",
        label_values={0, 1, 2}),
}
NAMES = list(SPECS)


def load_config(name: str, *files: str) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(BUNDLES_DIR / name / "configs" / file) for file in files])
    return parser


def read_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def score(value) -> float:
    """A float that is a valid SA / Dice value: in [0, 1] or NaN."""
    number = float(value)
    assert math.isnan(number) or 0 <= number <= 1, number
    return number


def metrics_csv(path: pathlib.Path) -> dict[str, float]:
    """MONAI ``MetricsSaver``'s ``metrics.csv``: one ``name,value`` row per metric."""
    with open(path, newline="") as stream:
        return {row[0]: float(row[1]) for row in csv.reader(stream) if row}


# --------------------------------------------------------------------------------------- running the bundles


class BundleRun:
    """One bundle's stages run on its fake dataset; the outputs stay in ``tmp``."""

    def __init__(self, name: str, tmp: pathlib.Path) -> None:
        self.name, self.spec, self.tmp = name, SPECS[name], tmp
        self.bundle = BUNDLES_DIR / name
        self.train_data, self.infer_data = self.spec["make"](tmp / "data")
        self.root = tmp / "root"  # bundle_root: models/ (checkpoint and calibration) go here, not into the repo
        self.out = {stage: tmp / stage for stage in ("train", "evaluate", "inference")}
        common = {"bundle_root": str(self.root), **self.spec["network"], **self.spec["roi"]}
        self.overrides = {
            "train": {**common, **self.spec["train"], "dataset_dir": str(self.train_data),
                      "output_dir": str(self.out["train"])},
            "evaluate": {**common, **self.spec["train"], "dataset_dir": str(self.train_data),
                         "output_dir": str(self.out["evaluate"])},
            "inference": {**common, "dataloader#num_workers": 0, "dataset_dir": str(self.infer_data),
                          "output_dir": str(self.out["inference"])},
        }
        plan = {"bundle": str(self.bundle), "status": str(tmp / "status.json"), "stages": self.overrides,
                "order": ["train", "evaluate", "inference", "properties", "multi_gpu"]}
        (tmp / "plan.json").write_text(json.dumps(plan))
        result = subprocess.run([sys.executable, str(DRIVER), str(tmp / "plan.json")], capture_output=True, text=True,
                                cwd=ROOT, env=ENV, timeout=600)
        self.log = result.stdout + result.stderr
        assert result.returncode == 0, self.log[-5000:]
        self.status = json.loads((tmp / "status.json").read_text())

    def check(self, stage: str) -> None:
        assert self.status.get(stage) == "ok", f"{self.name} {stage}: {self.status.get(stage, 'not run')}"


@pytest.fixture(scope="module", params=NAMES)
def bundle_run(request, tmp_path_factory) -> BundleRun:
    return BundleRun(request.param, tmp_path_factory.mktemp(request.param))


def check_sa_metrics(run: BundleRun, folder: pathlib.Path) -> None:
    """SA of every probed layer (and of every class when there are several) in ``metrics.csv``, per case in the
    ``sa_{alias}_raw.csv`` details that MetricsSaver writes; each layer named by its alias (``layer_names.csv``)."""
    config = load_config(run.name, "train.json")
    classes = run.spec["classes"]
    aliases = {layer: alias for alias, layer in read_layer_names(folder / "layer_names.csv").items()}
    layers = [aliases[layer] for layer in config["sa_layers"]]
    metrics = metrics_csv(folder / "metrics.csv")
    expected = [f"sa_{layer}" for layer in layers] + ["sa_mean"]
    expected += [f"sa_{layer}_{name}" for layer in layers for name in classes] if len(classes) > 1 else []
    assert not set(expected) - set(metrics), sorted(set(expected) - set(metrics))
    assert not math.isnan(metrics["sa_mean"])
    for key in expected:
        score(metrics[key])
    assert metrics["sa_undefined"] >= 0
    rows = read_rows(folder / "sa_layers.csv")  # SAScoreHandler's own table: a row per case and class
    assert len(rows) == run.spec["n_val"] * len(classes) and list(rows[0]) == ["case", "class", *layers]
    assert all(score(row[layer]) is not None for row in rows for layer in layers)
    for layer in layers:
        rows = read_rows(folder / f"sa_{layer}_raw.csv")
        assert len(rows) == run.spec["n_val"], (layer, rows)
        for row in rows:
            for column, value in row.items():
                if column != "filename":
                    score(value)


def check_quality_csv(path: pathlib.Path, names: list[str] | None, classes: list[str], count: int,
                      fitted: bool) -> list[dict[str, str]]:
    rows = read_rows(path)
    assert len(rows) == count * len(classes), rows
    assert [row["class"] for row in rows] == classes * count
    if names is not None:
        assert sorted({row["case"] for row in rows}) == names
    for row in rows:
        score(row["mean_sa"])
        assert row["review"] in ("True", "False")
        if fitted:
            score(row["true_dice"])
            # the estimator is fitted, or left out for too few rows: never for a bad option (once logged as "not
            # fitted" when a config's "auto" was refused inside the fit)
            assert row["note"].startswith(("estimator (", "estimator per class (")) or (
                "cannot fit a quality estimator on" in row["note"]), row["note"]
        if not math.isnan(float(row["mean_sa"])):
            assert 0 <= float(row["estimated_dice"]) <= 1, row  # a calibration exists in every run checked here
    return rows


def test_train_writes_sa_metrics_and_calibration(bundle_run):
    bundle_run.check("train")
    assert (bundle_run.root / "models" / "model.pt").is_file()
    calibration = QualityCalibration.load(bundle_run.root / "models" / "quality_calibration.json")
    assert calibration.n_cases >= 3
    check_sa_metrics(bundle_run, bundle_run.out["train"])
    check_quality_csv(bundle_run.out["train"] / "quality_validation.csv", None, bundle_run.spec["classes"],
                      bundle_run.spec["n_val"], fitted=True)
    assert "sa_mean" in bundle_run.log.split("=== evaluate ===")[0]  # StatsHandler printed the SA metrics


def test_evaluate_writes_sa_and_refits_calibration(bundle_run):
    bundle_run.check("evaluate")
    folder = bundle_run.out["evaluate"]
    check_sa_metrics(bundle_run, folder)
    metrics = metrics_csv(folder / "metrics.csv")
    assert 0 <= metrics["val_mean_dice"] <= 1
    check_quality_csv(folder / "quality_validation.csv", None, bundle_run.spec["classes"], bundle_run.spec["n_val"],
                      fitted=True)
    evaluate_log = bundle_run.log.split("=== evaluate ===")[1].split("=== inference ===")[0]
    assert "calibration fitted" in evaluate_log and "quality_calibration.json" in evaluate_log  # refitted, saved


def test_inference_writes_quality_and_predictions(bundle_run):
    bundle_run.check("inference")
    spec, folder = bundle_run.spec, bundle_run.out["inference"]
    check_quality_csv(folder / "quality.csv", spec["test_names"], spec["classes"], spec["n_test"], fitted=False)
    for name in spec["test_names"]:
        source = bundle_run.infer_data / spec["test_input"].format(name)
        prediction = folder / spec["prediction"].format(name)
        assert prediction.is_file(), sorted(os.listdir(folder))
        if prediction.suffix == ".png":
            saved, original = np.asarray(Image.open(prediction)), np.asarray(Image.open(source))
            assert saved.shape == original.shape[:2]
        else:
            saved, original = np.asarray(nib.load(prediction).dataobj), nib.load(source)
            assert saved.shape == original.shape[:3]  # back in the original geometry (Invertd)
            assert np.allclose(nib.load(prediction).affine, original.affine)
            # save_maps (on by default): every SA layer's prototype map of every class beside it, on the same grid
            maps = sorted(folder.glob(f"{name}_map_*.nii.gz"))
            assert len(maps) == len(load_config(bundle_run.name, "inference.json")["sa_layers"]) * len(spec["classes"])
            for path in maps:
                saved_map = nib.load(path)
                assert saved_map.shape == original.shape[:3] and np.allclose(saved_map.affine, original.affine)
                values = np.asarray(saved_map.dataobj)
                assert np.isnan(values).all() or 0 <= np.nanmin(values) <= np.nanmax(values) <= 1, path.name
        assert set(np.unique(saved).tolist()) <= spec["label_values"]


def test_check_properties(bundle_run):
    bundle_run.check("properties")


def test_multi_gpu_configs_resolve(bundle_run):
    bundle_run.check("multi_gpu")


def test_command_line_inference(tmp_path):
    """``python -m monai.bundle run`` as a user types it, on the ISIC bundle (2D, fast), from an untrained model."""
    name = "isic_skin_protoseg"
    data = make_isic(tmp_path / "data", n_train=0, n_test=2)
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    config = load_config(name, "inference.json")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        torch.save(config.get_parsed_content("network_def").state_dict(), root / "models" / "model.pt")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               str(BUNDLES_DIR / name / "configs" / "inference.json"), "--dataset_dir", str(data), "--bundle_root",
               str(root), "--output_dir", str(tmp_path / "out"), "--image_size", "[64,64]", "--dataloader#num_workers",
               "0"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-5000:]
    rows = read_rows(tmp_path / "out" / "quality.csv")
    assert [row["case"] for row in rows] == ["ISIC_0000000", "ISIC_0000001"]
    for row in rows:
        score(row["mean_sa"])
    for row in rows:  # said, not hidden
        assert row["note"].startswith("no estimator file at ") and row["note"].endswith(": mean SA only")
        assert "no calibration file at " in row["note"]
    assert all(math.isnan(float(row["estimated_dice"])) for row in rows)
    assert len(list((tmp_path / "out").glob("ISIC_*_segmentation.png"))) == 2


@pytest.mark.parametrize("damage", ["corrupt image", "label of another size"])
def test_bad_data_stops_training_naming_the_file(tmp_path, damage):
    """ISIC (2D, fast): a corrupt JPEG, or a mask whose size differs from its image, stops ``train.json`` while it
    caches the data, before anything is written, with an error naming the file."""
    data = make_isic(tmp_path / "data", n_train=4, n_test=0)
    if damage == "corrupt image":
        bad = data / "ISIC2018_Task1-2_Training_Input" / "ISIC_0000002.jpg"
        bad.write_bytes(bad.read_bytes()[:200])
        expected = f"cannot read image file {bad}: "
    else:
        bad = data / "ISIC2018_Task1_Training_GroundTruth" / "ISIC_0000002_segmentation.png"
        Image.fromarray(np.zeros((10, 12), np.uint8)).save(bad)
        expected = f"the 'label' image {bad} has spatial shape (12, 10)"
    output_dir = tmp_path / "out"
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
               str(BUNDLES_DIR / "isic_skin_protoseg" / "configs" / "train.json"), "--dataset_dir", str(data),
               "--bundle_root", str(tmp_path), "--output_dir", str(output_dir), "--image_size", "[64,64]",
               *(f"--{key}={value}" for key, value in LOADERS.items())]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=300)
    assert result.returncode != 0
    assert expected in result.stdout + result.stderr, (result.stdout + result.stderr)[-3000:]
    assert not output_dir.exists() or not [path for path in output_dir.rglob("*") if path.is_file()]


@pytest.mark.parametrize("name", NAMES)
def test_every_pipeline_names_bad_files(name):
    """Every loading step of every config is ``CheckedLoadImaged``, and where a label is loaded,
    ``CheckSpatialShaped`` follows once the channel dimension is first, before any spatial transform."""
    pipelines = []

    def collect(node):
        if isinstance(node, list) and any(isinstance(item, dict) and "LoadImage" in str(item.get("_target_"))
                                          for item in node):
            pipelines.append(node)
        for child in (node.values() if isinstance(node, dict) else node if isinstance(node, list) else []):
            collect(child)

    for file in ("train.json", "inference.json"):
        collect(json.loads((BUNDLES_DIR / name / "configs" / file).read_text()))
    assert len(pipelines) >= 2
    for pipeline in pipelines:
        targets = [item.get("_target_") for item in pipeline if isinstance(item, dict)]
        assert "LoadImaged" not in targets and targets[0] == "monai_protoseg.CheckedLoadImaged"
        if "label" in str(pipeline[0]["keys"]):
            check = targets.index("monai_protoseg.CheckSpatialShaped")
            assert set(targets[1:check]) <= {"EnsureChannelFirstd"}


# ------------------------------------------------------------------------------------- files, metadata, configs


@pytest.mark.parametrize("name", NAMES)
def test_bundle_files_and_metadata(name):
    bundle = BUNDLES_DIR / name
    missing = [file for file in REQUIRED_FILES if not (bundle / file).is_file()]
    assert not missing, f"{name} lacks {missing}"
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    train = load_config(name, "train.json")
    formats = metadata["network_data_format"]
    for tensor, channels in ((formats["inputs"]["image"], train["network_def"]["in_channels"]),
                             (formats["outputs"]["pred"], train["network_def"]["out_channels"])):
        assert tensor["num_channels"] == channels == len(tensor["channel_def"])
    assert "Apache License" in (bundle / "LICENSE").read_text()
    large_files = (bundle / "large_files.yml").read_text()
    assert "large_files: []" in large_files and "train.json" in large_files  # no weights: trained by train.json


@pytest.mark.parametrize("name", NAMES)
def test_configs_reference_existing_ids_only(name):
    """Every ``@id`` of every documented config combination exists (a typo would only fail at run time), and every
    key the bundle defines at the top level or in ``train``/``validate`` is used (no dead keys)."""
    entry_points = {"imports", "initialize", "run", "finalize"}
    for files in (["train.json"], ["train.json", "evaluate.json"], ["inference.json"],
                  ["train.json", "multi_gpu_train.json"], ["train.json", "evaluate.json", "multi_gpu_evaluate.json"]):
        parser = load_config(name, *files)
        parser.parse()
        config = parser.get()
        refs = ReferenceResolver.find_refs_in_config(config, id="")
        missing = [ref for ref in refs if ref not in parser]
        assert not missing, f"{name} {files}: undefined references {missing}"
        used = {ref.replace("::", "#") for ref in refs}
        used |= set(re.findall(r"%([\w#]+)", json.dumps(config)))  # macros copy a config: they use it too
        defined = [key for key in config if key not in entry_points and key != "_meta_"]
        defined += [f"{section}#{key}" for section in ("train", "validate") for key in config.get(section, {})]
        dead = [key for key in defined if not any(ref == key or ref.startswith(key + "#") for ref in used)]
        assert not dead, f"{name} {files}: keys nothing uses {dead}"


@pytest.mark.parametrize("name", NAMES)
def test_layers_and_classes_are_consistent(name):
    """The SA and quality layers exist in the network, the quality layers are the last two decoder layers, and
    train and inference agree on the network, the classes and the quality layers; the docs name every SA layer."""
    train, inference = load_config(name, "train.json"), load_config(name, "inference.json")
    network = train.get_parsed_content("network_def")
    resolve_layers(network, train["sa_layers"])
    assert set(train["sa_layers"]) <= set(candidate_layers(network))
    assert train["quality_layers"] == last_decoder_layers(network)
    shared = ("network_def", "class_names", "quality_layers", "sa_layers")
    for key in (*shared, "roi_size" if "roi_size" in train else "image_size"):
        assert train[key] == inference[key], key
    assert len(train["class_names"]) == len(SPECS[name]["classes"])
    readme = (BUNDLES_DIR / name / "docs" / "README.md").read_text()
    assert not [layer for layer in train["sa_layers"] if f"`{layer}`" not in readme]
    for command in ("python -m monai.bundle run", "torchrun", "evaluate.json", "inference.json"):
        assert command in readme


@pytest.mark.parametrize("name", NAMES)
def test_network_matches_metadata(name, tmp_path):
    """MONAI's ``verify_net_in_out``: the full-size network takes and returns what metadata.json declares."""
    bundle = BUNDLES_DIR / name / "configs"
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "metadata.json"),
                      config_file=str(bundle / "train.json"), device="cpu", n=1, any=1)
