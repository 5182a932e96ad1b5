"""Reports from run CSVs: readers, table numbers, figures, the Markdown report, errors naming the file."""

from __future__ import annotations

import math

import numpy as np
import pytest

from monai_protoseg import QualityCalibration
from monai_protoseg.io import atomic_write_csv
from monai_protoseg.report import (
    layer_table,
    plot_layer_sa,
    plot_quality,
    plot_unit_sa,
    read_layer_scores,
    read_quality,
    read_unit_scores,
    write_report,
)

LAYERS = ["enc", "mid", "dec"]


def write_run(folder, *, units=True, inference=True):
    """A run folder with the files SAScoreHandler and MeanSAQualityHandler write: 6 cases, 2 classes."""
    rng = np.random.default_rng(0)
    layer_rows = []
    for case in range(6):
        for name in ("pz", "tz"):
            values = rng.uniform(0.3, 0.9, len(LAYERS))
            if case == 0 and name == "tz":
                values[1] = np.nan
            layer_rows.append([f"c{case}", name, *(f"{v:.6f}" if not np.isnan(v) else "nan" for v in values)])
    atomic_write_csv(folder / "sa_layers.csv", ["case", "class", *LAYERS], layer_rows)
    if units:
        atomic_write_csv(folder / "sa_units.csv", ["layer", "class", "unit", "sa"],
                         [[layer, name, unit, f"{0.1 * unit:.6f}"] for layer in LAYERS for name in ("pz", "tz")
                          for unit in range(8)])
    mean_sa = np.linspace(0.4, 0.9, 12)
    true_dice = np.clip(mean_sa + rng.normal(0, 0.03, 12), 0, 1)
    columns = ["case", "class", "mean_sa", "true_dice", "estimated_dice", "review", "note"]
    atomic_write_csv(folder / "quality_validation.csv", columns,
                     [[f"c{i // 2}", ("pz", "tz")[i % 2], f"{mean_sa[i]:.6f}", f"{true_dice[i]:.6f}", "0.5", "False",
                       ""] for i in range(12)])
    if inference:
        atomic_write_csv(folder / "quality.csv", ["case", "class", "mean_sa", "estimated_dice", "review", "note"],
                         [["new0", "pz", "0.800000", "0.810000", "False", ""],
                          ["new0", "tz", "0.300000", "0.320000", "True", ""]])
    return mean_sa, true_dice


def test_layer_table_numbers_match_numpy(tmp_path):
    write_run(tmp_path)
    scores = read_layer_scores(tmp_path / "sa_layers.csv")
    assert scores.layers == LAYERS and scores.class_names() == ["pz", "tz"]
    table = layer_table(scores)
    tz_mid = scores.of_class("tz")[:, 1]
    defined = tz_mid[~np.isnan(tz_mid)]
    q25, q75 = np.percentile(defined, [25, 75])
    expected = f"| `mid` | tz | {defined.mean():.3f} | {np.median(defined):.3f} | {q25:.3f}-{q75:.3f} | 1 |"
    assert expected in table.splitlines()
    assert len(table.splitlines()) == 2 + len(LAYERS) * 2


def test_figures_draw_one_line_per_class_and_layer(tmp_path):
    mean_sa, true_dice = write_run(tmp_path)
    figure = plot_layer_sa(read_layer_scores(tmp_path / "sa_layers.csv"))
    assert len(figure.axes[0].lines) == 2  # one mean line per class
    figure = plot_unit_sa(read_unit_scores(tmp_path / "sa_units.csv"), threshold=0.45)
    assert len(figure.axes) == 2 and len(figure.axes[0].lines) == len(LAYERS) + 1  # + threshold line
    assert "38% active (8 units)" in figure.axes[0].get_legend().get_texts()[0].get_text()  # 0.5, 0.6, 0.7 > 0.45
    calibration = QualityCalibration.fit(mean_sa, true_dice)
    figure = plot_quality(read_quality(tmp_path / "quality_validation.csv"), calibration)
    assert f"Pearson r {calibration.pearson_r:.2f}" in figure.axes[0].get_title()


def test_write_report_writes_markdown_and_pngs(tmp_path):
    mean_sa, true_dice = write_run(tmp_path)
    report = write_report(tmp_path)
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    assert f"Pearson r {np.corrcoef(mean_sa, true_dice)[0, 1]:.3f}" in text
    assert "1 flagged for review: new0 (tz)." in text
    assert "- `enc`, pz: 2 of 8 (25%)" in text  # unit SA 0.0, 0.1, ..., 0.7: only 0.6 and 0.7 are above 0.5
    for name in ("layer_sa.png", "unit_sa.png", "quality.png"):
        assert (tmp_path / "report" / name).read_bytes()[:4] == b"\x89PNG"


def test_report_without_optional_files(tmp_path):
    write_run(tmp_path, units=False, inference=False)
    (tmp_path / "quality_validation.csv").unlink()
    text = write_report(tmp_path, tmp_path / "elsewhere").read_text()
    assert "Unit-wise" not in text and "Inference" not in text and "Quality" not in text
    assert sorted(path.name for path in (tmp_path / "elsewhere").iterdir()) == ["layer_sa.png", "report.md"]


def test_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        write_report(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="sa_layers.csv"):
        write_report(tmp_path)
    atomic_write_csv(tmp_path / "sa_layers.csv", ["case", "klass", "enc"], [["c0", "pz", "0.5"]])
    with pytest.raises(ValueError, match=r"sa_layers.csv is not the expected CSV: it has no column\(s\) class"):
        read_layer_scores(tmp_path / "sa_layers.csv")
    atomic_write_csv(tmp_path / "sa_layers.csv", ["case", "class", "enc"], [["c0", "pz", "high"]])
    with pytest.raises(ValueError, match="column 'enc' holds a value that is not a number"):
        read_layer_scores(tmp_path / "sa_layers.csv")
    atomic_write_csv(tmp_path / "sa_layers.csv", ["case", "class", "enc"], [])
    with pytest.raises(ValueError, match="has no rows"):
        read_layer_scores(tmp_path / "sa_layers.csv")
    assert math.isnan(read_quality(write_quality_nan(tmp_path)).mean_sa[0])


def write_quality_nan(folder):
    return atomic_write_csv(folder / "q.csv", ["case", "class", "mean_sa", "estimated_dice", "review", "note"],
                            [["c0", "fg", "nan", "nan", "True", "empty prediction: SA undefined"]])
