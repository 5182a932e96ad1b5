"""Helpers the bundle tests share: run a bundle as a user does (`python -m monai.bundle run` in a fresh process), read
the CSV files it writes."""

from __future__ import annotations

import csv
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def run_bundle(bundle: pathlib.Path, configs: list[str], output_dir: pathlib.Path, *extra: str) -> str:
    """Run ``configs`` (merged in order) of ``bundle`` with ``--output_dir`` and ``extra`` options; the output.

    The run must succeed: a non-zero exit fails the test with the end of its output.
    """
    files = [str(bundle / "configs" / name) for name in configs]
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files) if len(files) > 1 else files[0],
               "--bundle_root", str(bundle), "--output_dir", str(output_dir), *extra]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def read_rows(path: pathlib.Path) -> list[dict[str, str]]:
    """The rows of a CSV file, as dicts by column."""
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))
