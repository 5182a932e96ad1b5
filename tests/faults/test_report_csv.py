"""The CSV readers of ``monai-protoseg report`` refuse what would be reported wrong: a file cut short, a malformed
row, a score outside [0, 1]; they read what Excel saves (byte-order mark, CRLF); a file whose every SA is undefined
gives a report that says so."""

from __future__ import annotations

import csv
import hashlib
import math
import pathlib

import numpy as np
import pytest

from monai_protoseg.attribution.report import read_attribution_metrics
from monai_protoseg.cli import main
from monai_protoseg.handlers.quality_report import read_quality
from monai_protoseg.handlers.sa_report import read_layer_scores, read_unit_scores
from monai_protoseg.io import atomic_write_csv
from monai_protoseg.report import write_report
from tests.test_report import LAYERS, write_run

READERS = {
    "sa_layers.csv": read_layer_scores,
    "sa_units.csv": read_unit_scores,
    "quality_validation.csv": read_quality,
    "quality.csv": read_quality,
}
"""Every CSV file of a run folder and the function that reads it."""


def digests(folder: pathlib.Path) -> dict[str, str]:
    """The sha256 of every file under ``folder``, by relative path."""
    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file()}


def one_line_error(code: int, captured) -> str:
    """The one ``monai-protoseg: error:`` line of a failed command."""
    assert code == 1
    lines = captured.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("monai-protoseg: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[0]


def set_cell(path: pathlib.Path, row: int, column: str, value: str) -> int:
    """Rewrite one cell of the CSV ``path`` (``row`` counts data rows from 0); the file's line number of that row."""
    with open(path, newline="", encoding="utf-8") as stream:
        rows = list(csv.reader(stream))
    rows[row + 1][rows[0].index(column)] = value
    atomic_write_csv(path, rows[0], rows[1:])
    return row + 2


def cut_in_the_middle_of_line(data: bytes, line: int) -> bytes:
    """``data`` up to the middle of the last cell of ``line`` (1-based): what a copy that stopped there leaves."""
    end = sum(len(text) for text in data.splitlines(keepends=True)[:line]) - 1  # the line's newline
    return data[:end - 3]


def test_the_reported_fault_a_file_cut_in_its_second_line_is_an_error_not_one_case_at_zero(tmp_path):
    write_run(tmp_path)
    path = tmp_path / "sa_layers.csv"
    path.write_bytes(cut_in_the_middle_of_line(path.read_bytes(), 2))  # "c0,pz,0.682177,0.461872,0.3"
    with pytest.raises(ValueError) as error:
        read_layer_scores(path)
    message = str(error.value)
    assert message.startswith(f"{path}, line 2: ") and "cut short" in message


@pytest.mark.parametrize("filename", list(READERS))
@pytest.mark.parametrize("fault", ["cut in the last cell", "cut after a comma", "fewer cells", "more cells",
                                   "unclosed quote", "cut in the header"])
def test_a_truncated_or_malformed_csv_names_the_file_and_the_line(tmp_path, filename, fault):
    write_run(tmp_path)
    path = tmp_path / filename
    data = path.read_bytes()
    lines = data.decode().splitlines()
    if fault == "cut in the last cell":
        path.write_bytes(data[:-3])
        line = len(lines)
    elif fault == "cut after a comma":
        path.write_bytes(data[:data.rindex(b",") + 1])
        line = len(lines)
    elif fault in ("fewer cells", "more cells"):
        cells = lines[2].split(",")
        lines[2] = ",".join(cells[:-1] if fault == "fewer cells" else [*cells, "0.5"])
        path.write_text("\n".join(lines) + "\n")
        line = 3
    elif fault == "unclosed quote":
        path.write_text("\n".join([*lines[:2], '"' + lines[2], *lines[3:]]) + "\n")
        line = len(lines)  # the quoted cell runs to the end of the file
    else:
        path.write_bytes(data[:len(lines[0]) - 2])
        line = 1
    with pytest.raises(ValueError) as error:
        READERS[filename](path)
    assert str(error.value).startswith(f"{path}, line {line}: ")


def test_the_command_refuses_a_truncated_file_in_one_line_and_keeps_the_earlier_report(tmp_path, capsys):
    write_run(tmp_path)
    assert main(["report", str(tmp_path)]) == 0
    before = digests(tmp_path / "report")
    path = tmp_path / "sa_layers.csv"
    path.write_bytes(path.read_bytes()[:-3])
    capsys.readouterr()
    line = one_line_error(main(["report", str(tmp_path)]), capsys.readouterr())
    assert f"{path}, line 13: " in line and "cut short" in line
    assert digests(tmp_path / "report") == before


@pytest.mark.parametrize(
    "filename, row, column, value",
    [
        ("sa_layers.csv", 2, "mid", "inf"),
        ("sa_layers.csv", 3, "dec", "-7.5"),
        ("sa_layers.csv", 0, "enc", "1.0001"),
        ("sa_layers.csv", 5, "enc", "-inf"),
        ("sa_units.csv", 4, "sa", "12"),
        ("quality_validation.csv", 1, "mean_sa", "-0.2"),
        ("quality_validation.csv", 6, "true_dice", "inf"),
        ("quality.csv", 1, "estimated_dice", "85"),
        ("sa_layers.csv", 1, "mid", ""),
        ("sa_layers.csv", 1, "mid", "0.5.1"),
    ],
)
def test_a_score_outside_0_1_or_not_a_number_names_file_line_and_column(tmp_path, capsys, filename, row, column,
                                                                         value):
    write_run(tmp_path)
    path = tmp_path / filename
    line = set_cell(path, row, column, value)
    with pytest.raises(ValueError) as error:
        READERS[filename](path)
    message = str(error.value)
    assert message.startswith(f"{path}, line {line}: column '{column}' holds a value that ")
    assert message.endswith(f": {value!r}.")
    if filename == "sa_layers.csv":
        assert one_line_error(main(["report", str(tmp_path)]), capsys.readouterr()).endswith(message)
        assert not (tmp_path / "report").exists()


def test_nan_is_an_undefined_score_and_bounds_are_inclusive(tmp_path):
    write_run(tmp_path)
    path = tmp_path / "sa_layers.csv"
    for row, value in ((1, "0"), (2, "1"), (3, "NaN"), (4, "1.000000")):
        set_cell(path, row, "mid", value)
    mid = read_layer_scores(path).values[:, LAYERS.index("mid")]
    assert mid[1:3].tolist() == [0.0, 1.0] and math.isnan(mid[3]) and mid[4] == 1.0


ATTRIBUTION = ["task", "method", "reference", "cases", "prediction_preserved", "image_preserved", "deletion_auc",
               "insertion_auc", "seconds_per_case"]


@pytest.mark.parametrize(
    "column, value, expected",
    [
        ("deletion_auc", "1.5", "is outside [0, 1]"),
        ("seconds_per_case", "-1", "is below 0"),
        ("seconds_per_case", "inf", "is not finite"),
        ("cases", "nan", "is not a whole number >= 0"),
        ("cases", "2.5", "is not a whole number >= 0"),
        ("reference", "maybe", "is not True or False"),
    ],
)
def test_attribution_metrics_are_checked_like_the_scores(tmp_path, column, value, expected):
    path = tmp_path / "attribution_metrics.csv"
    atomic_write_csv(path, ATTRIBUTION, [["2D", "Grad-CAM", "False", "8", "0.8", "0.3", "0.5", "0.7", "0.005"],
                                         ["2D", "random", "True", "8", "0.9", "0.5", "0.1", "0.8", "0.0001"]])
    assert read_attribution_metrics(path)[1]["reference"] is True
    set_cell(path, 1, column, value)
    with pytest.raises(ValueError) as error:
        read_attribution_metrics(path)
    assert str(error.value) == f"{path}, line 3: column '{column}' holds a value that {expected}: {value!r}."


def test_review_flags_are_true_or_false_in_any_case(tmp_path):
    write_run(tmp_path)
    path = tmp_path / "quality.csv"
    set_cell(path, 0, "review", "TRUE")  # as Excel writes it back
    assert read_quality(path).review.tolist() == [True, True]
    set_cell(path, 1, "review", "yes")
    with pytest.raises(ValueError, match=r"quality.csv, line 3: column 'review' holds a value that is not True or "
                                         r"False: 'yes'\.$"):
        read_quality(path)


def test_a_column_named_twice_is_an_error(tmp_path):
    path = tmp_path / "sa_layers.csv"
    path.write_text("case,class,enc,enc\nc0,pz,0.1,0.9\n")
    with pytest.raises(ValueError, match=r"sa_layers.csv, line 1: column 'enc' appears twice"):
        read_layer_scores(path)


@pytest.mark.parametrize("filename", list(READERS))
def test_a_byte_order_mark_and_crlf_as_excel_saves_them_read_the_same(tmp_path, filename):
    write_run(tmp_path)
    path = tmp_path / filename
    expected = READERS[filename](path)
    excel = tmp_path / f"excel_{filename}"
    excel.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    read = READERS[filename](excel)
    if isinstance(expected, dict):
        assert expected.keys() == read.keys()
        for key in expected:
            np.testing.assert_array_equal(read[key], expected[key])
    else:
        assert read.cases == expected.cases and read.classes == expected.classes
        for name in ("values", "mean_sa", "true_dice", "estimated_dice", "review"):
            if hasattr(expected, name):
                np.testing.assert_array_equal(getattr(read, name), getattr(expected, name))


@pytest.mark.filterwarnings("error::RuntimeWarning")  # no mean of an empty slice
def test_files_whose_every_sa_is_undefined_give_a_report_that_says_so(tmp_path):
    rows = [[f"c{case}", name, "nan", "nan", "nan"] for case in range(3) for name in ("pz", "tz")]
    atomic_write_csv(tmp_path / "sa_layers.csv", ["case", "class", *LAYERS], rows)
    atomic_write_csv(tmp_path / "quality.csv", ["case", "class", "mean_sa", "estimated_dice", "review", "note"],
                     [["new0", name, "nan", "nan", "True", "empty prediction: SA undefined"] for name in ("pz", "tz")])
    text = write_report(tmp_path).read_text()
    assert ("- Inference on 2 case-class rows: mean SA undefined in every row (empty predictions), no calibration "
            "(mean SA only); 2 flagged for review.") in text.splitlines()
    assert ("- Every SA in `sa_layers.csv` is undefined (NaN): no case has both a non-empty reference and prototypes "
            "at any layer; check that the labels hold the scored classes.") in text.splitlines()
    assert "- Class pz: SA undefined in every layer." in text.splitlines()
    assert "| `mid` | tz | nan | nan | - | 3 |" in text.splitlines()
    assert (tmp_path / "report" / "layer_sa.png").read_bytes()[:4] == b"\x89PNG"


def test_a_class_whose_every_sa_is_undefined_is_left_out_of_the_figure(tmp_path):
    write_run(tmp_path, units=False, inference=False)
    path = tmp_path / "sa_layers.csv"
    for row in range(1, 12, 2):  # every tz row
        for layer in LAYERS:
            set_cell(path, row, layer, "nan")
    text = write_report(tmp_path).read_text()
    assert "- Class tz: SA undefined in every layer." in text.splitlines()
    assert "Class pz segments best at layer" in text
