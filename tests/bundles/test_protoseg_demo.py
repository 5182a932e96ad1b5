"""The demo bundle end to end at tiny size, through `python -m monai.bundle run` as a user runs it."""

from __future__ import annotations

import csv
import json
import math
import pathlib
import subprocess
import sys

import pytest
import torch
from monai.bundle import ConfigParser

from monai_protoseg import FeatureRecorder, QualityCalibration, candidate_layers, last_decoder_layers

ROOT = pathlib.Path(__file__).resolve().parents[2]
BUNDLE = ROOT / "bundles" / "protoseg_demo"
TINY = ["--epochs", "2", "--val_interval", "1", "--train_cases", "8", "--validation_cases", "8", "--test_cases", "4",
        "--image_size", "32", "--batch_size", "4", "--device", "cpu"]


def run_bundle(configs: list[str], output_dir: pathlib.Path, *extra: str) -> str:
    config_file = str([str(BUNDLE / "configs" / name) for name in configs]) if len(configs) > 1 else str(
        BUNDLE / "configs" / configs[0])
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", config_file, "--bundle_root", str(BUNDLE),
               "--output_dir", str(output_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def read_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


def score(value: str) -> float:
    number = float(value)
    assert math.isnan(number) or 0 <= number <= 1
    return number


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, str]:
    output_dir = tmp_path_factory.mktemp("demo")
    return output_dir, run_bundle(["train.json"], output_dir, *TINY)


def network_def() -> torch.nn.Module:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "train.json")
    return parser.get_parsed_content("network_def")


def test_train_runs_end_to_end_and_names_its_output(trained):
    output_dir, log = trained
    assert f"all outputs are in {output_dir}" in log
    assert "Epoch[2] Complete" in log and "calibration fitted on 8 case-class pair(s)" in log
    for split, count in (("train", 8), ("validation", 8), ("test", 4)):
        dataset = json.loads((output_dir / "data" / split / "dataset.json").read_text())
        assert len(dataset["training"]) == count
    assert (output_dir / "models" / "model.pt").is_file()
    assert len(list((output_dir / "predictions").glob("*_seg.nii.gz"))) == 4


def test_layer_and_unit_csvs_cover_every_layer_and_unit(trained):
    output_dir, _ = trained
    network = network_def()
    layers = candidate_layers(network)
    rows = read_rows(output_dir / "sa_layers.csv")
    assert len(rows) == 8 and list(rows[0]) == ["case", "class", *layers]
    assert all(row["class"] == "foreground" for row in rows)
    assert any(not math.isnan(score(row[layer])) for row in rows for layer in layers)
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
    assert len(validation) == 8 and [f"sa_{layer}" for layer in quality_layers] == list(validation[0])[3:5]
    calibration = QualityCalibration.load(output_dir / "models" / "quality_calibration.json")
    refit = QualityCalibration.fit([score(r["mean_sa"]) for r in validation], [score(r["true_dice"]) for r in validation])
    assert refit.slope == pytest.approx(calibration.slope, abs=1e-4)
    held_out = read_rows(output_dir / "quality.csv")
    assert len(held_out) == 4 and "true_dice" in held_out[0]  # the demo's held-out cases have labels
    for row in held_out:
        mean_sa = score(row["mean_sa"])
        if not math.isnan(mean_sa):
            assert score(row["estimated_dice"]) == pytest.approx(calibration.predict(mean_sa), abs=1e-5)


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
    log = run_bundle(["train.json", "evaluate.json"], output_dir, "--device", "cpu")
    assert "report: " in log
    after = read_rows(output_dir / "sa_layers.csv")
    for row_before, row_after in zip(before, after, strict=True):
        for key, value in row_before.items():
            if key not in ("case", "class"):
                assert row_after[key] == pytest.approx(value, abs=1e-5) if value != "nan" else row_after[key] == "nan"


def test_inference_on_images_only(trained):
    output_dir, _ = trained
    run_bundle(["inference.json"], output_dir, "--device", "cpu")
    rows = read_rows(output_dir / "quality.csv")
    assert len(rows) == 4 and "true_dice" not in rows[0]
    assert [row["case"] for row in rows] == [f"case_{i:03d}" for i in range(4)]
