"""The GPU check: CUDA tests, then the core, validation and streaming benchmarks on the GPU, in one table.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--size 96] [--stream-shape 256,256,128]
        [--stream-roi 96]     # what `make gpu-check` runs

Steps, each a row of the table (its status, seconds and key figures):

1. the CUDA tests (``tests/test_cuda.py`` and the CUDA cases of ``tests/test_protoseg.py``): handlers on the GPU
   against the CPU, autocast float16 / bfloat16 validation against float32, the quality handler's flipped pass;
2. the core benchmark (``bench_core.py --device cuda``): SA against the naive formulation, all layers at once;
3. validation with and without the drop-in handlers (``SAScoreHandler`` on the candidate layers and
   ``MeanSAQualityHandler`` with ``tta_flip``) in float32 and under autocast float16 and bfloat16, sliding windows;
4. the streaming benchmark (``bench_streaming.py --device cuda``) on a pancreas-size case: plain, stitched and
   streamed sliding-window SA of the pancreas bundle's ten layers, their times and extra peaks.

``--device cpu`` runs the same steps on the CPU (the CUDA tests are then skipped): a smoke test of the script (give it
a small ``--size`` and ``--stream-shape``, e.g. ``--size 32 --stream-shape 64,64,48 --stream-roi 32``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Sequence

import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import bench_core, bench_streaming  # noqa: E402
from benchmarks.results import Table, machine_line, number  # noqa: E402
from monai_protoseg import MeanSAQualityHandler, SAScoreHandler  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_TESTS = ["tests/test_cuda.py", "tests/test_protoseg.py::test_cuda_matches_cpu"]


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (a smoke run of the script)")
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volumes (default 96)")
    parser.add_argument("--cases", type=int, default=3, help="validation volumes (default 3)")
    parser.add_argument("--stream-shape", default="256,256,128",
                        help="volume of the streaming benchmark (default 256,256,128, a pancreas CT)")
    parser.add_argument("--stream-roi", default="96", help="window edge of the streaming benchmark (default 96)")
    return parser


def cuda_tests() -> tuple[str, str]:
    """Run the CUDA tests in a subprocess: (status, pytest's summary line)."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS],
                            cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    return ("passed" if result.returncode == 0 else "FAILED"), (lines[-1] if lines else result.stderr[-200:])


def validation_seconds(device: torch.device, size: int, cases: int, handlers: bool,
                       amp_dtype: torch.dtype | None) -> tuple[float, dict]:
    """One evaluator run of the benchmarks' 3D UNet with a sliding window: seconds and the metrics."""
    network = bench_core.unet_3d(device)
    shape = (1, 1, size, size, size)
    generator = torch.Generator().manual_seed(0)
    data = []
    for _ in range(cases):
        label = (torch.rand(shape, generator=generator) > 0.7).float()
        data.append({"image": label + 0.5 * torch.rand(shape, generator=generator), "label": label})
    probing = [SAScoreHandler(), MeanSAQualityHandler(output_dir=os.path.join("/tmp", "gpu_check"), fit_estimator=True,
                                                      tta_flip=True)] if handlers else None
    evaluator = SupervisedEvaluator(
        device=device, val_data_loader=data, network=network, val_handlers=probing,
        inferer=SlidingWindowInferer(roi_size=(max(size // 2, 32),) * 3, sw_batch_size=4, overlap=0.5),
        amp=amp_dtype is not None, amp_kwargs=None if amp_dtype is None else {"dtype": amp_dtype},
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    evaluator.run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, evaluator.state.metrics


def run(argv: Sequence[str] = ()) -> Table:
    """Every step; the table of results."""
    args = parser().parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: CUDA is not available on this machine (use --device cpu for a smoke run).")
    rows = []
    start = time.perf_counter()
    status, summary = cuda_tests()
    rows.append(["CUDA tests", status, number(time.perf_counter() - start), summary])

    start = time.perf_counter()
    core = bench_core.run(["--device", args.device, "--repeats", "2", "--size", str(args.size)])
    rows.append(["core benchmark", "met" if all(c.met is not False for c in core.checks) else "NOT MET",
                 number(time.perf_counter() - start),
                 "; ".join(f"{c.name}: {number(c.value)}{c.unit}" for c in core.checks)])

    plain, _ = validation_seconds(device, args.size, args.cases, False, None)
    precisions = {"float32": None, "autocast float16": torch.float16, "autocast bfloat16": torch.bfloat16}
    reference = None
    for name, dtype in precisions.items():
        if device.type == "cpu" and dtype == torch.float16:
            continue  # no float16 convolutions on the CPU
        seconds, metrics = validation_seconds(device, args.size, args.cases, True, dtype)
        reference = metrics if reference is None else reference
        drift = max(abs(metrics[key] - reference[key]) for key in reference if key.startswith("sa_model"))
        rows.append([f"validation with handlers, {name}", "ran", number(seconds),
                     f"{seconds / plain:.2f}x the plain float32 run ({plain:.2f} s); SA {metrics['sa_mean']:.4f}, "
                     f"largest layer SA change vs float32 {drift:.4f}"])

    start = time.perf_counter()
    streaming = bench_streaming.run(["--device", args.device, "--shape", args.stream_shape, "--roi", args.stream_roi,
                                     "--layer-counts", "1,10"])
    rows.append([f"streaming benchmark, {args.stream_shape} roi {args.stream_roi}",
                 "met" if all(c.met is not False for c in streaming.checks) else "NOT MET",
                 number(time.perf_counter() - start),
                 "; ".join(f"{c.name}: {number(c.value)}{c.unit}" for c in streaming.checks)])
    return Table(["step", "status", "seconds", "figures"], rows, align="llrl")


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine and the GPU, then the table."""
    print(machine_line())
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name(0)}")
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
