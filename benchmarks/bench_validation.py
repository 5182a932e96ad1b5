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
import platform
import sys
import time

import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import Inferer, SimpleInferer, SlidingWindowInferer
from monai.networks.nets import UNet

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from monai_protoseg import SAScoreHandler, candidate_layers  # noqa: E402


def validation_time(network: torch.nn.Module, data: list, inferer: Inferer, layers: list[str] | None) -> float:
    """Seconds of one evaluator run, with SA on ``layers`` or without SA when ``layers`` is None."""
    handlers = [SAScoreHandler(layers)] if layers else None
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=data, network=network,
                                    inferer=inferer, val_handlers=handlers)
    start = time.perf_counter()
    evaluator.run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=96, help="edge of the cubic volumes (default 96)")
    parser.add_argument("--cases", type=int, default=3, help="validation volumes (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per setting; the best is kept")
    args = parser.parse_args()

    torch.manual_seed(0)
    network = UNet(3, 1, 1, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2).eval()
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
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, device cpu")
    print(f"UNet 3D (16, 32, 64, 128, 256), {args.cases} volumes of {args.size}^3, SA on {len(decoder_layers)} "
          f"layers: {', '.join(decoder_layers)}\n")
    print(f"| {'inferer':<44} | {'plain (s)':>9} | {'with SA (s)':>11} | {'ratio':>6} | {'target':>6} |")
    print(f"|{'-' * 46}|{'-' * 11}|{'-' * 13}|{'-' * 8}|{'-' * 8}|")
    for name, (inferer, target) in settings.items():
        validation_time(network, data[:1], inferer, decoder_layers)  # warm-up
        plain, with_sa = [], []
        for _ in range(args.repeats):
            plain.append(validation_time(network, data, inferer, None))
            with_sa.append(validation_time(network, data, inferer, decoder_layers))
        ratio = min(with_sa) / min(plain)
        verdict = "met" if ratio <= target else "MISSED"
        print(f"| {name:<44} | {min(plain):>9.2f} | {min(with_sa):>11.2f} | {ratio:>5.2f}x | {target:>5.2f}x | "
              f"{verdict}")


if __name__ == "__main__":
    main()
