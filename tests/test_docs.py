"""The API reference builds with Sphinx without a warning (``make docs``) and describes every public name."""

from __future__ import annotations

import importlib
import os
import pathlib
import subprocess
import sys

import pytest
from sphinx.util.inventory import InventoryFile

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ["monai_protoseg", "monai_protoseg.handlers", "monai_protoseg.attribution", "monai_protoseg.weak"]


@pytest.fixture(scope="module")
def built_docs(tmp_path_factory) -> pathlib.Path:
    """The HTML reference, built as ``make docs`` builds it (warnings are errors) into a temporary folder."""
    output = tmp_path_factory.mktemp("docs")
    run = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"), str(output)],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0 and not run.stderr.strip(), f"sphinx-build failed:\n{run.stderr}"
    return output


def documented_names(output: pathlib.Path) -> set[str]:
    with open(output / "objects.inv", "rb") as stream:
        inventory = InventoryFile.load(stream, "", lambda base, uri: base + uri)
    return {name for entries in inventory.values() for name in entries}


def test_every_public_name_is_in_the_reference(built_docs):
    documented = documented_names(built_docs)
    modules = [importlib.import_module(package) for package in PACKAGES]
    for module in modules:
        for name in module.__all__:
            # what a package re-exports from another package with its own page is described there
            homes = [other.__name__ for other in modules if getattr(other, name, None) is getattr(module, name)]
            assert any(f"{home}.{name}" in documented for home in homes), f"{module.__name__}.{name} is not documented"


def test_the_pages_hold_the_guide_and_the_docstrings(built_docs):
    guide = (built_docs / "guide.html").read_text()
    assert "Quick start" in guide and "Whole volumes and sliding windows" in guide  # the README, included
    sa_score = (built_docs / "api" / "monai_protoseg.html").read_text()
    assert 'id="monai_protoseg.sa_score"' in sa_score and "Segmentation-ability score" in sa_score
    handlers = (built_docs / "api" / "handlers.html").read_text()
    assert 'id="monai_protoseg.handlers.SAScoreHandler"' in handlers and "Example" in handlers
    weak = (built_docs / "api" / "weak.html").read_text()  # a constant, with the docstring under its assignment
    assert 'id="monai_protoseg.weak.HEATMAP_METHODS"' in weak and "The classifier heatmap methods by name" in weak
