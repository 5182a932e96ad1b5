"""Cost of SA during validation: a MONAI SupervisedEvaluator with and without SAScoreHandler, in one process.

    .venv/bin/python benchmarks/bench_validation.py [--size 96] [--cases 3] [--repeats 3]

3D UNet (16, 32, 64, 128, 256) with 2 residual units; layer-wise SA on every decoder layer and the output layer.
Two settings: SimpleInferer over the whole volume (target: <= 1.15x plain validation), and SlidingWindowInferer with
windows of half the volume and 50% overlap (target: <= 1.3x). Runs with and without the handler alternate and the best
of ``--repeats`` is kept (this machine's timings have large outliers).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import CHANNELS, unet_3d  # noqa: E402
from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
from monai_protoseg import SAScoreHandler, candidate_layers  # noqa: E402


def validation_time(network: torch.nn.Module, data: list, inferer: Inferer, layers: list[str] | None) -> float:
    """Seconds of one evaluator run, with SA on ``layers`` or without SA when ``layers`` is None."""
    handlers = [SAScoreHandler(layers)] if layers else None
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network,
                                    inferer=inferer, val_handlers=handlers)
    start = time.perf_counter()
    evaluator.run()
    return time.perf_counter() - start


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volumes (default 96)")
    parser.add_argument("--cases", type=int, default=3, help="validation volumes (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is kept")
    return parser


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: plain and with-SA times and their ratios."""
    args = parser().parse_args(argv)
    start = time.perf_counter()
    network = unet_3d(torch.device("cpu"))
    layers = candidate_layers(network)
    decoder_layers = layers[layers.index("model.1.submodule.1.submodule.1.submodule.1.submodule") + 1:]
    shape = (1, 1, args.size, args.size, args.size)
    data = [{"image": torch.rand(shape), "label": (torch.rand(shape) > 0.5).float()} for _ in range(args.cases)]
    half = args.size // 2
    settings = {
        "SimpleInferer": (SimpleInferer(), 1.15),
        f"SlidingWindowInferer roi {half}^3, overlap 0.5": (
            SlidingWindowInferer(roi_size=(half, half, half), overlap=0.5, sw_batch_size=2), 1.3),
    }
    rows, checks = [], []
    for name, (inferer, target) in settings.items():
        validation_time(network, data[:1], inferer, decoder_layers)  # warm-up
        plain, with_sa = [], []
        for _ in range(args.repeats):
            plain.append(validation_time(network, data, inferer, None))
            with_sa.append(validation_time(network, data, inferer, decoder_layers))
        print(f"validation: {name}: best of {args.repeats} plain {min(plain):.2f} s, with SA {min(with_sa):.2f} s",
              flush=True)
        rows.append([name, number(min(plain)), number(min(with_sa))])
        checks.append(Check(f"{name}: with SA / plain time", min(with_sa) / min(plain), target=target,
                            comparison="<="))
    description = (
        f"SupervisedEvaluator on CPU, MONAI 3D UNet, channels {CHANNELS}, 2 residual units, {args.cases} volumes of "
        f"{args.size}^3; layer-wise SA on the {len(decoder_layers)} decoder and output layers "
        f"({', '.join(decoder_layers)}). Runs with and without SAScoreHandler alternate; best of {args.repeats}."
    )
    return BenchmarkResult("validation", "Validation with and without SAScoreHandler (issue 3)",
                           command("bench_validation.py", argv), description,
                           [Table(["inferer", "plain (s)", "with SA (s)"], rows)], checks, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine, then run the benchmark and print its Markdown section."""
    print(machine_line())
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
