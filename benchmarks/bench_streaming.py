"""Streamed against stitched SA of every probed layer on a pancreas-like sliding-window case, in one process.

    .venv/bin/python benchmarks/bench_streaming.py [--shape 256,256,128] [--roi 96] [--overlap 0.5]
        [--sw-batch-size 6] [--layer-counts 1,4,10] [--repeats 1] [--device cpu]

The network is pancreas_ct_protoseg's (``configs/train.json``): DynUNet, kernels 3, strides 1, 2, 2, 2, 2, filters
(32, 64, 128, 256, 320), instance norm, 3 output channels, seeded and in eval mode; its ten ``sa_layers`` are probed
(the first k of them in the layer sweep). The inferer is the bundle's ``SlidingWindowInferer`` (roi 96^3,
sw_batch_size 6, overlap 0.5); the case is a volume of ``--shape`` (a CT of the pancreas task is about 256x256x128
at the bundle's spacing) with an ellipsoid organ and a lesion in noise. SA is scored for the two foreground classes
(pancreas, tumour; softmax probability) against the network's own one-hot prediction.

Runs, on ``--device`` (the CPU by default, torch on one thread there: this machine's two cores make thread counts
above one noisy; ``cuda`` for a GPU, where peaks come from ``torch.cuda.max_memory_allocated``): the plain sliding window;
``ProtoSegInferer(mode="stitch")`` then its ``sa_scores`` (stitched whole-volume features); ``mode="stream"`` then
its ``sa_scores`` (two more passes over the windows, no stitched features). Times are the best of ``--repeats``, on
the CPU in this process's CPU seconds (``time.process_time``: with one thread that is the wall time of an idle machine,
and other processes on a busy one, which inflate wall times by 3-8x at random, do not count), on a GPU wall seconds;
peaks are those of one more run from the torch profiler's allocator events (``bench_core.extra_peak_bytes``), and a
run's extra peak is its peak minus the plain sliding window's. Targets (issue 17): streamed extra peak <= 0.1x
stitched; streamed time <= 3.2x plain. The layer sweep gives the slope of each mode's extra peak against the number
of probed layers (least squares, MiB per layer).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from monai.data.utils import dense_patch_slices
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import DynUNet

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import best_time, extra_peak_bytes  # noqa: E402
from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
from monai_protoseg import ProtoSegInferer  # noqa: E402

PANCREAS_LAYERS = ["input_block", "downsamples.0", "downsamples.1", "downsamples.2", "bottleneck", "upsamples.0",
                   "upsamples.1", "upsamples.2", "upsamples.3", "output_block"]
"""pancreas_ct_protoseg's ``sa_layers``."""

PEAK_TARGET = 0.1
"""Streamed extra peak over stitched."""

TIME_TARGET = 3.2
"""Streamed time over the plain sliding window's."""


def pancreas_network() -> DynUNet:
    """pancreas_ct_protoseg's ``network_def``, seeded, in eval mode."""
    torch.manual_seed(0)
    return DynUNet(3, 1, 3, kernel_size=[[3, 3, 3]] * 5, strides=[[1, 1, 1]] + [[2, 2, 2]] * 4,
                   upsample_kernel_size=[[2, 2, 2]] * 4, norm_name="instance", deep_supervision=False).eval()


def pancreas_case(shape: Sequence[int]) -> torch.Tensor:
    """A ``(1, 1, *shape)`` volume: an ellipsoid organ with a darker lesion in it, in noise."""
    axes = [torch.linspace(-1, 1, size) for size in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    organ = ((grid / torch.tensor([0.5, 0.3, 0.4]).view(3, 1, 1, 1)) ** 2).sum(0) < 1
    lesion = ((grid - torch.tensor([0.2, 0.1, 0.0]).view(3, 1, 1, 1)).norm(dim=0) < 0.12) & organ
    image = organ.float() - 0.5 * lesion.float()
    return (image + 0.3 * torch.randn(image.shape, generator=torch.Generator().manual_seed(0)))[None, None]


def guide(prediction: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probability of the foreground classes (a copy: the background's is not kept) and the one-hot
    prediction of them: ``(1, 2, *S)`` each."""
    target = torch.stack([prediction.argmax(1) == k for k in range(1, prediction.shape[1])], 1)
    return torch.softmax(prediction, 1)[:, 1:].clone(), target


def sa_run(window: SlidingWindowInferer, network: torch.nn.Module, image: torch.Tensor, layers: Sequence[str],
           mode: str) -> Callable[[], tuple[dict[str, torch.Tensor], int]]:
    """One inference with ``ProtoSegInferer(mode=mode)`` and the SA of its layers, as a function to time; it returns
    the scores and the bytes of the stitched features it held (MONAI's padded allocations; 0 streaming)."""
    def function() -> tuple[dict[str, torch.Tensor], int]:
        inferer = ProtoSegInferer(window, layers, mode=mode)
        prob, target = guide(inferer(image, network))
        held = sum(features.untyped_storage().nbytes() for features in inferer.features.values())
        return inferer.sa_scores(prob, target), held

    return function


def integers(text: str) -> list[int]:
    """Comma-separated positive integers."""
    values = [int(item) for item in text.split(",")]
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} holds a number below 1")
    return values


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", type=integers, default=[256, 256, 128],
                        help="spatial shape of the volume (default 256,256,128)")
    parser.add_argument("--roi", type=int, default=96, help="edge of the cubic window, a multiple of 16 (default 96)")
    parser.add_argument("--overlap", type=float, default=0.5, help="window overlap (default 0.5)")
    parser.add_argument("--sw-batch-size", type=int, default=6, help="windows per network call (default 6)")
    parser.add_argument("--layer-counts", type=integers, default=[1, 4, 10],
                        help="numbers of probed layers (the first of sa_layers) of the layer sweep; the largest is "
                             "the main measurement (default 1,4,10)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per setting; the best is kept")
    parser.add_argument("--device", default="cpu", help="where the network, the volume and the windows run "
                                                        "(default cpu; cuda on a GPU)")
    return parser


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``."""
    args = parser().parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    clock = time.process_time if device.type == "cpu" else time.perf_counter  # see the module docstring
    counts = sorted(set(min(count, len(PANCREAS_LAYERS)) for count in args.layer_counts))
    layers = PANCREAS_LAYERS[:counts[-1]]
    try:
        network, image = pancreas_network().to(device), pancreas_case(args.shape).to(device)
        window = SlidingWindowInferer(roi_size=[args.roi] * 3, sw_batch_size=args.sw_batch_size,
                                      overlap=args.overlap)
        runs = {"plain sliding window": lambda: window(image, network),
                "stitched SA": sa_run(window, network, image, layers, "stitch"),
                "streamed SA": sa_run(window, network, image, layers, "stream")}
        seconds, scores = {}, {}
        with torch.no_grad():
            for name, function in runs.items():
                seconds[name], scores[name] = best_time(function, args.repeats, device, clock)
                print(f"streaming: {name}: {seconds[name]:.1f} s", flush=True)
            peaks = {"plain sliding window": extra_peak_bytes(runs["plain sliding window"], device)}
            sweep: dict[str, list[int]] = {"stitch": [], "stream": []}
            for count in counts:
                for mode, values in sweep.items():
                    values.append(extra_peak_bytes(sa_run(window, network, image, PANCREAS_LAYERS[:count], mode),
                                                   device))
                print(f"streaming: {count} layers: peak stitched {sweep['stitch'][-1] / 2**20:.0f} MiB, streamed "
                      f"{sweep['stream'][-1] / 2**20:.0f} MiB", flush=True)
    finally:
        torch.set_num_threads(threads)
    peaks["stitched SA"], peaks["streamed SA"] = sweep["stitch"][-1], sweep["stream"][-1]
    plain_peak = peaks["plain sliding window"]
    extra = {name: peak - plain_peak for name, peak in peaks.items()}
    (stitched_scores, stitched), (streamed_scores, _) = scores["stitched SA"], scores["streamed SA"]
    difference = max(float(torch.nan_to_num((stitched_scores[layer] - streamed_scores[layer]).abs()).max())
                     for layer in layers)
    padded = [max(size, args.roi) for size in args.shape]
    steps = [args.roi if size == args.roi else max(int(args.roi * (1 - args.overlap)), 1) for size in padded]
    windows = len(dense_patch_slices(padded, [args.roi] * 3, steps))
    rows = [[name, number(seconds[name]), number(seconds[name] / seconds["plain sliding window"]),
             number(peaks[name] / 2**20), number(extra[name] / 2**20)] for name in runs]
    sweep_rows = [[str(count), number((sweep["stitch"][i] - plain_peak) / 2**20),
                   number((sweep["stream"][i] - plain_peak) / 2**20)] for i, count in enumerate(counts)]
    slopes = {mode: slope(counts, [(peak - plain_peak) / 2**20 for peak in values]) for mode, values in sweep.items()}
    print(f"streaming: streamed / stitched extra peak {extra['streamed SA'] / extra['stitched SA']:.3f}, streamed / "
          f"plain time {seconds['streamed SA'] / seconds['plain sliding window']:.2f}", flush=True)
    checks = [
        Check("streamed extra peak / stitched extra peak", extra["streamed SA"] / extra["stitched SA"],
              target=PEAK_TARGET, comparison="<="),
        Check("streamed SA time / plain sliding window time", seconds["streamed SA"] / seconds["plain sliding window"],
              target=TIME_TARGET, comparison="<="),
        Check("stitched SA time / plain sliding window time", seconds["stitched SA"] / seconds["plain sliding window"]),
        Check("slope of the stitched extra peak against the layers", slopes["stitch"], unit=" MiB/layer"),
        Check("slope of the streamed extra peak against the layers", slopes["stream"], unit=" MiB/layer"),
        Check("largest SA difference, streamed against stitched (float32)", difference, unit=""),
    ]
    where = ("torch on 1 thread, times in process CPU seconds" if device.type == "cpu"
             else f"device {device}, wall times")
    peak_source = ("the torch profiler's allocator events" if device.type == "cpu"
                   else "torch.cuda.max_memory_allocated")
    description = (
        f"pancreas_ct_protoseg's DynUNet (filters 32 to 320, instance norm, 3 classes) on one "
        f"{'x'.join(map(str, args.shape))} volume, SlidingWindowInferer roi {args.roi}^3, sw_batch_size "
        f"{args.sw_batch_size}, overlap {args.overlap} ({windows} windows), {where}; SA of {len(layers)} "
        f"layers ({', '.join(layers)}) for 2 classes against the one-hot prediction. Stitched features, as MONAI "
        f"allocates them: {stitched / 2**20:.0f} MiB. Best of {args.repeats} timed "
        f"run(s); peaks of one more run each from {peak_source}; extra = peak - the plain "
        "sliding window's."
    )
    return BenchmarkResult(
        "streaming", "Streamed against stitched SA on a pancreas-like case (issue 17)",
        command("bench_streaming.py", argv), description,
        [Table(["run", "time (s)", "time / plain", "peak (MiB)", "extra peak (MiB)"], rows),
         Table(["probed layers", "stitched extra peak (MiB)", "streamed extra peak (MiB)"], sweep_rows)],
        checks, time.perf_counter() - start,
    )


def slope(x: Sequence[float], y: Sequence[float]) -> float:
    """Least-squares slope of ``y`` against ``x``; NaN with fewer than two points."""
    return float(np.polyfit(x, y, 1)[0]) if len(x) >= 2 else math.nan


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine, then run the benchmark and print its Markdown section."""
    print(machine_line())
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
