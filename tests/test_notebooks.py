"""Every notebook in ``notebooks/`` is committed executed (its figures and printed SA show on a repository page;
``make notebook`` refreshes them), runs top to bottom (nbclient, a fresh kernel), and what it prints agrees with the
files its handlers wrote."""

from __future__ import annotations

import csv
import pathlib
import re

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_walkthrough_exists():
    assert [path.name for path in NOTEBOOKS] == ["protoseg_walkthrough.ipynb"]


def outputs_of(notebook) -> list:
    return [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]


def printed_sa(outputs: list) -> dict[str, str]:
    """``{layer: SA}`` from the lines ``  SA <layer> <value>`` the notebook prints."""
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    return dict(re.findall(r"^  SA (\S+)\s+([0-9.]+)$", text, re.MULTILINE))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_committed_with_its_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in cells), "not executed: run `make notebook`"
    assert [cell.execution_count for cell in cells] == list(range(1, len(cells) + 1)), "cells run out of order"
    outputs = outputs_of(notebook)
    assert not [output for output in outputs if output.output_type == "error"]
    assert len([output for output in outputs if "image/png" in output.get("data", {})]) == 4
    assert len(printed_sa(outputs)) >= 5


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs_and_its_numbers_match_the_files(path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    notebook = nbformat.read(path, as_version=4)
    committed_layers = set(printed_sa(outputs_of(notebook)))
    notebook.cells.append(nbformat.v4.new_code_cell("print('RUN_DIR', run_dir)"))
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
                   ).execute()

    outputs = outputs_of(notebook)
    assert not [output for output in outputs if output.output_type == "error"]
    images = [output for output in outputs if "image/png" in output.get("data", {})]
    assert len(images) == 4  # layer-wise, unit-wise, prototype maps, quality
    text = "".join(output.get("text", "") for output in outputs if output.output_type == "stream")
    run_dir = pathlib.Path(re.search(r"RUN_DIR (\S+)", text).group(1))

    # the per-layer SA the notebook printed is the mean over cases of the file SAScoreHandler wrote
    with open(run_dir / "sa_layers.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    printed = printed_sa(outputs)
    assert len(printed) == len(rows[0]) - 2 >= 5
    assert set(printed) == committed_layers, "the committed outputs are stale: run `make notebook`"
    for layer, value in printed.items():
        assert float(value) == pytest.approx(np.nanmean([float(row[layer]) for row in rows]), abs=6e-4)
    assert len(list((run_dir / "prototype_maps").glob("*.npz"))) == 2
    assert (run_dir / "report" / "report.md").is_file()
