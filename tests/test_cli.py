"""The monai-protoseg command line: report (HTML content checked against the CSV numbers), layers (shapes checked
against the network run with hooks here), demo (the bundle command line), and one-line errors."""

from __future__ import annotations

import base64
import csv
import json
import math
import os
import pathlib
import re
import shutil
import statistics
import struct
import subprocess
import sys
from html.parser import HTMLParser

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import UNet

from monai_protoseg import QualityCalibration, candidate_layers, last_decoder_layers
from monai_protoseg.cli import DEMO_BUNDLE, demo_command, main, output_shapes
from monai_protoseg.io import atomic_write_csv, format_number

ROOT = pathlib.Path(__file__).resolve().parents[1]
# the segmentation bundles; coin_weak_protoseg trains a classifier and a generator, no segmentation network_def
BUNDLES = sorted(path.name for path in (ROOT / "bundles").iterdir()
                 if (path / "configs" / "metadata.json").is_file() and path.name != "coin_weak_protoseg")
LAYERS = ["model.0", "model.1.submodule", "model.2"]
DEMO_ALIASES = ["encoder.1", "encoder.2", "encoder.3", "bottleneck", "decoder.2", "decoder.1", "output"]
"""The aliases of the demo bundle's 4-level UNet's candidate layers, encoder to decoder."""
CLASSES = ["tumour", "<edema & core>"]  # the second needs escaping in HTML


def write_run(folder: pathlib.Path) -> None:
    """The CSV files SAScoreHandler(output_dir=..., unit_wise=True) and MeanSAQualityHandler write, 8 cases."""
    rng = np.random.default_rng(1)
    rows = []
    for case in range(8):
        for k, name in enumerate(CLASSES):
            values = np.clip(rng.normal([0.5, 0.6 - 0.2 * k, 0.7], 0.1), 0, 1)
            if case == 3 and k == 1:
                values[0] = math.nan  # an undefined score, as the handler writes it
            rows.append([f"case_{case:03d}", name, *(format_number(v) for v in values)])
    atomic_write_csv(folder / "sa_layers.csv", ["case", "class", *LAYERS], rows)
    units = [[layer, name, unit, format_number(rng.uniform())] for layer, count in zip(LAYERS, (8, 16, 2))
             for name in CLASSES for unit in range(count)]
    atomic_write_csv(folder / "sa_units.csv", ["layer", "class", "unit", "sa"], units)
    for filename, cases in (("quality_validation.csv", 8), ("quality.csv", 4)):
        header = ["case", "class", "mean_sa", *(f"sa_{layer}" for layer in LAYERS[1:]), "true_dice",
                  "estimated_dice", "review", "note"]
        rows = []
        for case in range(cases):
            for name in CLASSES:
                mean_sa = rng.uniform(0.3, 0.9)
                true_dice, estimated = np.clip(mean_sa + rng.normal(0, 0.05, 2), 0, 1)
                rows.append([f"case_{case:03d}", name, format_number(mean_sa), format_number(mean_sa - 0.01),
                             format_number(mean_sa + 0.01), format_number(true_dice), format_number(estimated),
                             bool(estimated < 0.7), ""])
        atomic_write_csv(folder / filename, header, rows)


def read_rows(path: pathlib.Path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))


class Page(HTMLParser):
    """Checks that tags nest properly and collects the text, the tags and the images of an HTML page."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}
    BLOCKS = {"p", "li", "h1", "h2", "th", "td", "title"}

    def __init__(self, page: str) -> None:
        super().__init__()
        self.doctype, self.open, self.mismatched, self.tags, self.images, self.chunks = None, [], [], set(), [], []
        self.references = []  # every src or href: the page needs nothing outside itself
        self.feed(page)
        self.close()
        self.text = "".join(self.chunks)

    def handle_decl(self, decl: str) -> None:
        self.doctype = decl

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.tags.add(tag)
        self.references += [value for name, value in attrs if name in ("src", "href")]
        if tag == "img":
            self.images.append(dict(attrs))
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open.pop() != tag:
            self.mismatched.append(tag)
        if tag in self.BLOCKS:
            self.chunks.append("\n")

    def handle_data(self, data: str) -> None:
        self.chunks.append(data)


def assert_one_line_error(code: int, captured) -> str:
    assert code != 0
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("monai-protoseg: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def test_report_writes_one_self_contained_html_page(tmp_path, capsys):
    write_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    out = tmp_path / "report"
    assert str(out / "report.html") in capsys.readouterr().out
    assert sorted(path.name for path in out.iterdir()) == [  # both quality CSVs have true and estimated Dice
        "inference_estimate.png", "layer_sa.png", "quality.png", "quality_estimate.png", "report.html", "report.md",
        "unit_sa.png"]
    source = (out / "report.html").read_text(encoding="utf-8")
    page = Page(source)
    assert page.doctype == "DOCTYPE html" and not page.open and not page.mismatched
    assert {"html", "head", "meta", "title", "body", "h1", "table", "img"} <= page.tags
    assert not page.tags & {"script", "link", "iframe", "object"}
    assert len(page.references) == 5 and all(reference.startswith("data:image/png;base64,")
                                              for reference in page.references)
    assert '<html lang="en">' in source and '<meta charset="utf-8">' in source

    # figures: embedded PNGs, the same bytes as the files beside the report
    assert [image["alt"] for image in page.images] == ["layer-wise SA", "unit-wise SA", "mean SA vs true Dice",
                                                       "estimated vs true Dice, validation",
                                                       "estimated vs true Dice, held-out cases"]
    prefix = "data:image/png;base64,"
    png = base64.b64decode(page.images[0]["src"][len(prefix):], validate=True)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = struct.unpack(">II", png[16:24])
    assert width > 300 and height > 200
    assert png == (out / "layer_sa.png").read_bytes()

    # the class name is escaped, and reads back as written
    assert "<edema" not in source and "&lt;edema &amp; core&gt;" in source

    # best layer per class, computed here from the CSV
    rows = read_rows(tmp_path / "sa_layers.csv")
    for name in CLASSES:
        means = {layer: statistics.fmean(v for row in rows if row["class"] == name
                                         if not math.isnan(v := float(row[layer]))) for layer in LAYERS}
        best = max(means, key=means.get)
        assert f"Class {name} segments best at layer {best} (mean SA {means[best]:.3f})" in page.text

    # active units per layer and class, counted here
    units = read_rows(tmp_path / "sa_units.csv")
    for layer in LAYERS:
        for name in CLASSES:
            scores = [float(row["sa"]) for row in units if row["layer"] == layer and row["class"] == name]
            active = sum(score > 0.5 for score in scores)
            assert f"\n{layer}, {name}: {active} of {len(scores)} ({active / len(scores):.0%})\n" in page.text

    # how well mean SA tracked true Dice: Pearson r and the calibration on validation, the error on held-out cases
    validation = read_rows(tmp_path / "quality_validation.csv")
    mean_sa, true_dice = ([float(row[column]) for row in validation] for column in ("mean_sa", "true_dice"))
    calibration = QualityCalibration.fit(mean_sa, true_dice)
    assert f"Pearson r {statistics.correlation(mean_sa, true_dice):.3f}" in page.text
    assert f"calibration MAE {calibration.mae:.3f} in-sample, {calibration.loo_mae:.3f} leave-one-out" in page.text
    held_out = read_rows(tmp_path / "quality.csv")
    errors = [abs(float(row["estimated_dice"]) - float(row["true_dice"])) for row in held_out]
    assert f"off by {statistics.fmean(errors):.3f} on average (max {max(errors):.3f})" in page.text
    flagged = sum(row["review"] == "True" for row in held_out)
    assert f"{flagged} flagged for review" in page.text

    # the Markdown report says the same (one set of sections, two renderings)
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert f"- `{LAYERS[0]}`, tumour: " in markdown and "![layer-wise SA](layer_sa.png)" in markdown


def test_report_options(tmp_path, capsys):
    write_run(tmp_path)
    assert main(["report", str(tmp_path), "--output-dir", str(tmp_path / "elsewhere"), "--active-threshold",
                 "0.25"]) == 0
    text = Page((tmp_path / "elsewhere" / "report.html").read_text(encoding="utf-8")).text
    scores = [float(row["sa"]) for row in read_rows(tmp_path / "sa_units.csv")
              if row["layer"] == "model.2" and row["class"] == "tumour"]
    assert f"model.2, tumour: {sum(score > 0.25 for score in scores)} of 2 " in text
    assert "Units with SA > 0.25 (active)" in text and not (tmp_path / "report").exists()


def bad_csv(folder: pathlib.Path, header: str, *lines: str) -> pathlib.Path:
    folder.mkdir()
    (folder / "sa_layers.csv").write_text("\n".join([header, *lines]) + "\n")
    return folder


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing folder", "no run folder"),
        ("no SA results", "no SA results in"),
        ("missing column", "is not the expected CSV: it has no column(s) class"),
        ("not a number", "column 'model.0' holds a value that is not a number"),
        ("ragged row", "line 2: the number of cells differs"),
        ("binary file", "is not a readable CSV file"),
        ("bad threshold", "--active-threshold must be between 0 and 1"),
    ],
)
def test_report_errors_are_one_line(tmp_path, capsys, case, expected):
    run, extra = tmp_path / "run", []
    if case == "no SA results":
        run.mkdir()
        (run / "quality.csv").write_text("case,class\n")
    elif case == "missing column":
        bad_csv(run, "case,klass,model.0", "c0,fg,0.5")
    elif case == "not a number":
        bad_csv(run, "case,class,model.0", "c0,fg,high")
    elif case == "ragged row":
        bad_csv(run, "case,class,model.0", "c0,fg,0.5,0.7")
    elif case == "binary file":
        run.mkdir()
        (run / "sa_layers.csv").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe")
    elif case == "bad threshold":
        write_run(tmp_path)
        run, extra = tmp_path, ["--active-threshold", "1.5"]
    line = assert_one_line_error(main(["report", str(run), *extra]), capsys.readouterr())
    assert expected in line
    if case not in ("missing folder", "bad threshold"):
        assert "sa_layers.csv" in line


def run_layers(capsys, *args: str) -> tuple[str, list[tuple[str, str, str, str, str]]]:
    """The header line and the table rows (name, type, output shape, marks, alias) ``layers`` prints."""
    assert main(["layers", *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert re.split(r"\s{2,}", lines[1]) == ["layer", "type", "output shape", "probe", "alias"]
    rows = []
    for line in lines[2:lines.index("")]:
        cells = re.split(r"\s{2,}", line.strip())
        rows.append((*cells, "", "") if len(cells) == 3 else tuple(cells))
    return lines[0], rows


def all_output_shapes(network: torch.nn.Module, image: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes = {}

    def record(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        shapes[names[module]] = tuple(output.shape)

    names = {module: name for name, module in network.named_modules() if name}
    handles = [module.register_forward_hook(record) for module in names]
    with torch.no_grad():
        network(image)
    for handle in handles:
        handle.remove()
    return shapes


def test_layers_of_the_demo_bundle(capsys):
    bundle = ROOT / "bundles" / "protoseg_demo"
    image = json.loads((bundle / "configs" / "metadata.json").read_text())["network_data_format"]["inputs"]["image"]
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "train.json")
    network = parser.get_parsed_content("network_def").eval()
    sample = torch.rand(1, image["num_channels"], *image["spatial_shape"])
    expected = all_output_shapes(network, sample)

    header, rows = run_layers(capsys, str(bundle))
    assert f"input {tuple(sample.shape)} -> output {tuple(network(sample).shape)}" in header
    listed = {name: (kind, shape, marks, alias) for name, kind, shape, marks, alias in rows}
    candidates, quality = candidate_layers(network), last_decoder_layers(network)
    for name in candidates:
        kind, shape, marks, _ = listed[name]
        assert shape == str(expected[name]) and kind == type(network.get_submodule(name)).__name__
        assert marks == ("SA, quality" if name in quality else "SA")
    for name, (_, shape, marks, alias) in listed.items():
        assert shape == str(expected[name])
        assert marks == alias == "" or name in candidates
    assert [listed[name][3] for name in candidates] == DEMO_ALIASES
    assert [name for name in listed if name in candidates] == candidates  # encoder to decoder order

    _, every = run_layers(capsys, str(bundle), "--all")
    assert {name for name, *_ in every} == set(expected) and len(every) > len(rows)


@pytest.mark.parametrize("bundle", BUNDLES)
def test_layers_of_every_bundle(capsys, bundle):
    header, rows = run_layers(capsys, str(ROOT / "bundles" / bundle))
    parser = ConfigParser()
    parser.read_config(ROOT / "bundles" / bundle / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    marks = {name: mark for name, _, _, mark, _ in rows}
    assert all(marks[name].startswith("SA") for name in candidate_layers(network))
    assert [name for name, mark in marks.items() if "quality" in mark] == last_decoder_layers(network)


def test_output_shapes_always_removes_its_hooks():
    network = UNet(2, 1, 1, channels=(4, 8), strides=(2,)).eval()
    shapes, output = output_shapes(network, torch.rand(1, 1, 8, 8))
    assert shapes["model.0"] == (1, 4, 4, 4) and shapes["model.2"] == tuple(output.shape) == (1, 1, 8, 8)
    with pytest.raises(RuntimeError):
        output_shapes(network, torch.rand(1, 3, 8, 8))  # wrong number of channels
    assert not any(module._forward_hooks for module in network.modules())


def tiny_bundle(folder: pathlib.Path) -> pathlib.Path:
    """A bundle whose network width is read relative to bundle_root, with instance norm (too small at n=1) and a
    dataset that fails if built."""
    (folder / "configs").mkdir(parents=True)
    (folder / "width.txt").write_text("4")
    config = {
        "imports": ["$import os"],
        "bundle_root": ".",
        "width": "$int(open(os.path.join(@bundle_root, 'width.txt')).read())",
        "network_def": {"_target_": "UNet", "spatial_dims": 2, "in_channels": 2, "out_channels": 1,
                        "channels": ["@width", "$2 * @width", "$4 * @width"], "strides": [2, 2], "norm": "instance"},
        "dataset": {"_target_": "Dataset", "data": "$open('/no/such/datalist.json').read()"},
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(config))
    image = {"num_channels": 2, "spatial_shape": ["4*n", "4*n"]}
    (folder / "configs" / "metadata.json").write_text(json.dumps({"network_data_format": {"inputs": {"image": image}}}))
    return folder


def test_layers_builds_only_the_network_at_the_smallest_size_that_runs(tmp_path, capsys):
    bundle = tiny_bundle(tmp_path / "bundle")
    # n=1 gives 4x4: a 1x1 bottom block, where instance norm fails; n=2 gives 8x8
    header, rows = run_layers(capsys, str(bundle))
    assert "input (1, 2, 8, 8) -> output (1, 1, 8, 8)" in header
    assert rows[1][:3] == ("model.0", "Convolution", "(1, 4, 4, 4)")
    header, rows = run_layers(capsys, str(bundle / "configs" / "inference.json"), "--shape", "2,16,24")
    assert "input (1, 2, 16, 24)" in header and rows[1][2] == "(1, 4, 8, 12)"


@pytest.mark.parametrize(
    "make, args, expected",
    [
        (None, [], "no bundle folder or config file"),
        ("folder", [], "is not a bundle folder"),
        ("broken json", [], "cannot read"),
        ("unbuildable", [], "cannot build network_def of"),
        ("bundle", ["--network-id", "net"], "has no 'net'"),
        ("bundle", ["--shape", "2,x,8"], "bad --shape '2,x,8'"),
        ("bundle", ["--shape", "2,0,8"], "bad --shape"),
        ("bundle", ["--shape", "1,2,3,4,5"], "bad --shape"),
        ("bundle", ["--shape", "2,3,3"], "does not run on input (1, 2, 3, 3)"),
        ("no metadata", [], "no metadata.json beside"),
    ],
)
def test_layers_errors_are_one_line(tmp_path, capsys, make, args, expected):
    source = tmp_path / "nowhere"
    if make == "folder":
        source.mkdir()
    elif make == "broken json":
        source = tmp_path / "net.json"
        source.write_text('{"network_def": ')
    elif make == "unbuildable":
        source = tmp_path / "net.json"
        source.write_text('{"network_def": {"_target_": "UNet", "spatial_dims": 2}}')
    elif make == "bundle":
        source = tiny_bundle(tmp_path / "bundle")
    elif make == "no metadata":
        source = tiny_bundle(tmp_path / "bundle") / "configs" / "inference.json"
        (source.parent / "metadata.json").unlink()
    line = assert_one_line_error(main(["layers", str(source), *args]), capsys.readouterr())
    assert expected in line


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["report"], "the following arguments are required: RUN_DIR"),
        (["report", "run", "--epochs", "2"], "unrecognized arguments: --epochs 2"),
        (["demo", "--bundle-root", "/no/such/bundle"], "no demo bundle at /no/such/bundle"),
    ],
)
def test_usage_errors_are_one_line(capsys, argv, expected):
    assert expected in assert_one_line_error(main(argv), capsys.readouterr())


@pytest.mark.parametrize("command", ["report", "layers", "demo"])
def test_help_of_each_command(capsys, command):
    assert main([command, "--help"]) == 0
    assert capsys.readouterr().out.startswith(f"usage: monai-protoseg {command}")


def test_demo_command_is_make_demo():
    assert DEMO_BUNDLE == ROOT / "bundles" / "protoseg_demo" and (DEMO_BUNDLE / "configs" / "train.json").is_file()
    assert demo_command(DEMO_BUNDLE, ["--epochs", "2", "--output_dir", "/tmp/x"]) == [
        sys.executable, "-m", "monai_protoseg", "run", "--config_file", str(DEMO_BUNDLE / "configs" / "train.json"),
        "--bundle_root", str(DEMO_BUNDLE), "--epochs", "2", "--output_dir", "/tmp/x"]


def test_demo_passes_bundle_options_on_and_returns_the_exit_code(monkeypatch, capsys):
    commands = []

    def fake_run(command, check):
        commands.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert main(["demo", "--epochs", "2", "--output_dir", "/tmp/x", "--device", "cpu"]) == 3
    assert main(["demo", "--", "--help"]) == 3
    assert commands == [demo_command(DEMO_BUNDLE, ["--epochs", "2", "--output_dir", "/tmp/x", "--device", "cpu"]),
                        demo_command(DEMO_BUNDLE, ["--help"])]


def test_demo_runs_the_bundle(tmp_path, capsys):
    bundle = tmp_path / "bundle"
    (bundle / "configs").mkdir(parents=True)
    config = {"imports": ["$import pathlib"], "bundle_root": ".", "output_dir": "$@bundle_root", "epochs": 40,
              "run": ["$pathlib.Path(@output_dir, 'ran.txt').write_text(str(@epochs) + ' ' + @bundle_root)"]}
    (bundle / "configs" / "train.json").write_text(json.dumps(config))
    assert main(["demo", "--bundle-root", str(bundle), "--epochs", "2", "--output_dir", str(tmp_path)]) == 0
    assert (tmp_path / "ran.txt").read_text() == f"2 {bundle}"


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, "-m", "monai_protoseg", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("usage: monai-protoseg")
    assert all(command in result.stdout for command in ("report", "layers", "demo"))


def test_console_script_report(tmp_path):
    script = shutil.which("monai-protoseg", path=os.pathsep.join([os.path.dirname(sys.executable),
                                                                   os.environ.get("PATH", "")]))
    if script is None:
        pytest.skip("the monai-protoseg console script is not installed")
    write_run(tmp_path)
    result = subprocess.run([script, "report", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert Page((tmp_path / "report" / "report.html").read_text(encoding="utf-8")).images
    result = subprocess.run([script, "report", str(tmp_path / "missing")], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 1 and result.stderr == f"monai-protoseg: error: no run folder {tmp_path / 'missing'}\n"
