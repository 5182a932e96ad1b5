"""Run a prepared zoo bundle as a user does: ``python -m monai.bundle run`` in a fresh process."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Sequence

from .zoo_bundles import ROOT, PreparedBundle

# one thread (2 cores: pytest and the run), the package importable from the checkout for overlay configs
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
}


def bundle_command(prepared: PreparedBundle, output_dir: pathlib.Path, extra_config_files: Sequence[os.PathLike] = (),
                   extra_args: Sequence[str] = ()) -> list[str]:
    """The command line: the bundle's configs then ``extra_config_files`` (merged in that order), ``--bundle_root``,
    the entry's overrides, ``--output_dir`` and ``extra_args``; a key given in ``extra_args`` replaces the entry's."""
    files = [str(f) for f in (*prepared.config_files, *extra_config_files)]
    given = {arg[2:].split("=", 1)[0] for arg in extra_args if arg.startswith("--")}
    overrides = {k: v for k, v in prepared.overrides.items() if k not in given and k != "output_dir"}
    return [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(files),
            *prepared.entry.cli_args(overrides), *([] if "output_dir" in given else ["--output_dir", str(output_dir)]),
            *extra_args]


def run_bundle_eval(prepared: PreparedBundle, workdir: pathlib.Path, extra_config_files: Sequence[os.PathLike] = (),
                    extra_args: Sequence[str] = (), timeout: float = 600) -> pathlib.Path:
    """Run the bundle's evaluation (inference for prostate) in a fresh process in ``workdir``; its output folder.

    The output folder is ``workdir/output`` (``--output_dir``), unless ``extra_args`` name another. The run must
    exit 0: otherwise the assertion message holds the end of its output. The whole output is kept in
    ``workdir/run.log``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    output_dir = workdir / "output"
    command = bundle_command(prepared, output_dir, extra_config_files, extra_args)
    if "--output_dir" in extra_args:
        output_dir = pathlib.Path(extra_args[list(extra_args).index("--output_dir") + 1])
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir, env=ENV, timeout=timeout)
    (workdir / "run.log").write_text(" ".join(command) + "\n\n" + result.stdout + result.stderr)
    assert result.returncode == 0, (
        f"{prepared.entry.name} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return output_dir
