"""Speed and memory of ProtoSeg SA scores against the naive formulation, on every candidate layer of a 3D UNet.

Runs both in one process on the same recorded features and prints times, extra peak memories and their ratios:

    .venv/bin/python benchmarks/bench_core.py [--size 96] [--repeats 3] [--device cpu]

Targets (issue 2): layer-wise SA over all layers >= 10x faster and >= 10x less extra peak memory than naive;
unit-wise SA over all units of all layers faster than one naive layer-wise pass over all layers. Issue 17: all layers
scored at once (``sa_scores``, the prototype weights built once) in at most 0.3x the network's forward pass; float32
maps within 1e-4 of float64 at ``--exact-size``^3 (prototype sums in blocks), at most 10% slower than one float32
accumulator (``SUM_BLOCK`` set to the whole volume).
Times are the best of ``--repeats`` runs (this machine's timings have large outliers). Extra peak memory is the
peak of the memory allocated during the call above what existed before it: ``torch.cuda.max_memory_allocated`` on
CUDA, the CPU allocator's events recorded by ``torch.profiler`` on CPU.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
from monai.networks.nets import UNet
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
import monai_protoseg.protoseg as protoseg  # noqa: E402
from monai_protoseg import FeatureRecorder, candidate_layers, prototype_map, sa_score, sa_scores  # noqa: E402
from tests.naive_protoseg import naive_sa_score  # noqa: E402

CHANNELS = (16, 32, 64, 128, 256)
"""Channels of the benchmarks' 3D UNet, input to bottleneck."""


def unet_3d(device: torch.device) -> UNet:
    """The benchmarks' 3D UNet (channels ``CHANNELS``, strides 2, two residual units), seeded, in eval mode."""
    torch.manual_seed(0)
    return UNet(3, 1, 1, channels=CHANNELS, strides=(2, 2, 2, 2), num_res_units=2).to(device).eval()


def record_features(network: torch.nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """The outputs of every candidate layer of ``network`` for ``image``: one forward pass without gradients."""
    with torch.no_grad(), FeatureRecorder(network, candidate_layers(network)) as recorder:
        network(image)
    return recorder.features


def synthetic_case(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image with a bright ball, the ball's soft probability, and its binary target: ``(1, 1, size^3)`` each."""
    axis = torch.linspace(-1, 1, size, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    radius = (grid - torch.tensor([0.2, -0.1, 0.1], device=device).view(3, 1, 1, 1)).norm(dim=0)
    prob = torch.sigmoid((0.45 - radius) * 20).view(1, 1, size, size, size)
    image = prob + 0.3 * torch.randn(prob.shape, generator=torch.Generator().manual_seed(0)).to(device)
    return image, prob, prob > 0.5


def best_time(function: Callable[[], object], repeats: int, device: torch.device,
              clock: Callable[[], float] = time.perf_counter) -> tuple[float, object]:
    """Best time of ``repeats`` calls, in seconds, and the last call's result.

    Args:
        function: what to time.
        repeats: how many calls.
        device: where it runs (CUDA is synchronised around each call).
        clock: wall time by default; ``time.process_time`` gives this process's CPU time, which other processes on
            a busy machine do not inflate (with one torch thread it is the wall time of an idle machine).
    """
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = clock()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(clock() - start)
    return min(times), result


def extra_peak_bytes(function: Callable[[], object], device: torch.device) -> int:
    """Peak of the bytes allocated during one call, above those allocated before it."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        function()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    current = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        current += event.nbytes()
        peak = max(peak, current)
    return peak


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic input volume (default 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the best is kept")
    parser.add_argument("--exact-size", type=int, default=128,
                        help="edge of the volume of the float32-versus-float64 map check (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser


def exactness_case(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """16-channel float32 features of a box with noise at ``size``^3 and its soft probability (tests/test_protoseg)."""
    gen = torch.Generator().manual_seed(0)
    prob = torch.zeros(1, 1, size, size, size)
    prob[..., size // 4:3 * size // 4, size // 4:3 * size // 4, size // 3:2 * size // 3] = 1
    prob = (0.8 * prob + 0.1 + 0.1 * torch.rand(1, 1, size, size, size, generator=gen)).clamp(0, 1)
    features = 10 * (torch.randn(1, 16, size, size, size, generator=gen) + prob)
    return features.to(device), prob.to(device)


def float32_exactness(size: int, repeats: int, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
    """Largest float32 map error against float64 and the best time, with block sums and with one accumulator."""
    features, prob = exactness_case(size, device)
    exact = prototype_map(features.double(), prob.double())
    errors, times = {}, {}
    block = protoseg.SUM_BLOCK
    try:
        for name, value in (("block sums", block), ("one accumulator", features[0, 0].numel())):
            protoseg.SUM_BLOCK = value
            times[name], result = best_time(lambda: prototype_map(features, prob), repeats, device)
            errors[name] = float((result.double() - exact).abs().max())
    finally:
        protoseg.SUM_BLOCK = block
    return errors, times


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: times, extra peaks and their ratios."""
    args = parser().parse_args(argv)
    start = time.perf_counter()
    device = torch.device(args.device)
    network = unet_3d(device)
    image, prob, target = synthetic_case(args.size, device)
    features = record_features(network, image)
    units = sum(f.shape[1] for f in features.values())

    naive, ours, unit_wise = "naive layer-wise", "ours layer-wise", f"ours unit-wise (all {units} units)"
    together = "ours, all layers at once (sa_scores)"
    runs = {
        naive: lambda: [naive_sa_score(f, prob, target) for f in features.values()],
        ours: lambda: [sa_score(f, prob, target) for f in features.values()],
        together: lambda: list(sa_scores(features, prob, target).values()),
        unit_wise: lambda: [sa_score(f, prob, target, unit_wise=True) for f in features.values()],
    }
    runs[ours]()  # warm-up
    times, results = {}, {}
    for name, function in runs.items():
        times[name], results[name] = best_time(function, args.repeats, device)
        print(f"core: {name}: best of {args.repeats} {times[name]:.3f} s", flush=True)
    worst = max(abs(float(a) - float(b)) for a, b in zip(results[ours], results[naive]))
    assert all(torch.equal(a, b[:, 0]) for a, b in zip(results[ours], results[together])), "sa_scores is not sa_score"
    peaks = {name: extra_peak_bytes(function, device) for name, function in runs.items()}
    with torch.no_grad():
        forward, _ = best_time(lambda: network(image), args.repeats, device)
    print(f"core: one forward pass: best of {args.repeats} {forward:.3f} s", flush=True)
    errors, exact_times = float32_exactness(args.exact_size, args.repeats, device)

    layers = ", ".join(f"{name} {tuple(f.shape[1:])}" for name, f in features.items())
    description = (
        f"MONAI 3D UNet, channels {CHANNELS}, 2 residual units, input 1x1x{args.size}^3, device {device}; SA of its "
        f"{len(features)} candidate layers ({units} units): {layers}. Best of {args.repeats} runs per method; extra "
        "peak memory from the allocator events recorded by torch.profiler on CPU, torch.cuda.max_memory_allocated on "
        f"CUDA. Largest layer-wise difference ours vs naive (float32): {worst:.2e}."
    )
    rows = [[name, number(times[name]), number(peaks[name] / 2**20)] for name in runs]
    rows.append(["the network's forward pass", number(forward), "-"])
    exact_rows = [[name, number(exact_times[name]), f"{errors[name]:.2e}"] for name in errors]
    checks = [
        Check("all layers at once (sa_scores) / one forward pass", times[together] / forward, target=0.3,
              comparison="<="),
        Check(f"float32 map error vs float64 at {args.exact_size}^3 (block sums)", errors["block sums"], unit="",
              target=1e-4, comparison="<="),
        Check("prototype_map time: block sums / one accumulator", exact_times["block sums"]
              / exact_times["one accumulator"], target=1.1, comparison="<="),
        Check("layer-wise speed-up: naive time / ours time", times[naive] / times[ours], target=10),
        Check("layer-wise extra peak memory: naive / ours", peaks[naive] / max(peaks[ours], 1), target=10),
        Check("naive layer-wise time / ours unit-wise time", times[naive] / times[unit_wise], target=1,
              comparison=">"),
    ]
    return BenchmarkResult("core", "SA against the naive formulation (issue 2)", command("bench_core.py", argv),
                           description, [Table(["method", "time (s)", "extra peak (MiB)"], rows),
                                         Table([f"prototype_map at {args.exact_size}^3, 16 channels, float32", "time (s)",
                                                "max error vs float64"], exact_rows, align="lrr")], checks,
                           time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine, then run the benchmark and print its Markdown section."""
    print(machine_line())
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
