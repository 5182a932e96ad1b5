"""Reports from run CSVs: readers, table numbers, figures, the Markdown and HTML reports built from one set of
sections, errors naming the file."""

from __future__ import annotations

import html
import math
import re

import numpy as np
import torch
import pytest

from monai_protoseg import QualityCalibration, report
from monai_protoseg.io import atomic_write_csv
from monai_protoseg.report import (
    BulletList,
    Paragraph,
    PNGImage,
    RunFiles,
    Section,
    build_sections,
    layer_table,
    plot_layer_sa,
    plot_quality,
    plot_unit_sa,
    read_layer_scores,
    read_quality,
    read_unit_scores,
    render_html,
    render_markdown,
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
    assert sorted(path.name for path in (tmp_path / "elsewhere").iterdir()) == ["layer_sa.png", "report.html",
                                                                                 "report.md"]


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
    atomic_write_csv(tmp_path / "sa_layers.csv", ["case", "class", "enc"], [["c0", "pz", "0.5"], ["c1", "pz"]])
    with pytest.raises(ValueError, match=r"sa_layers.csv, line 3: the number of cells differs from the header's 3"):
        read_layer_scores(tmp_path / "sa_layers.csv")
    (tmp_path / "sa_units.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff")
    with pytest.raises(ValueError, match="sa_units.csv is not a readable CSV file"):
        read_unit_scores(tmp_path / "sa_units.csv")
    assert math.isnan(read_quality(write_quality_nan(tmp_path)).mean_sa[0])


def write_quality_nan(folder):
    return atomic_write_csv(folder / "q.csv", ["case", "class", "mean_sa", "estimated_dice", "review", "note"],
                            [["c0", "fg", "nan", "nan", "True", "empty prediction: SA undefined"]])


def page_text(page: str) -> str:
    """The text of an HTML page: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_markdown_and_html_render_the_same_sections(tmp_path):
    write_run(tmp_path)
    sections = build_sections(RunFiles(tmp_path))
    assert [section.title for section in sections] == [
        "Summary", "Layer-wise segmentation ability (validation, against the ground truth)",
        "Unit-wise segmentation ability", "Quality estimate: mean SA against true Dice (validation)",
        "Inference: estimated quality without ground truth"]
    findings = sections[0].blocks[0].items
    assert findings == [line for section in sections[1:] for line in section.summary] and len(findings) == 5
    markdown, page = render_markdown(sections, tmp_path), render_html(sections, tmp_path)
    text = page_text(page)
    for line in findings:
        assert f"- {line}" in markdown.splitlines()
        assert line.replace("`", "") in text
    assert "<code>enc</code>, pz: 2 of 8 (25%)</li>" in page


def test_a_new_section_is_one_more_builder(tmp_path, monkeypatch):
    write_run(tmp_path, units=False, inference=False)
    png = (write_report(tmp_path).parent / "layer_sa.png").read_bytes()

    def prototype_maps(run: RunFiles) -> Section:
        return Section("Prototype maps", summary=["2 maps of `dec` <drawn>."],
                       blocks=[Paragraph("Maps & more."), BulletList(["`a`"]), PNGImage("maps.png", "maps", png)])

    monkeypatch.setattr(report, "SECTIONS", [*report.SECTIONS, prototype_maps])
    markdown = write_report(tmp_path)
    text, page = markdown.read_text(), markdown.with_name("report.html").read_text()
    assert text.endswith("## Prototype maps\n\nMaps & more.\n\n- `a`\n\n![maps](maps.png)\n")
    assert "- 2 maps of `dec` <drawn>." in text
    assert "<li>2 maps of <code>dec</code> &lt;drawn&gt;.</li>" in page and "<h2>Prototype maps</h2>" in page
    assert "<p>Maps &amp; more.</p>" in page and page.count("data:image/png;base64,") == 3
    assert (markdown.parent / "maps.png").read_bytes() == png


def test_prototype_map_snapshots_become_a_section_with_one_figure(tmp_path):
    from monai_protoseg import save_snapshot, take_snapshot

    write_run(tmp_path, units=False, inference=False)
    generator = torch.Generator().manual_seed(0)
    for case in ("c0", "c1"):
        prob = torch.rand(16, 16, generator=generator)
        maps = {layer: torch.rand(16, 16, generator=generator) for layer in LAYERS}
        snapshot = take_snapshot(torch.rand(1, 16, 16, generator=generator), prob, maps, prob > 0.5, case=case,
                                 class_name="pz")
        save_snapshot(tmp_path / "prototype_maps" / f"{case}_pz.npz", snapshot)
    report = write_report(tmp_path)
    text = report.read_text()
    assert "## Prototype maps" in text and "2 case-class pair(s): `c0`, `c1`" in text
    assert "![prototype maps](prototype_maps.png)" in text
    assert (report.parent / "prototype_maps.png").read_bytes()[:4] == b"\x89PNG"
    page = (report.parent / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3  # layer-wise, prototype maps, quality


def test_attribution_results_become_a_section_with_their_table_and_figure(tmp_path):
    write_run(tmp_path, units=False, inference=False)
    columns = ["task", "method", "reference", "cases", "prediction_preserved", "image_preserved", "deletion_auc",
               "insertion_auc", "seconds_per_case"]
    atomic_write_csv(tmp_path / "attribution" / "attribution_metrics.csv", columns, [
        ["2D", "Grad-CAM", "False", "8", "0.831000", "0.339000", "0.508000", "0.750000", "0.005271"],
        ["2D", "ProtoSeg layers", "False", "8", "0.892000", "0.236000", "0.226000", "0.905000", "0.003590"],
        ["2D", "random (reference)", "True", "8", "0.943000", "0.502000", "0.100000", "0.847000", "0.000027"],
        ["3D", "Grad-CAM", "False", "4", "nan", "0.089000", "nan", "nan", "0.017510"],
    ])
    text = write_report(tmp_path).read_text()
    assert "## Attribution methods compared" in text
    # the summary names the lowest deletion AUC among the methods (not the reference rows); 3D has none defined
    assert ("- Attribution on the 2D task (8 cases): the lowest deletion AUC of 2 methods is ProtoSeg layers "
            "(0.226).") in text.splitlines()
    assert "Attribution on the 3D task" not in text
    assert "| 2D | random (reference) | 0.943 | 0.502 | 0.100 | 0.847 | 2.7e-05 |" in text.splitlines()
    assert "| 3D | Grad-CAM | - | 0.089 | - | - | 0.0175 |" in text.splitlines()
    assert "attribution_maps.png" not in text  # no figure saved: none shown

    png = (tmp_path / "report" / "layer_sa.png").read_bytes()
    (tmp_path / "attribution" / "attribution_metrics.csv").unlink()
    (tmp_path / "attribution" / "attribution_maps.png").write_bytes(png)
    report = write_report(tmp_path)
    text = report.read_text()
    assert "## Attribution methods compared" in text and "![attribution maps](attribution_maps.png)" in text
    assert (report.parent / "attribution_maps.png").read_bytes() == png
    assert report.with_name("report.html").read_text().count("data:image/png;base64,") == 3  # layer SA, maps, quality
