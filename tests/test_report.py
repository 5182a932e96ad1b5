"""Reports from run CSVs: readers, table numbers, figures, the Markdown and HTML reports built from one set of
sections, errors naming the file."""

from __future__ import annotations

import ast
import html
import math
import pathlib
import re

import numpy as np
import torch
import pytest

from monai_protoseg import QualityCalibration, report
from monai_protoseg.handlers.quality_report import plot_estimates, plot_quality, read_quality
from monai_protoseg.handlers.sa_report import (
    layer_sa_table,
    plot_layer_sa,
    plot_unit_sa,
    read_layer_scores,
    read_unit_scores,
)
from monai_protoseg.io import atomic_write_csv
from monai_protoseg.layer_names import write_layer_names
from monai_protoseg.report import build_sections, render_html, render_markdown, write_report
from monai_protoseg.sections import BulletList, Paragraph, PNGImage, RunFiles, Section

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
    table = layer_sa_table(scores)
    tz_mid = scores.of_class("tz")[:, 1]
    defined = tz_mid[~np.isnan(tz_mid)]
    q25, q75 = np.percentile(defined, [25, 75])
    expected = ["`mid`", "tz", f"{defined.mean():.3f}", f"{np.median(defined):.3f}", f"{q25:.3f}-{q75:.3f}", "1"]
    assert expected in table.rows and len(table.rows) == len(LAYERS) * 2
    assert table.header == ["layer", "class", "mean SA", "median", "25-75%", "undefined"]
    with_names = layer_sa_table(scores, {"enc": "model.0", "mid": "model.1.submodule"})  # dec: not in the file
    assert with_names.header[:3] == ["layer", "qualified name", "class"] and len(with_names.right) == 7
    assert ["`mid`", "`model.1.submodule`", *expected[1:]] in with_names.rows
    assert [row[:2] for row in with_names.rows[-2:]] == [["`dec`", "-"], ["`dec`", "-"]]


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
        "Unit-wise segmentation ability", "Quality estimate (validation, against the ground truth)",
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
    assert "<p>Maps &amp; more.</p>" in page and page.count("data:image/png;base64,") == 4  # + SA, quality (2)
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
    assert page.count("data:image/png;base64,") == 4  # layer-wise, prototype maps, quality (mean SA, estimate)


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
    assert report.with_name("report.html").read_text().count("data:image/png;base64,") == 4  # SA, 2 quality, maps


def test_quality_section_shows_the_estimate_against_the_true_dice_with_its_interval(tmp_path):
    write_run(tmp_path, units=False)
    true_dice = [0.9, 0.5, 0.7, 0.2]
    estimate, low, high = [0.85, 0.6, 0.7, 0.35], [0.75, 0.55, 0.6, 0.3], [0.95, 0.7, 0.8, 0.4]  # 2nd, 4th miss
    columns = ["case", "class", "mean_sa", "true_dice", "estimated_dice", "estimate_low", "estimate_high", "review",
               "note"]
    atomic_write_csv(tmp_path / "quality.csv", columns, [
        [f"t{i}", "pz", "0.5", true_dice[i], estimate[i], low[i], high[i], "False", "estimator (all)"]
        for i in range(4)])
    atomic_write_csv(tmp_path / "quality_cv.csv", ["feature_set", "features", "n_rows", "cv_r", "cv_mae", "chosen"],
                     [["mean_sa", "mean_sa", "12", "0.61234", "0.1", "False"],
                      ["sa_profile", "sa_model.0 sa_model.2", "12", "0.8", "0.05", "True"]])
    write_layer_names(tmp_path, {"model.0": "enc", "model.2": "dec"})
    rows = read_quality(tmp_path / "quality.csv")
    np.testing.assert_array_equal(rows.estimate_low, low)
    assert read_quality(tmp_path / "quality_validation.csv").estimate_low is None  # an older file: no interval

    figure = plot_estimates(rows, "Held-out cases: estimated vs true Dice")
    title = figure.axes[0].get_title()
    mae = np.abs(np.subtract(estimate, true_dice)).mean()
    assert f"(4 case-class pairs)\nMAE {mae:.3f}, interval holds the true Dice in 2 of 4" in title
    bars = figure.axes[0].containers[0]  # one errorbar container per class
    segments = bars.lines[2][0].get_segments()
    np.testing.assert_allclose([segment[:, 1] for segment in segments], np.stack([low, high], axis=1))

    report = write_report(tmp_path)
    text = report.read_text()
    assert "![estimated vs true Dice, held-out cases](inference_estimate.png)" in text
    assert "![estimated vs true Dice, validation](quality_estimate.png)" in text
    assert "| feature_set | features | n_rows | cv_r | cv_mae | chosen |" in text
    assert "| sa_profile | sa_enc, sa_dec | 12 | 0.800 | 0.050 | True |" in text  # features named by alias
    assert "| mean_sa | mean_sa | 12 | 0.612 | 0.100 | False |" in text
    for name in ("quality.png", "quality_estimate.png", "inference_estimate.png"):
        assert (report.parent / name).read_bytes()[:4] == b"\x89PNG"


def test_layer_section_names_each_alias_and_its_qualified_name(tmp_path):
    write_run(tmp_path, units=False, inference=False)
    write_layer_names(tmp_path, {"model.0": "enc", "model.1.submodule": "mid", "model.2": "dec"})
    text = write_report(tmp_path).read_text()
    lines = text.splitlines()
    assert "| layer | qualified name | class | mean SA | median | 25-75% | undefined |" in lines
    assert sum(line.startswith("| `mid` | `model.1.submodule` | ") for line in lines) == 2  # one row per class
    assert "`layer_names.csv` pairs them." in text


def test_report_is_a_renderer_that_no_part_imports():
    """report imports the parts' section builders; no part imports report, and figures and sections (what every part
    builds with) import nothing of the package but io, so no import cycle runs through the report."""
    graph = import_graph()
    assert [name for name, imports in graph.items() if "monai_protoseg.report" in imports] == ["monai_protoseg.cli"]
    for low in ("monai_protoseg.figures", "monai_protoseg.sections"):
        assert graph[low] <= {"monai_protoseg.io"}
    parts: dict[str, set[str]] = {}
    for name, imports in graph.items():
        parts.setdefault(part_of(name), set()).update(
            part_of(other) for other in imports if part_of(other) != part_of(name))
    cycles = [component for component in strongly_connected(parts) if len(component) > 1]
    assert not [component for component in cycles
                if component & {"report", "figures", "sections", "weak", "attribution", "maps", "layer_names"}]
    assert {builder.__module__ for builder in report.SECTIONS} == {
        "monai_protoseg.handlers.sa_report", "monai_protoseg.maps", "monai_protoseg.handlers.quality_report",
        "monai_protoseg.attribution.report", "monai_protoseg.weak.report"}


PACKAGE = pathlib.Path(report.__file__).parent


def import_graph() -> dict[str, set[str]]:
    """``{module: the package's modules it imports}``, function-level imports included, from the source."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        imports = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
                for alias in node.names:
                    imports.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
            elif isinstance(node, ast.Import):
                imports.update(alias.name for alias in node.names)
        graph[name] = {other for other in imports if other in modules}
    return graph


def part_of(module: str) -> str:
    """``monai_protoseg.weak.report`` -> ``weak``; the package itself -> ``__init__``."""
    return module.split(".")[1] if "." in module else "__init__"


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of ``graph`` (Kosaraju)."""
    order, seen = [], set()

    def visit(node: str, edges: dict[str, set[str]], out: list[str]) -> None:
        stack = [(node, iter(edges.get(node, ())))]
        seen.add(node)
        while stack:
            current, children = stack[-1]
            child = next((c for c in children if c not in seen), None)
            if child is None:
                stack.pop()
                out.append(current)
            else:
                seen.add(child)
                stack.append((child, iter(edges.get(child, ()))))

    nodes = set(graph) | {other for edges in graph.values() for other in edges}
    for node in nodes:
        if node not in seen:
            visit(node, graph, order)
    reverse: dict[str, set[str]] = {}
    for node, edges in graph.items():
        for other in edges:
            reverse.setdefault(other, set()).add(node)
    seen.clear()
    components = []
    for node in reversed(order):
        if node not in seen:
            component: list[str] = []
            visit(node, reverse, component)
            components.append(set(component))
    return components

