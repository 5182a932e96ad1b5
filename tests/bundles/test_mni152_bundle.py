"""The MNI152 tissue bundle end to end at tiny size, through `python -m monai.bundle run` as a user runs it.

It needs nilearn (the extra ``examples``, which ``make test`` installs); without it the module is skipped."""

from __future__ import annotations

import json
import math
import pathlib

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_decathlon_datalist

from monai_protoseg import FeatureRecorder, QualityEstimator, candidate_layers, layer_aliases

from .running import ROOT, read_rows, run_bundle

pytest.importorskip("nilearn", reason="nilearn is not installed: pip install -c constraints.txt -e '.[examples]'")

BUNDLE = ROOT / "bundles" / "mni152_tissue_protoseg"
CLASSES = ["grey_matter", "white_matter"]
TINY = ["--epochs", "2", "--val_interval", "1", "--image_size", "32", "--slice_thickness", "4", "--block_size", "2",
        "--gap", "1", "--validation_fraction", "0.3", "--test_fraction", "0.2", "--batch_size", "4", "--device", "cpu"]


def score(value: str) -> float:
    number = float(value)
    assert math.isnan(number) or 0 <= number <= 1
    return number


def network_def() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    return parser.get_parsed_content("network_def")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, str]:
    output_dir = tmp_path_factory.mktemp("mni152")
    return output_dir, run_bundle(BUNDLE, ["train.json"], output_dir, *TINY)


def test_train_writes_the_split_model_and_predictions(trained):
    output_dir, log = trained
    assert f"all outputs are in {output_dir}" in log and "Epoch[2] Complete" in log
    z = {}
    for split in ("train", "validation", "test"):
        dataset = json.loads((output_dir / "data" / split / "dataset.json").read_text())
        assert dataset["labels"] == {"0": "background", "1": "grey_matter", "2": "white_matter"}
        z[split] = {int(item["image"].split("_z")[1][:3]) for item in dataset["training"]}
        assert z[split]
    for split, others in (("train", ("validation", "test")), ("validation", ("test",))):
        for other in others:  # no slab next to (or equal to) a slab of another split
            assert not {index + offset for index in z[split] for offset in (-1, 0, 1)} & z[other]
    assert (output_dir / "models" / "model.pt").is_file()
    assert len(list((output_dir / "predictions").glob("*_seg.nii.gz"))) == len(z["test"])


def test_layer_and_unit_csvs_cover_every_layer_and_both_classes(trained):
    output_dir, _ = trained
    network = network_def()
    layers = candidate_layers(network)
    validation = load_decathlon_datalist(output_dir / "data" / "validation" / "dataset.json")
    aliases = list(layer_aliases(network, layers).values())
    rows = read_rows(output_dir / "sa_layers.csv")
    assert list(rows[0]) == ["case", "class", *aliases]
    assert sorted((row["case"], row["class"]) for row in rows) == sorted(
        (pathlib.Path(item["image"]).name[:-len(".nii.gz")], name) for item in validation for name in CLASSES)
    for name in CLASSES:
        assert any(not math.isnan(score(row[alias])) for row in rows if row["class"] == name for alias in aliases)
    with torch.no_grad(), FeatureRecorder(network.eval(), layers) as recorder:
        network(torch.rand(1, 1, 32, 32))
    units = read_rows(output_dir / "sa_units.csv")
    assert len(units) == 2 * sum(recorder[layer].shape[1] for layer in layers)
    assert {row["class"] for row in units} == set(CLASSES)
    values = [score(row["sa"]) for row in units]  # each in [0, 1] or NaN
    assert sum(not math.isnan(value) for value in values) > len(values) // 2


def test_validation_dice_matches_a_recomputation(trained):
    """MetricsSaver's per-slab Dice of the final validation equals the Dice of the saved model's argmax on the
    validation preprocessing of the config, recomputed with numpy."""
    output_dir, _ = trained
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    network = parser.get_parsed_content("network_def")
    preprocessing = parser.get_parsed_content("validate#preprocessing")
    network.load_state_dict(torch.load(output_dir / "models" / "model.pt", map_location="cpu"))
    network.eval()
    raw = {row["filename"]: row for row in read_rows(output_dir / "val_mean_dice_raw.csv")}
    validation = load_decathlon_datalist(output_dir / "data" / "validation" / "dataset.json")
    assert sorted(raw) == sorted(item["image"] for item in validation)
    for item in validation:
        data = preprocessing(item)
        label = np.asarray(data["label"][0])
        with torch.no_grad():
            prediction = network(data["image"][None].as_tensor()).argmax(1)[0].numpy()
        for k, name in enumerate(("class0", "class1"), start=1):
            truth, predicted = label == k, prediction == k
            expected = 2 * (truth & predicted).sum() / (truth.sum() + predicted.sum()) if truth.any() else math.nan
            assert score(raw[item["image"]][name]) == pytest.approx(expected, abs=1e-5, nan_ok=True), (item, name)


def test_quality_files_the_estimator_and_the_report(trained):
    output_dir, _ = trained
    estimator = QualityEstimator.load(output_dir / "models" / "quality_estimator.json",
                                      layers=candidate_layers(network_def()))
    for filename in ("quality_validation.csv", "quality.csv"):
        rows = read_rows(output_dir / filename)
        assert {row["class"] for row in rows} == set(CLASSES)
        for row in rows:
            for column in ("mean_sa", "estimated_dice", "true_dice"):
                score(row[column])
            assert row["note"] in (f"estimator ({estimator.chosen})", "empty prediction: SA undefined")
    report = (output_dir / "report" / "report.md").read_text()
    for name in CLASSES:
        assert f"| `model.0` | {name} |" in report
    for figure in ("layer_sa.png", "unit_sa.png", "quality.png"):
        assert (output_dir / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_and_inference_run_on_the_saved_model(trained):
    output_dir, _ = trained
    before = read_rows(output_dir / "sa_layers.csv")
    assert "report: " in run_bundle(BUNDLE, ["train.json", "evaluate.json"], output_dir, "--device", "cpu")
    after = read_rows(output_dir / "sa_layers.csv")
    assert len(after) == len(before)
    for old, new in zip(before, after):
        assert old.keys() == new.keys()
        for key in old:
            if key not in ("case", "class"):
                assert float(new[key]) == pytest.approx(float(old[key]), abs=1e-5, nan_ok=True)
    run_bundle(BUNDLE, ["inference.json"], output_dir, "--device", "cpu")
    rows = read_rows(output_dir / "quality.csv")
    test = load_decathlon_datalist(output_dir / "data" / "test" / "dataset.json")
    assert len(rows) == 2 * len(test) and "true_dice" not in rows[0]
