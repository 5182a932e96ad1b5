"""benchmarks/run_all.py --quick runs every benchmark on tiny sizes and writes one Markdown file: the command, the
machine, and per benchmark its tables and the figures derived from them, which must follow from the printed numbers."""

from __future__ import annotations

import contextlib
import io
import math
import os
import platform
import re

import monai
import numpy as np
import pytest
import torch

from benchmarks import run_all
from benchmarks.results import Check, Table, number

TITLES = {
    "core": "SA against the naive formulation (issue 2)",
    "validation": "Validation with and without SAScoreHandler (issue 3)",
    "quality": "Quality estimate without ground truth (issues 3, 6 and 18)",
    "scaling": "Scaling with volume size and probed layers",
    "attribution": "Attribution methods and ProtoSeg maps compared",
    "zoo": "The drop-in handlers on the model zoo's spleen evaluation (issue 15)",
    "streaming": "Streamed against stitched SA on a pancreas-like case (issue 17)",
}
CHECK_COLUMNS = ["figure", "value", "target", "result"]


def sections(text: str) -> dict[str, str]:
    """The ``## `` sections of a Markdown text by title, each without its title line."""
    parts = re.split(r"^## ", text, flags=re.M)[1:]
    return {part.split("\n", 1)[0]: part.split("\n", 1)[1] for part in parts}


def tables(text: str) -> list[list[dict[str, str]]]:
    """Every Markdown table of ``text``, as rows keyed by column name."""
    found, lines = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            lines.append([cell.strip() for cell in line.strip("|").split("|")])
        elif lines:
            header, _, *rows = lines
            found.append([dict(zip(header, row, strict=True)) for row in rows])
            lines = []
    return found


def interval(cell: str) -> tuple[float, float]:
    """The values that print as ``cell`` (a number, maybe followed by ``x``): plus or minus half its last digit."""
    text = cell.removesuffix("x")
    half = 0.5 * 10.0 ** -len(text.partition(".")[2])
    return float(text) - half, float(text) + half


def assert_quotient(reported: str, numerator: str, denominator: str, scale: float = 1.0) -> None:
    """``reported`` is ``scale * numerator / denominator`` up to the rounding of the three printed numbers."""
    low, high = interval(reported)
    (n_low, n_high), (d_low, d_high) = interval(numerator), interval(denominator)
    assert low <= scale * n_high / d_low and scale * n_low / d_high <= high, (reported, numerator, denominator)


def assert_verdict(row: dict[str, str]) -> None:
    """The result column says whether the printed value meets the printed target."""
    if row["target"] == "-":
        assert row["result"] == "-"
        return
    comparison, target = row["target"].split()
    value, target = float(row["value"].removesuffix("x")), float(target.removesuffix("x"))
    met = {">=": value >= target, ">": value > target, "<=": value <= target}[comparison]
    assert row["result"] == ("met" if met else "NOT MET"), row


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """The written file, the returned text and what was printed, of one --quick run (about 15 s on 2 idle cores)."""
    output = tmp_path_factory.mktemp("bench") / "RESULTS.md"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        returned = run_all.main(["--quick", "--output", str(output)])
    assert os.listdir(output.parent) == ["RESULTS.md"]  # written atomically: no temporary file left
    return output.read_text(), returned, printed.getvalue()


def test_writes_and_prints_one_markdown_file_with_the_command(quick_run):
    written, returned, printed = quick_run
    assert written == returned and written in printed
    for index, name in enumerate(TITLES, 1):
        assert f"[{index}/{len(TITLES)}] {name}: .venv/bin/python benchmarks/bench_" in printed  # progress lines
    assert written.startswith("# Benchmark results\n\nWritten by `.venv/bin/python benchmarks/run_all.py --quick "
                              "--output ")
    assert "smoke run" in written
    assert list(sections(written)) == ["Machine", "Summary", *TITLES.values()]


def test_machine_details(quick_run):
    [machine] = tables(sections(quick_run[0])["Machine"])
    details = {row["machine"]: row["details"] for row in machine}
    assert list(details) == ["CPU", "RAM", "OS", "load average (1/5/15 min)", "Python", "torch", "MONAI",
                             "CUDA device"]
    assert f"{os.cpu_count()} logical CPUs" in details["CPU"]
    assert details["RAM"].endswith(" GiB") and float(details["RAM"].split()[0]) > 0
    assert details["Python"] == platform.python_version()
    assert details["torch"] == f"{torch.__version__}, {torch.get_num_threads()} CPU threads"
    assert details["MONAI"] == monai.__version__
    assert (details["CUDA device"] == "none") == (not torch.cuda.is_available())


def test_each_section_names_its_command_and_has_its_tables(quick_run):
    found = sections(quick_run[0])
    columns = {
        "core": [["method", "time (s)", "extra peak (MiB)"],
                 ["prototype_map at 32^3, 16 channels, float32", "time (s)", "max error vs float64"]],
        "validation": [["inferer", "plain (s)", "with SA (s)"]],
        "quality": [["signal", "test n", "Pearson r", "MAE", "common n", "r (common)", "MAE (common)", "val r",
                     "val LOO MAE"], ["signal", "noise", "blur", "bias", "contrast"],
                    ["method", "test n", "r (estimate)", "MAE", "flag precision", "flag recall", "val CV r",
                     "val CV MAE"],
                    ["method", "val nested CV r", "val nested CV MAE", "test r", "test MAE", "coverage", "mean width",
                     "flag precision (estimate)", "flag recall (estimate)", "flag precision (upper)",
                     "flag recall (upper)", "chosen set per run"]],
        "scaling": [["size", "voxels", "features (MiB)", "layer-wise (s)", "layer-wise (ns/voxel)",
                     "layer-wise peak (MiB)", "unit-wise (s)", "unit-wise (ns/voxel)", "unit-wise peak (MiB)"],
                    ["layers", "units", "layer-wise (s)", "layer-wise (ms/layer)", "layer-wise peak (MiB)",
                     "unit-wise (s)", "unit-wise (ms/unit)", "unit-wise peak (MiB)"]],
        "attribution": [["method", "Prediction Preserved", "Image Preserved", "deletion AUC", "insertion AUC",
                         "time (s/case)"]] * 2,
        "zoo": [["run", "wall (s)", "CPU (s)", "peak allocated (MiB)"], ["layer", "stitched shape", "MiB"],
                ["bundle and case", "candidate layers", "stitched features (GiB)"]],
        "streaming": [["run", "time (s)", "time / plain", "peak (MiB)", "extra peak (MiB)"],
                      ["probed layers", "stitched extra peak (MiB)", "streamed extra peak (MiB)"]],
    }
    for name, title in TITLES.items():
        module, _, quick = run_all.BENCHMARKS[name]
        script = os.path.basename(module.__file__)
        assert found[title].startswith(f"\n`.venv/bin/python benchmarks/{script} {' '.join(quick)}` (")
        *measurements, checks = tables(found[title])
        assert [list(table[0]) for table in measurements] == columns[name]
        assert list(checks[0]) == CHECK_COLUMNS
    core, exact, _ = tables(found[TITLES["core"]])
    assert [row["method"] for row in core] == ["naive layer-wise", "ours layer-wise",
                                               "ours, all layers at once (sa_scores)", "ours unit-wise (all 609 units)",
                                               "the network's forward pass"]
    assert [row["prototype_map at 32^3, 16 channels, float32"] for row in exact] == ["block sums", "one accumulator"]


def test_figures_follow_from_the_measurements(quick_run):
    found = sections(quick_run[0])
    core, exact, core_checks = tables(found[TITLES["core"]])
    naive, ours, together, units, forward = core
    blocks, one = exact
    expected = [(together["time (s)"], forward["time (s)"]), None, (blocks["time (s)"], one["time (s)"]),
                (naive["time (s)"], ours["time (s)"]), (naive["extra peak (MiB)"], ours["extra peak (MiB)"]),
                (naive["time (s)"], units["time (s)"])]
    for check, quotient in zip(core_checks, expected, strict=True):
        if quotient is None:  # the float32 error itself
            assert float(check["value"]) == pytest.approx(float(blocks["max error vs float64"]), rel=0.01)
        else:
            assert_quotient(check["value"], *quotient)

    validation, validation_checks = tables(found[TITLES["validation"]])
    for row, check in zip(validation, validation_checks, strict=True):
        assert check["figure"] == f"{row['inferer']}: with SA / plain time"
        assert_quotient(check["value"], row["with SA (s)"], row["plain (s)"])

    scores, _, methods, real, quality_checks = tables(found[TITLES["quality"]])
    *signals, no_signal = scores
    for row, check in zip(signals, quality_checks[:len(signals)], strict=True):
        assert check["figure"] == f"{row['signal']}: MAE / MAE of no signal"
        assert_quotient(check["value"], row["MAE (common)"], no_signal["MAE (common)"])
    # the chosen estimator against the best calibrated single-signal baseline, in r and in MAE
    baselines = {row["method"]: row for row in methods if not row["method"].startswith("estimator")}
    [chosen] = [row for row in methods if row["method"].startswith("estimator: chosen by CV")]
    r_check, mae_check = quality_checks[len(signals):len(signals) + 2]
    best_r = max(baselines, key=lambda name: float(baselines[name]["r (estimate)"]))
    best_mae = min(baselines, key=lambda name: float(baselines[name]["MAE"]))
    assert r_check["figure"] == f"estimator r - best baseline r ({best_r})"
    assert float(r_check["value"]) == pytest.approx(
        float(chosen["r (estimate)"]) - float(baselines[best_r]["r (estimate)"]), abs=2e-3)
    assert mae_check["figure"] == f"estimator MAE / best baseline MAE ({best_mae})"
    assert_quotient(mae_check["value"], chosen["MAE"], baselines[best_mae]["MAE"])
    # real anatomy: the handler-default estimator against the best calibrated baseline, its r, coverage and TTA
    real_rows = {row["method"]: row for row in real}
    defaults = real_rows["estimator, handler defaults"]
    real_baselines = {name: row for name, row in real_rows.items() if name.startswith("baseline:")}
    best_real = min(real_baselines, key=lambda name: float(real_baselines[name]["test MAE"]))
    real_mae, real_r, coverage, flip_mae, flip_r, *tta_checks = quality_checks[len(signals) + 2:]
    assert real_mae["figure"] == f"real anatomy: estimator MAE / best calibrated baseline MAE ({best_real})"
    assert_quotient(real_mae["value"], defaults["test MAE"], real_baselines[best_real]["test MAE"])
    assert float(real_r["value"]) == pytest.approx(float(defaults["test r"]), abs=2e-3)
    assert float(coverage["value"]) == pytest.approx(abs(float(defaults["coverage"]) - 0.9), abs=2e-3)
    flip = real_rows["estimator, tta_flip=[-1] (left-right)"]
    assert flip_mae["figure"] == ("real anatomy: estimator with tta_flip=[-1] (left-right): MAE / best calibrated "
                                  "baseline MAE")
    assert_quotient(flip_mae["value"], flip["test MAE"], real_baselines[best_real]["test MAE"])
    assert flip_r["figure"] == "real anatomy: estimator with tta_flip=[-1] (left-right): r"
    assert float(flip_r["value"]) == pytest.approx(float(flip["test r"]), abs=2e-3)
    tta_rows = [name for name in real_rows if name.startswith("estimator, tta_flip")]
    assert [check["figure"] for check in tta_checks] == [
        f"real anatomy: MAE {name.removeprefix('estimator, ')} / without TTA" for name in tta_rows]
    for check, name in zip(tta_checks, tta_rows, strict=True):
        assert_quotient(check["value"], real_rows[name]["test MAE"], defaults["test MAE"])

    volumes, layers, scaling_checks = tables(found[TITLES["scaling"]])
    voxels = [int(row["voxels"]) for row in volumes]
    assert voxels == [int(row["size"].removesuffix("^3")) ** 3 for row in volumes]
    slopes = []
    for mode in ("layer-wise", "unit-wise"):
        for row, count in zip(volumes, voxels):
            assert_quotient(row[f"{mode} (ns/voxel)"], row[f"{mode} (s)"], str(count), scale=1e9)
        for column in (f"{mode} (s)", f"{mode} peak (MiB)"):
            slopes.append(np.polyfit(np.log(voxels), np.log([float(row[column]) for row in volumes]), 1)[0])
    for row in layers:
        count = row["layers"].split()[-1].strip("()")  # "2", or "all (9)"
        assert_quotient(row["layer-wise (ms/layer)"], row["layer-wise (s)"], count, scale=1e3)
        assert_quotient(row["unit-wise (ms/unit)"], row["unit-wise (s)"], row["units"], scale=1e3)
    for check, slope in zip(scaling_checks, slopes, strict=True):
        assert float(check["value"]) == pytest.approx(slope, abs=0.01), check["figure"]
    assert [row["units"] for row in layers] == ["16", "48", "609"]

    *attribution, attribution_checks = tables(found[TITLES["attribution"]])
    compared = [("ProtoSeg input image", "random"), ("ProtoSeg layers", "random"), ("ProtoSeg layers", "prediction")]
    expected = [(task, {row["method"]: row for row in rows}, name, reference)
                for task, rows in zip(("2D", "3D"), attribution, strict=True) for name, reference in compared]
    for check, (task, rows, name, reference) in zip(attribution_checks, expected, strict=True):
        assert check["figure"] == f"{task}: {name} deletion AUC / {reference} map's"
        assert_quotient(check["value"], rows[name]["deletion AUC"], rows[f"{reference} (reference)"]["deletion AUC"])

    (plain, stitched, streamed), sweep, streaming_checks = tables(found[TITLES["streaming"]])
    assert [row["run"] for row in (plain, stitched, streamed)] == ["plain sliding window", "stitched SA",
                                                                   "streamed SA"]
    for row in (stitched, streamed):
        assert_quotient(row["time / plain"], row["time (s)"], plain["time (s)"])
    assert [row["probed layers"] for row in sweep] == ["1", "10"]
    assert [sweep[-1]["stitched extra peak (MiB)"], sweep[-1]["streamed extra peak (MiB)"]] == [
        stitched["extra peak (MiB)"], streamed["extra peak (MiB)"]]
    peak_ratio, streamed_time, stitched_time, *slopes, _ = streaming_checks
    assert_quotient(peak_ratio["value"], streamed["extra peak (MiB)"], stitched["extra peak (MiB)"])
    assert streamed_time["value"] == streamed["time / plain"] + "x"
    assert stitched_time["value"] == stitched["time / plain"] + "x"
    for check, column in zip(slopes, ("stitched extra peak (MiB)", "streamed extra peak (MiB)"), strict=True):
        low, high = (float(row[column]) for row in sweep)
        assert float(check["value"].split()[0]) == pytest.approx((high - low) / 9, rel=1e-2, abs=1e-2)

    summary = []
    for name, title in TITLES.items():
        checks = tables(found[title])[-1]
        for check in checks:
            assert_verdict(check)
        summary += [{"benchmark": name, **check} for check in checks]
    assert tables(found["Summary"])[0] == summary


def test_only_runs_the_named_benchmarks(tmp_path):
    output = tmp_path / "core.md"
    with contextlib.redirect_stdout(io.StringIO()):
        text = run_all.main(["--quick", "--only", "core", "--output", str(output)])
    assert output.read_text() == text
    assert list(sections(text)) == ["Machine", "Summary", TITLES["core"]]
    assert {row["benchmark"] for row in tables(sections(text)["Summary"])[0]} == {"core"}

    with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
        run_all.main(["--only", "core,speed", "--output", str(tmp_path / "never.md")])
    assert not (tmp_path / "never.md").exists()


def test_figures_tables_and_numbers():
    assert [number(v) for v in (3456.04, 27.614, 0.071234, 12345.6, 0.0, math.nan)] == [
        "3456", "27.61", "0.07123", "12346", "0", "-"]
    assert Check("speed-up", 10.0, target=10).cells() == ["speed-up", "10.00x", ">= 10x", "met"]
    assert Check("ratio", 1.0, target=1, comparison=">").met is False
    assert Check("overhead", 1.2, target=1.15, comparison="<=").cells()[2:] == ["<= 1.15x", "NOT MET"]
    assert Check("slope", 0.98, unit="").cells() == ["slope", "0.9800", "-", "-"]
    table = Table(["a", "b"], [["x", "1"]], "Title.", align="lr")
    assert table.markdown() == "Title.\n\n| a | b |\n|---|---:|\n| x | 1 |"
