"""Run every benchmark in one process and write one Markdown file of what this run measured.

    .venv/bin/python benchmarks/run_all.py --output benchmarks/RESULTS.md [--quick] [--only core,scaling]

``make bench`` runs it with ``--output benchmarks/RESULTS.md``. The file, written atomically and also printed, holds
the command line, the date, the machine, a summary of every figure derived from the measurements with its target,
and one section per benchmark: the command that reproduces that benchmark alone, its settings, its measurement tables
and its figures. Benchmarks: core (``bench_core.py``, SA against the naive formulation), validation
(``bench_validation.py``, an evaluator with and without ``SAScoreHandler``), quality (``bench_quality.py``, mean SA
as a quality estimate), scaling (``bench_scaling.py``, SA as the volume and the number of layers grow), attribution
(``bench_attribution.py``, every attribution method and ProtoSeg's maps on a 2D and a 3D task) and zoo
(``bench_zoo.py``, the handlers ``monai-protoseg attach`` adds, on the model zoo's spleen evaluation), with their own
default settings; and streaming (``bench_streaming.py``, streamed against stitched SA on a pancreas-like case) on a
64x64x48 volume with a 32^3 window (its default, a 256x256x128 CT with the bundle's 96^3 window, takes hours on CPU).
``--quick`` runs each on tiny sizes with one repeat: a smoke run whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from collections.abc import Sequence
from types import ModuleType

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import (  # noqa: E402
    bench_attribution,
    bench_core,
    bench_quality,
    bench_scaling,
    bench_streaming,
    bench_validation,
    bench_zoo,
)
from benchmarks.results import BenchmarkResult, Table, command, machine_details  # noqa: E402
from monai_protoseg.io import atomic_write_text  # noqa: E402

BENCHMARKS: dict[str, tuple[ModuleType, list[str], list[str]]] = {
    "core": (bench_core, [], ["--size", "32", "--repeats", "1", "--exact-size", "32"]),
    "validation": (bench_validation, [], ["--size", "64", "--cases", "1", "--repeats", "1"]),
    "quality": (bench_quality, [], ["--quick", "--size", "32", "--train-steps", "10", "--sources", "4", "--levels",
                                    "3", "--tta", "2"]),
    "scaling": (bench_scaling, [], ["--sizes", "32,48,64", "--layers-size", "32", "--layer-counts", "1,2,all",
                                    "--repeats", "1"]),
    "attribution": (bench_attribution, [], ["--quick"]),
    "zoo": (bench_zoo, [], ["--shape", "96,96,96", "--cases", "1", "--repeats", "1"]),
    "streaming": (bench_streaming, ["--shape", "64,64,48", "--roi", "32", "--layer-counts", "1,10"],
                  ["--shape", "48,32,32", "--roi", "32", "--layer-counts", "1,10"]),
}
"""Each benchmark by name: its module, its arguments in a full run and in a ``--quick`` run."""


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="the Markdown file to write (make bench: "
                        "benchmarks/RESULTS.md)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat: a smoke run")
    parser.add_argument("--only", default=",".join(BENCHMARKS),
                        help=f"comma-separated benchmarks to run (default all: {','.join(BENCHMARKS)})")
    return parser


def document(command_line: str, started: datetime.datetime, seconds: float, quick: bool,
             results: Sequence[BenchmarkResult]) -> str:
    """The Markdown file: command, date, machine, the summary of every figure, then one section per benchmark."""
    intro = (
        f"Written by `{command_line}` on {started:%Y-%m-%d %H:%M} UTC, in {seconds:.0f} s. Every figure below was "
        "measured in this run; each section starts with the command that reproduces its benchmark alone. Timings on a "
        "shared machine vary from run to run: each ratio compares two things measured in the same run."
    )
    if quick:
        intro += " **This is a `--quick` smoke run on tiny sizes with one repeat: its numbers mean nothing.**"
    machine = Table(["machine", "details"], [[name, value] for name, value in machine_details().items()], align="ll")
    summary = Table(["benchmark", "figure", "value", "target", "result"],
                    [[result.name, *check.cells()] for result in results for check in result.checks], align="llrrl")
    parts = ["# Benchmark results", intro, "## Machine", machine.markdown(), "## Summary", summary.markdown()]
    parts += [result.markdown() for result in results]
    return "\n\n".join(parts) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    """Run the chosen benchmarks, write the Markdown file, print it and return it."""
    options = parser()
    args = options.parse_args(sys.argv[1:] if argv is None else argv)
    names = args.only.split(",")
    unknown = [name for name in names if name not in BENCHMARKS]
    if unknown:
        options.error(f"unknown benchmark(s) {', '.join(unknown)}; choose among {', '.join(BENCHMARKS)}")
    command_line = command("run_all.py", sys.argv[1:] if argv is None else argv)

    started = datetime.datetime.now(datetime.timezone.utc)
    start = time.perf_counter()
    results = []
    chosen = [name for name in BENCHMARKS if name in names]
    for index, name in enumerate(chosen, 1):
        module, full, quick = BENCHMARKS[name]
        benchmark_argv = quick if args.quick else full
        print(f"[{index}/{len(chosen)}] {name}: {command(os.path.basename(module.__file__), benchmark_argv)}",
              flush=True)
        results.append(module.run(benchmark_argv))
        print(f"[{index}/{len(chosen)}] {name} done in {results[-1].seconds:.0f} s", flush=True)
    text = document(command_line, started, time.perf_counter() - start, args.quick, results)
    atomic_write_text(args.output, text)
    print(f"\n{text}\nwritten to {args.output}")
    return text


if __name__ == "__main__":
    main()
