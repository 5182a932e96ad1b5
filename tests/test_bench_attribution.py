"""benchmarks/bench_attribution.py --quick: one table per task, a row per method and reference map, values in range,
the map of all ones keeping image and prediction exactly; the CSV, maps and figure it saves, which the report shows;
and the side-by-side figure of ``plot_attribution_maps``."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import pytest
import torch

from benchmarks import bench_attribution
from monai_protoseg.attribution.figures import plot_attribution_maps
from monai_protoseg.attribution.report import read_attribution_metrics
from monai_protoseg.io import atomic_write_csv
from monai_protoseg.report import write_report
from tests.test_bench_run_all import tables

METHODS = ["Grad-CAM", "Grad-CAM++", "LayerCAM", "Score-CAM", "RISE", "KWC", "ProtoSeg input image",
           "ProtoSeg layers"]
REFERENCES = ["all ones (reference)", "random (reference)", "prediction (reference)"]
VALUES = ["Prediction Preserved", "Image Preserved", "deletion AUC", "insertion AUC", "time (s/case)"]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory):
    """The result of one --quick run (about 5 s on 2 cores) saving its files in ``RUN_DIR/attribution``."""
    run_dir = tmp_path_factory.mktemp("run")
    with contextlib.redirect_stdout(io.StringIO()):
        result = bench_attribution.run(["--quick", "--output-dir", str(run_dir / "attribution")])
    return result, run_dir


def test_one_table_per_task_with_every_method_in_range(quick_run):
    result, _ = quick_run
    *measured, checks = tables(result.markdown())
    assert [table.title.split(":")[0] for table in result.tables] == ["2D", "3D"]
    for table in measured:
        assert [row["method"] for row in table] == METHODS + REFERENCES
        for row in table:
            preserved, image, deletion, insertion, seconds = (float(row[column]) for column in VALUES)
            assert 0 <= preserved <= 1 and 0 <= image <= 1, row
            assert math.isfinite(deletion) and math.isfinite(insertion) and deletion >= 0 and insertion >= 0, row
            assert seconds > 0, row
        ones = table[len(METHODS)]
        assert ones["Prediction Preserved"] == "1.000" and ones["Image Preserved"] == "1.000"
    assert [check["figure"] for check in checks] == [
        f"{task}: {name} deletion AUC / {reference} map's" for task in ("2D", "3D")
        for name, reference in [("ProtoSeg input image", "random"), ("ProtoSeg layers", "random"),
                                ("ProtoSeg layers", "prediction")]]
    assert {check["target"] for check in checks} == {"-"}


def test_the_map_of_all_ones_keeps_image_and_prediction_exactly():
    args = bench_attribution.settings(["--quick"])
    network = bench_attribution.unet(2, seed=0).eval()
    images = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        prob = torch.sigmoid(network(images))
    assert (prob > 0.5).any(dim=(1, 2, 3)).all()  # a prediction to preserve in every case
    task = bench_attribution.Task("2D", network, images, prob, "untrained")
    with contextlib.redirect_stdout(io.StringIO()):
        scores, maps = bench_attribution.evaluate(task, 4, args)
    assert scores["all ones (reference)"][:2] == [1.0, 1.0]
    assert list(scores) == METHODS + REFERENCES
    for name, values in maps.items():
        assert values.shape == (2, 1, 32, 32) and 0 <= values.min() and values.max() <= 1, name


def test_saves_the_metrics_maps_and_figure_that_the_report_shows(quick_run):
    result, run_dir = quick_run
    folder = run_dir / "attribution"
    rows = read_attribution_metrics(folder / "attribution_metrics.csv")
    assert [(row["task"], row["method"], row["reference"]) for row in rows] == [
        (task, name, name in REFERENCES) for task in ("2D", "3D") for name in METHODS + REFERENCES]
    for row, printed in zip(rows, [row for table in tables(result.markdown())[:2] for row in table]):
        assert row["cases"] == 2 and abs(row["deletion_auc"] - float(printed["deletion AUC"])) <= 5e-4 + 1e-9
    ones = [row for row in rows if row["method"] == "all ones (reference)"]
    assert [(row["prediction_preserved"], row["image_preserved"]) for row in ones] == [(1.0, 1.0)] * 2

    with np.load(folder / "attribution_maps.npz") as saved:
        assert saved["methods"].tolist() == METHODS
        for key, shape in (("2d", (32, 32)), ("3d", (16, 16, 16))):
            assert saved[f"{key}_images"].shape == (2, 1, *shape)
            assert saved[f"{key}_predictions"].shape == (2, 1, *shape) and saved[f"{key}_predictions"].dtype == bool
            maps = saved[f"{key}_maps"]
            assert maps.shape == (2, len(METHODS), *shape) and 0 <= maps.min() and maps.max() <= 1
    assert (folder / "attribution_maps.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(path.name for path in folder.iterdir()) == ["attribution_maps.npz", "attribution_maps.png",
                                                             "attribution_metrics.csv"]  # no temporary file left

    atomic_write_csv(run_dir / "sa_layers.csv", ["case", "class", "enc"], [["c0", "fg", "0.5"]])
    report = write_report(run_dir)
    text = report.read_text()
    assert "## Attribution methods compared" in text and "![attribution maps](attribution_maps.png)" in text
    assert "| 2D | all ones (reference) | 1.000 | 1.000 |" in text
    assert (report.parent / "attribution_maps.png").read_bytes() == (folder / "attribution_maps.png").read_bytes()


def test_plot_attribution_maps_draws_a_row_per_case_and_a_column_per_method():
    generator = torch.Generator().manual_seed(0)
    prediction_3d = torch.zeros(1, 12, 12, 8, dtype=torch.bool)
    prediction_3d[:, 3:9, 3:9, 5] = True  # only slice 5 has foreground
    images = [torch.rand(1, 16, 16, generator=generator), torch.rand(2, 12, 12, 8, generator=generator)]
    maps = {name: [torch.rand(1, 16, 16, generator=generator), np.random.default_rng(0).random((12, 12, 8))]
            for name in ("Grad-CAM", "RISE", "ProtoSeg layers")}
    predictions = [torch.rand(1, 16, 16, generator=generator) > 0.5, prediction_3d]
    figure = plot_attribution_maps(images, maps, predictions=predictions, titles=["2D case", "3D case"])
    assert len(figure.axes) == 2 * (2 + 3) + 1  # two rows of image, prediction and 3 maps, and the colorbar
    titles = [axis.get_title() for axis in figure.axes]
    assert titles[:7] == ["2D case\nimage", "prediction", "Grad-CAM", "RISE", "ProtoSeg layers",
                          "3D case, slice 5/8\nimage", "prediction"]
    batch = plot_attribution_maps(torch.rand(3, 1, 8, 8), {"Grad-CAM": torch.rand(3, 1, 8, 8)})
    assert len(batch.axes) == 3 * 3 + 1 and batch.axes[0].get_title() == "case 0\nimage"

    with pytest.raises(ValueError, match="one entry per case"):
        plot_attribution_maps(images, {"Grad-CAM": maps["Grad-CAM"][:1]})
    with pytest.raises(ValueError, match=r"case 1: the map of 'RISE' has shape \(12, 12\)"):
        plot_attribution_maps(images, {"RISE": [maps["RISE"][0], np.zeros((12, 12))]})
    with pytest.raises(ValueError, match="at least one case and one method"):
        plot_attribution_maps(images, {})
