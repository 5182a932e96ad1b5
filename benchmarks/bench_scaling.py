"""Scaling of layer-wise and unit-wise SA: time and extra peak memory as the volume and the number of layers grow.

    .venv/bin/python benchmarks/bench_scaling.py [--sizes 64,96,128,160] [--layers-size 96]
        [--layer-counts 1,2,4,all] [--repeats 3] [--device cpu]

The network, input and measurements are those of ``bench_core.py``: a MONAI 3D UNet with channels (16, 32, 64, 128,
256) and 2 residual units, an image of a bright ball, prototypes guided by the ball's soft probability and scored
against its binary target. The features of every candidate layer are recorded once per volume size by one forward
pass outside any measurement, so only SA is measured: the best of ``--repeats`` wall times, and the extra peak memory
of one more call (``bench_core.extra_peak_bytes``: allocator events of ``torch.profiler`` on CPU,
``torch.cuda.max_memory_allocated`` on CUDA).

- Volume sweep: SA of all candidate layers (unit-wise: all their units) at each of ``--sizes`` (cubes). The scaling
  exponent is the least-squares slope of log time (or log extra peak) against log voxels: 1 is linear growth. This
  benchmark's own criterion (no issue set a target): exponent <= 1.2, growth no faster than linear with a margin for
  noise (fixed costs make small volumes relatively slower, so the exponent is often below 1).
- Layer sweep: SA of the first k candidate layers (input to output) for each k of ``--layer-counts``, at
  ``--layers-size``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import (  # noqa: E402
    CHANNELS,
    best_time,
    extra_peak_bytes,
    record_features,
    synthetic_case,
    unet_3d,
)
from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
from monai_protoseg import sa_score  # noqa: E402

LINEAR_EXPONENT = 1.2
"""Largest log-log slope of time or extra peak against voxels that this benchmark calls linear growth."""

MODES = {"layer-wise": False, "unit-wise": True}
"""The two kinds of SA measured, by name: the ``unit_wise`` argument of ``sa_score``."""


def log_log_slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``log y`` against ``log x``; NaN with fewer than two points or a non-positive value."""
    if len(x) < 2 or min(x) <= 0 or min(y) <= 0:
        return math.nan
    return float(np.polyfit(np.log(x), np.log(y), 1)[0])


def measure(features: Sequence[torch.Tensor], prob: torch.Tensor, target: torch.Tensor, unit_wise: bool,
            repeats: int, device: torch.device) -> tuple[float, int]:
    """Best time of ``repeats`` runs of SA over ``features`` (seconds), and the extra peak bytes of one more run."""
    def function() -> list[torch.Tensor]:
        return [sa_score(f, prob, target, unit_wise=unit_wise) for f in features]

    seconds, _ = best_time(function, repeats, device)
    return seconds, extra_peak_bytes(function, device)


def integers(text: str) -> list[int]:
    """Comma-separated integers, as ``--sizes`` takes them."""
    return [int(item) for item in text.split(",")]


def layer_counts(text: str) -> list[str]:
    """Comma-separated positive integers or ``all``, as ``--layer-counts`` takes them."""
    counts = text.split(",")
    for count in counts:
        if count != "all" and not (count.isdigit() and int(count) > 0):
            raise argparse.ArgumentTypeError(f"{count!r} is neither a positive integer nor 'all'")
    return counts


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=integers, default=[64, 96, 128, 160],
                        help="cube edges of the volume sweep, multiples of 16 (default 64,96,128,160)")
    parser.add_argument("--layers-size", type=int, default=96, help="cube edge of the layer sweep (default 96)")
    parser.add_argument("--layer-counts", type=layer_counts, default=["1", "2", "4", "all"],
                        help="numbers of probed layers of the layer sweep, 'all' for every candidate layer")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def volume_sweep(
    network: torch.nn.Module, sizes: Sequence[int], repeats: int, device: torch.device
) -> tuple[Table, list[Check]]:
    """SA of all candidate layers at each size: the table and the scaling exponents of time and extra peak."""
    seconds: dict[str, list[float]] = {mode: [] for mode in MODES}
    peaks: dict[str, list[int]] = {mode: [] for mode in MODES}
    rows = []
    for size in sizes:
        image, prob, target = synthetic_case(size, device)
        features = list(record_features(network, image).values())
        row = [f"{size}^3", str(size**3), number(sum(f.numel() * f.element_size() for f in features) / 2**20)]
        for mode, unit_wise in MODES.items():
            time_s, peak = measure(features, prob, target, unit_wise, repeats, device)
            seconds[mode].append(time_s)
            peaks[mode].append(peak)
            row += [number(time_s), number(time_s / size**3 * 1e9), number(peak / 2**20)]
        rows.append(row)
        print(f"scaling: {size}^3: " + ", ".join(f"{mode} {seconds[mode][-1]:.3f} s" for mode in MODES), flush=True)
        del features  # before the next size's forward pass

    voxels = [size**3 for size in sizes]
    checks = []
    for mode in MODES:
        checks += [
            Check(f"{mode} time: log-log slope against voxels", log_log_slope(voxels, seconds[mode]), unit="",
                  target=LINEAR_EXPONENT, comparison="<="),
            Check(f"{mode} extra peak: log-log slope against voxels", log_log_slope(voxels, peaks[mode]), unit="",
                  target=LINEAR_EXPONENT, comparison="<="),
        ]
    columns = ["size", "voxels", "features (MiB)"]
    columns += [f"{mode} {what}" for mode in MODES for what in ("(s)", "(ns/voxel)", "peak (MiB)")]
    return Table(columns, rows, "Volume sweep: all candidate layers, all their units."), checks


def layer_sweep(
    network: torch.nn.Module, size: int, counts: Sequence[str], repeats: int, device: torch.device
) -> Table:
    """SA of the first k candidate layers for each k of ``counts`` (``all``: every layer), at ``size``."""
    image, prob, target = synthetic_case(size, device)
    recorded = record_features(network, image)
    names = list(recorded)
    rows = []
    for count in counts:
        chosen = names if count == "all" else names[:int(count)]
        features = [recorded[name] for name in chosen]
        units = sum(f.shape[1] for f in features)
        row = [f"{count} ({len(chosen)})" if count == "all" else str(len(chosen)), str(units)]
        for mode, per in (("layer-wise", len(chosen)), ("unit-wise", units)):
            time_s, peak = measure(features, prob, target, MODES[mode], repeats, device)
            row += [number(time_s), number(time_s / per * 1e3), number(peak / 2**20)]
        rows.append(row)
        print(f"scaling: {size}^3, {len(chosen)} layer(s), {units} units done", flush=True)
    columns = ["layers", "units", "layer-wise (s)", "layer-wise (ms/layer)", "layer-wise peak (MiB)",
               "unit-wise (s)", "unit-wise (ms/unit)", "unit-wise peak (MiB)"]
    return Table(columns, rows, f"Layer sweep at {size}^3: the first k candidate layers ({', '.join(names)}).")


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: both sweeps and the scaling exponents."""
    options = parser()
    args = options.parse_args(argv)
    if any(size <= 16 or size % 16 for size in [*args.sizes, args.layers_size]):
        options.error("sizes must be multiples of 16 above 16 (the UNet has four stride-2 levels)")
    start = time.perf_counter()
    device = torch.device(args.device)
    network = unet_3d(device)
    image, prob, target = synthetic_case(32, device)
    measure(list(record_features(network, image).values()), prob, target, False, 1, device)  # warm-up: SA, profiler
    volume_table, checks = volume_sweep(network, args.sizes, args.repeats, device)
    layer_table = layer_sweep(network, args.layers_size, args.layer_counts, args.repeats, device)
    description = (
        f"MONAI 3D UNet, channels {CHANNELS}, 2 residual units, at full width (its features at the largest size take "
        f"{volume_table.rows[-1][2]} MiB), device {device}. Features recorded once per size, outside the "
        f"measurements; times are the best of {args.repeats} runs, extra peaks from one more run. Exponent: "
        f"least-squares slope of log time or log extra peak against log voxels (1: linear); <= {LINEAR_EXPONENT}, "
        "growth no faster than linear with a margin for noise, is this benchmark's own criterion (no issue set one)."
    )
    return BenchmarkResult("scaling", "Scaling with volume size and probed layers", command("bench_scaling.py", argv),
                           description, [volume_table, layer_table], checks, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine, then run the benchmark and print its Markdown section."""
    print(machine_line())
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
