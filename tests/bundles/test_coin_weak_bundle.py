"""The COIN weak-supervision bundle at tiny size, through `python -m monai.bundle run` as a user runs it: train,
resume, evaluate (the table of every method, the faithfulness check, the report)."""

from __future__ import annotations

import json
import math
import pathlib

import pytest
import torch

from .running import ROOT, read_rows, run_bundle

BUNDLE = ROOT / "bundles" / "coin_weak_protoseg"
TINY = ["--train_cases", "16", "--validation_cases", "8", "--test_cases", "10", "--image_size", "32",
        "--batch_size", "8", "--coin_batch_size", "8", "--classifier_epochs", "1", "--coin_epochs", "1",
        "--rise_masks", "16", "--device", "cpu"]
METHODS = ["COIN", "Grad-CAM", "Score-CAM", "LayerCAM", "RISE"]


def run_coin(configs: list[str], output_dir: pathlib.Path, *extra: str) -> str:
    return run_bundle(BUNDLE, configs, output_dir, *TINY, *extra)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[pathlib.Path, str]:
    output_dir = tmp_path_factory.mktemp("coin")
    return output_dir, run_coin(["train.json"], output_dir, "--progress_bar", "false")


def test_train_writes_the_data_the_classifier_and_the_generator(trained):
    output_dir, log = trained
    for split, count in (("train", 16), ("validation", 8), ("test", 10)):
        dataset = json.loads((output_dir / "data" / split / "dataset.json").read_text())
        assert len(dataset["training"]) == count and {entry["label"] for entry in dataset["training"]} <= {0, 1}
    assert "best validation accuracy" in log and "Epoch[1] Metrics -- adversarial_loss" in log
    assert "classifier_loss: " in log and "non-scalar output" not in log  # the classifier's loss is logged
    models = output_dir / "models"
    assert (models / "classifier.pt").is_file() and (models / "generator.pt").is_file()
    assert (models / "coin" / "checkpoint_epoch=1.pt").is_file()


def test_resume_continues_coin_from_its_last_checkpoint(trained, tmp_path):
    output_dir, _ = trained
    log = run_coin(["train.json"], output_dir, "--resume", "true", "--coin_epochs", "2")  # with the progress bar
    assert "Epoch [2/2]: [2/2] 100%" in log and "reconstruction=" in log
    assert "resuming COIN from" in log and "checkpoint_epoch=1.pt" in log
    assert "training the classifier" not in log  # the trained classifier is loaded, not retrained
    assert "Epoch[2] Complete" in log and "Epoch[1] Complete" not in log.split("resuming COIN from")[1]
    assert (output_dir / "models" / "coin" / "checkpoint_epoch=2.pt").is_file()
    # a fresh output folder has nothing to resume: COIN starts from scratch and says so
    fresh = run_coin(["train.json"], tmp_path, "--resume", "true", "--progress_bar", "false", "--classifier_file",
                     str(output_dir / "models" / "classifier.pt"))
    assert "nothing to resume in" in fresh


def test_evaluate_prints_every_method_and_writes_consistent_results(trained):
    output_dir, _ = trained
    log = run_coin(["train.json", "evaluate.json"], output_dir, "--progress_bar", "false")
    table = log[log.index("method      threshold"):].splitlines()
    assert [line.split()[0] for line in table[1:11]] == [m for m in METHODS for _ in range(2)]
    assert "original" in log and "gradcam highlighted (X * H)" in log

    weak = output_dir / "weak"
    summary, cases = read_rows(weak / "weak_segmentation.csv"), read_rows(weak / "weak_cases.csv")
    assert len(summary) == 10 and len(cases) == 10 * 10
    test_data = json.loads((output_dir / "data" / "test" / "dataset.json").read_text())["training"]
    for row in summary:
        mine = [case for case in cases if case["method"] == row["method"] and case["threshold"] == row["threshold"]]
        union = sum(int(case["union"]) for case in mine)
        iou = sum(int(case["intersection"]) for case in mine) / union if union else math.nan
        assert float(row["iou"]) == pytest.approx(iou, nan_ok=True)
        lesion = [float(case["dice"]) for case in mine if int(case["true_pixels"]) > 0]
        assert float(row["dice"]) == pytest.approx(sum(lesion) / len(lesion) if lesion else math.nan, nan_ok=True)
        assert [int(case["image_label"]) for case in mine] == [entry["label"] for entry in test_data]
        # only cases the classifier labels abnormal are segmented
        assert all(int(case["predicted_pixels"]) == 0 for case in mine if case["classified_abnormal"] == "0")
    faithfulness = read_rows(weak / "faithfulness.csv")
    assert [row["training_images"] for row in faithfulness] == [
        "original", "gradcam highlighted (X * H)", "gradcam dark regions (X * (1 - H))"]
    assert all(0 <= float(row["accuracy"]) <= 1 for row in faithfulness)
    report = (output_dir / "report" / "report.md").read_text()
    assert "## Segmentation from image-level labels" in report and "weak_masks.png" in report
    assert (output_dir / "report" / "weak_masks.png").is_file() and (output_dir / "report" / "report.html").is_file()


def test_the_generator_file_holds_the_trained_generator(trained):
    output_dir, _ = trained
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(BUNDLE / "configs" / "train.json"))
    parser["image_size"] = 32
    generator = parser.get_parsed_content("generator_def")
    generator.load_state_dict(torch.load(output_dir / "models" / "generator.pt", weights_only=True))
    images = torch.rand(2, 1, 32, 32)
    assert generator(images, torch.tensor([0, 0])).shape == images.shape
