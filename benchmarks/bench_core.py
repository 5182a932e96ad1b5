"""Speed and memory of ProtoSeg SA scores against the naive formulation, on every candidate layer of a 3D UNet.

Runs both in one process on the same recorded features and prints times, extra peak memories and their ratios:

    .venv/bin/python benchmarks/bench_core.py [--size 96] [--repeats 3] [--device cpu]

Targets (issue 2): layer-wise SA over all layers >= 10x faster and >= 10x less extra peak memory than naive;
unit-wise SA over all units of all layers faster than one naive layer-wise pass over all layers.
Times are the best of ``--repeats`` runs (this machine's timings have large outliers). Extra peak memory is the
peak of the memory allocated during the call above what existed before it: ``torch.cuda.max_memory_allocated`` on
CUDA, the CPU allocator's events recorded by ``torch.profiler`` on CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from collections.abc import Callable

import torch
from monai.networks.nets import UNet
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monai_protoseg import FeatureRecorder, candidate_layers, sa_score  # noqa: E402
from tests.naive_protoseg import naive_sa_score  # noqa: E402


def synthetic_case(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An image with a bright ball, the ball's soft probability, and its binary target: ``(1, 1, size^3)`` each."""
    axis = torch.linspace(-1, 1, size, device=device)
    grid = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))
    radius = (grid - torch.tensor([0.2, -0.1, 0.1], device=device).view(3, 1, 1, 1)).norm(dim=0)
    prob = torch.sigmoid((0.45 - radius) * 20).view(1, 1, size, size, size)
    image = prob + 0.3 * torch.randn(prob.shape, generator=torch.Generator().manual_seed(0)).to(device)
    return image, prob, prob > 0.5


def best_time(function: Callable[[], object], repeats: int, device: torch.device) -> tuple[float, object]:
    """Best wall time of ``repeats`` calls, in seconds, and the last call's result."""
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = function()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic input volume (default 96)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method; the best is kept")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)

    torch.manual_seed(0)
    network = UNet(3, 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).to(device).eval()
    image, prob, target = synthetic_case(args.size, device)
    layers = candidate_layers(network)
    with torch.no_grad(), FeatureRecorder(network, layers) as recorder:
        network(image)
    features = recorder.features

    runs = {
        "naive layer-wise": lambda: [naive_sa_score(f, prob, target) for f in features.values()],
        "ours layer-wise": lambda: [sa_score(f, prob, target) for f in features.values()],
        "ours unit-wise": lambda: [sa_score(f, prob, target, unit_wise=True) for f in features.values()],
    }
    runs["ours layer-wise"]()  # warm-up
    times, results = {}, {}
    for name, run in runs.items():
        times[name], results[name] = best_time(run, args.repeats, device)
    worst = max(abs(float(a) - float(b)) for a, b in zip(results["ours layer-wise"], results["naive layer-wise"]))
    print(f"layer-wise SA, largest difference ours vs naive (float32): {worst:.2e}")
    peaks = {name: extra_peak_bytes(run, device) for name, run in runs.items()}

    units = sum(f.shape[1] for f in features.values())
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device {device}"
          f" ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'})")
    print(f"network: UNet 3D channels (16, 32, 64, 128, 256), input 1x1x{args.size}^3; "
          f"{len(layers)} candidate layers, {units} units")
    print(f"layers: {', '.join(f'{n} {tuple(f.shape[1:])}' for n, f in features.items())}\n")
    print(f"| {'method':<18} | {'time (s)':>9} | {'extra peak (MiB)':>16} |")
    print(f"|{'-' * 20}|{'-' * 11}|{'-' * 18}|")
    for name in runs:
        print(f"| {name:<18} | {times[name]:>9.3f} | {peaks[name] / 2**20:>16.1f} |")

    speedup = times["naive layer-wise"] / times["ours layer-wise"]
    memory_ratio = peaks["naive layer-wise"] / max(peaks["ours layer-wise"], 1)
    unit_ratio = times["naive layer-wise"] / times["ours unit-wise"]
    print(f"\nlayer-wise speed-up (naive / ours):            {speedup:8.1f}x  target >= 10x: "
          f"{'met' if speedup >= 10 else 'MISSED'}")
    print(f"layer-wise extra peak memory (naive / ours):   {memory_ratio:8.1f}x  target >= 10x: "
          f"{'met' if memory_ratio >= 10 else 'MISSED'}")
    print(f"unit-wise all units vs naive layer-wise time:  {unit_ratio:8.2f}x  target > 1x: "
          f"{'met' if unit_ratio > 1 else 'MISSED'}")


if __name__ == "__main__":
    main()
