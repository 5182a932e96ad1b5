"""The demo bundle end to end at tiny size, through `python -m monai.bundle run` as a user runs it."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import shutil
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser

from monai_protoseg import (
    FeatureRecorder,
    QualityCalibration,
    QualityEstimator,
    candidate_layers,
    last_decoder_layers,
    layer_aliases,
)

from .running import ROOT, read_rows, run_bundle

BUNDLE = ROOT / "bundles" / "protoseg_demo"
TINY = ["--epochs", "2", "--val_interval", "1", "--train_cases", "8", "--validation_cases", "12", "--test_cases", "4",
        "--image_size", "32", "--batch_size", "4", "--device", "cpu"]


def score(value: str) -> float:
    number = float(value)
    assert math.isnan(number) or 0 <= number <= 1
    return number


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, str]:
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, run_bundle(BUNDLE, ["train.json"], output_dir, *TINY)


def assert_same_rows(expected: list[dict[str, str]], actual: list[dict[str, str]], keys: tuple[str, ...],
                     abs: float) -> None:
    """The same rows, matched by ``keys`` whatever their order, numbers equal within ``abs`` or a relative 1e-6 (NaN
    equal to NaN): unbounded features such as prototype distances of about 17 differ in the sixth digit when reduced
    across two processes."""
    by_key = {tuple(row[key] for key in keys): row for row in actual}
    assert len(by_key) == len(actual) == len(expected)
    for row in expected:
        other = by_key[tuple(row[key] for key in keys)]
        assert other.keys() == row.keys()
        for column, value in row.items():
            if column not in keys:
                assert float(other[column]) == pytest.approx(float(value), rel=1e-6, abs=abs, nan_ok=True), column


def network_def() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    return parser.get_parsed_content("network_def")


def test_train_runs_end_to_end_and_names_its_output(trained):
    output_dir, log = trained
    assert f"all outputs are in {output_dir}" in log
    assert "Epoch[2] Complete" in log and "calibration fitted on 12 case-class pair(s)" in log
    for split, count in (("train", 8), ("validation", 12), ("test", 4)):
        dataset = json.loads((output_dir / "data" / split / "dataset.json").read_text())
        assert len(dataset["training"]) == count
    assert (output_dir / "models" / "model.pt").is_file()
    assert len(list((output_dir / "predictions").glob("*_seg.nii.gz"))) == 4


def test_layer_and_unit_csvs_cover_every_layer_and_unit(trained):
    output_dir, _ = trained
    network = network_def()
    layers = candidate_layers(network)
    aliases = ["encoder.1", "encoder.2", "encoder.3", "bottleneck", "decoder.2", "decoder.1", "output"]
    assert list(layer_aliases(network, layers).values()) == aliases
    rows = read_rows(output_dir / "sa_layers.csv")
    assert len(rows) == 12 and list(rows[0]) == ["case", "class", *aliases]
    assert all(row["class"] == "foreground" for row in rows)
    assert any(not math.isnan(score(row[alias])) for row in rows for alias in aliases)
    assert read_rows(output_dir / "layer_names.csv")[:len(layers)] == [
        {"layer": alias, "qualified_name": layer} for alias, layer in zip(aliases, layers)]
    with torch.no_grad(), FeatureRecorder(network.eval(), layers) as recorder:
        network(torch.rand(1, 1, 32, 32))
    units = read_rows(output_dir / "sa_units.csv")
    assert len(units) == sum(recorder[layer].shape[1] for layer in layers)
    values = [score(row["sa"]) for row in units]  # each in [0, 1] or NaN
    assert sum(not math.isnan(value) for value in values) > len(values) // 2


def test_quality_files_and_the_calibration_agree(trained):
    output_dir, _ = trained
    quality_layers = last_decoder_layers(network_def())
    validation = read_rows(output_dir / "quality_validation.csv")
    assert len(validation) == 12
    aliases = layer_aliases(network_def(), candidate_layers(network_def()))
    assert {f"sa_{alias}" for alias in aliases.values()} <= set(validation[0])  # the SA profile
    for row in validation:
        sa = [score(row[f"sa_{aliases[layer]}"]) for layer in quality_layers]
        assert score(row["mean_sa"]) == pytest.approx(sum(sa) / 2, abs=2e-6)
    calibration = QualityCalibration.load(output_dir / "models" / "quality_calibration.json")
    refit = QualityCalibration.fit([score(r["mean_sa"]) for r in validation], [score(r["true_dice"]) for r in validation])
    assert refit.slope == pytest.approx(calibration.slope, abs=1e-4)
    # 12 validation cases: enough for the SA-profile estimator, which then makes the estimates
    estimator = QualityEstimator.load(output_dir / "models" / "quality_estimator.json", layers=candidate_layers(
        network_def()))
    columns = {f"{prefix}{layer}": f"{prefix}{alias}" for layer, alias in aliases.items()
               for prefix in ("sa_", "spread_")}  # the CSVs name layers by alias
    for rows in (validation, read_rows(output_dir / "quality.csv")):
        for row in rows:
            assert row["note"] == f"estimator ({estimator.chosen})"
            features = np.array([float(row[columns.get(name, name)]) for name in estimator.feature_names])
            assert score(row["estimated_dice"]) == pytest.approx(float(estimator.predict(features)), abs=2e-3)
    held_out = read_rows(output_dir / "quality.csv")
    assert len(held_out) == 4 and "true_dice" in held_out[0]  # the demo's held-out cases have labels


def test_report_has_the_table_and_figures(trained):
    output_dir, _ = trained
    report = (output_dir / "report" / "report.md").read_text()
    assert "| `model.0` | foreground |" in report and "![layer-wise SA](layer_sa.png)" in report
    assert "held-out cases have ground truth" in report
    for figure in ("layer_sa.png", "unit_sa.png", "quality.png"):
        assert (output_dir / "report" / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_reloads_the_model_and_reproduces_validation(trained, tmp_path):
    output_dir, _ = trained
    before = read_rows(output_dir / "sa_layers.csv")
    log = run_bundle(BUNDLE, ["train.json", "evaluate.json"], output_dir, "--device", "cpu")
    assert "report: " in log
    assert_same_rows(before, read_rows(output_dir / "sa_layers.csv"), ("case", "class"), abs=1e-5)


def test_inference_on_images_only(trained):
    output_dir, _ = trained
    run_bundle(BUNDLE, ["inference.json"], output_dir, "--device", "cpu")
    rows = read_rows(output_dir / "quality.csv")
    assert len(rows) == 4 and "true_dice" not in rows[0]
    assert [row["case"] for row in rows] == [f"case_{i:03d}" for i in range(4)]


def test_multi_gpu_evaluate_with_two_processes_equals_one_process(trained, tmp_path):
    """``multi_gpu_evaluate.json`` under ``torchrun --nproc_per_node=2`` on CPU (gloo, uneven split of 8 cases is
    fine too): the same SA scores, quality rows and metrics as the single-process evaluate, written once."""
    output_dir, _ = trained
    single, multi = tmp_path / "single", tmp_path / "multi"
    for copy in (single, multi):
        for folder in ("data", "models"):
            shutil.copytree(output_dir / folder, copy / folder)
    run_bundle(BUNDLE, ["train.json", "evaluate.json"], single, "--device", "cpu")
    configs = str([str(BUNDLE / "configs" / name) for name in ("train.json", "evaluate.json", "multi_gpu_evaluate.json")])
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "monai.bundle",
               "run", "--config_file", configs, "--bundle_root", str(BUNDLE), "--output_dir", str(multi)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "on 2 processes" in result.stdout + result.stderr
    assert_same_rows(read_rows(single / "sa_layers.csv"), read_rows(multi / "sa_layers.csv"), ("case", "class"), 1e-6)
    assert_same_rows(read_rows(single / "quality_validation.csv"), read_rows(multi / "quality_validation.csv"),
                     ("case", "class", "review", "note"), 1e-6)
    assert_same_rows(read_rows(single / "sa_units.csv"), read_rows(multi / "sa_units.csv"),
                     ("layer", "qualified_name", "class", "unit"), 1e-5)  # means over cases: gathered order, float sums
    single_metrics = dict(csv.reader((single / "metrics.csv").read_text().splitlines()))
    multi_metrics = dict(csv.reader((multi / "metrics.csv").read_text().splitlines()))
    assert single_metrics.keys() == multi_metrics.keys()
    for name, value in single_metrics.items():
        assert float(multi_metrics[name]) == pytest.approx(float(value), abs=1e-5), name


def damage(kind: str, path: pathlib.Path) -> None:
    """A missing file, a file cut inside its compressed body, or a label on a grid other than its image's."""
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        content = path.read_bytes()
        path.write_bytes(content[: len(content) * 2 // 3])
    else:
        image = nib.load(path)
        nib.save(nib.Nifti1Image(np.zeros((image.shape[0] - 2, *image.shape[1:]), np.uint8), image.affine), path)


def run_failing(configs: list[str], output_dir: pathlib.Path, *extra: str) -> str:
    config_file = str([str(BUNDLE / "configs" / name) for name in configs]) if len(configs) > 1 else str(
        BUNDLE / "configs" / configs[0])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", str(BUNDLE),
               "--output_dir", str(output_dir), "--device", "cpu", *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode != 0, "the run should have stopped"
    return result.stdout + result.stderr


def snapshot(folder: pathlib.Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file() and "data" not in path.parts}


@pytest.mark.parametrize("kind, folder, message", [
    ("missing", "imagesTr", "files do not exist: {path}."),  # found when evaluate lists the cases
    ("truncated", "labelsTr", "cannot read image file {path}: "),
    ("shape", "labelsTr", "the 'label' image {path} has spatial shape"),
])
def test_bad_validation_data_stops_evaluate_naming_the_file(trained, tmp_path, kind, folder, message):
    """Evaluate lists, then caches the validation cases before it runs: a bad case stops it before anything is
    written, and every file of the earlier run is left as it was."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    before = snapshot(copy)
    path = copy / "data" / "validation" / folder / "case_003.nii.gz"
    damage(kind, path)
    log = run_failing(["train.json", "evaluate.json"], copy)
    assert message.format(path=path) in log
    assert snapshot(copy) == before  # nothing lost, nothing half-written, no temporary files left


def test_a_corrupt_image_midway_through_inference_keeps_what_was_written(trained, tmp_path):
    """Inference reads case by case: the cases before the bad one keep their predictions, and the quality CSV of the
    earlier run is not replaced by a partial one."""
    copy = tmp_path / "run"
    shutil.copytree(trained[0], copy)
    shutil.rmtree(copy / "predictions")
    quality = (copy / "quality.csv").read_bytes()
    path = copy / "data" / "test" / "imagesTr" / "case_002.nii.gz"
    damage("truncated", path)
    log = run_failing(["inference.json"], copy, "--batch_size", "1")
    assert f"cannot read image file {path}: " in log
    assert sorted(p.name for p in (copy / "predictions").iterdir()) == ["case_000_seg.nii.gz", "case_001_seg.nii.gz"]
    assert (copy / "quality.csv").read_bytes() == quality
    assert not [p for p in copy.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]


def test_tensorboard_has_sa_scalars_every_validation_and_prototype_map_images(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output_dir, _ = trained
    # the training run's file: later evaluate runs of this module add their own files to the folder
    first = min((output_dir / "tensorboard").glob("events.out.tfevents.*"), key=lambda path: int(path.name.split(".")[3]))
    events = EventAccumulator(str(first), size_guidance={"images": 0, "scalars": 0}).Reload()
    layers = candidate_layers(network_def())
    scalars, images = events.Tags()["scalars"], events.Tags()["images"]
    for alias in layer_aliases(network_def(), layers).values():  # tags name the layers by their aliases
        # two training epochs with val_interval 1, then the final validation at the trainer's last epoch again
        assert [event.step for event in events.Scalars(f"sa_{alias}")] == [1, 2, 2]
    assert not [tag for tag in scalars if "model." in tag]
    assert "train_loss" in scalars and "sa_mean" in scalars
    assert sorted(images) == [f"prototype_maps/case_00{i}/foreground" for i in range(2)]
    final = events.Images("prototype_maps/case_000/foreground")[-1]
    assert final.step == 2 and final.width > final.height * (3 + len(layers)) * 0.9
    snapshots = sorted(path.name for path in (output_dir / "prototype_maps").glob("*.npz"))
    assert snapshots == ["case_000_foreground.npz", "case_001_foreground.npz"]
