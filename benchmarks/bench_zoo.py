"""Cost of the drop-in handlers on the model zoo's spleen evaluation, with and without them, in one process.

    .venv/bin/python benchmarks/bench_zoo.py [--shape 192,192,96] [--cases 2] [--repeats 2]

The evaluator is spleen_ct_segmentation's (``configs/train.json`` + ``configs/evaluate.json`` of the MONAI model zoo):
3D UNet (16, 32, 64, 128, 256), 2 residual units, batch norm, 2 output channels; SlidingWindowInferer with the zoo's
default window (roi 96^3, sw_batch_size 4, overlap 0.5); postprocessing ``Activationsd(softmax)`` and
``AsDiscreted(argmax, to_onehot=2)`` on pred and label; MeanDice as key metric. With the handlers: what
``monai-protoseg attach`` adds, ``SAScoreHandler`` on every candidate layer and ``MeanSAQualityHandler`` (mean SA of
the last two decoder layers, SA profile of every candidate layer, quality estimator features); activation ``auto``.
Target: CPU time with the handlers <= 1.3x without. Runs alternate and the best of ``--repeats`` is kept; the
process-CPU time is measured as well as the wall time, and torch runs on one thread (this machine's two cores make
thread counts above one noisy). Extra memory: the stitched whole-volume features (what ``ProtoSegInferer`` holds,
the sum over layers of channels x voxels at the layer's scale), and the peak of every allocation during one run with
and without the handlers (the torch profiler's memory events).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Sequence

import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.handlers import MeanDice, from_engine
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import SegResNet, UNet
from monai.transforms import Activationsd, AsDiscreted, Compose

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_core import extra_peak_bytes  # noqa: E402
from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
from monai_protoseg import FeatureRecorder, MeanSAQualityHandler, SAScoreHandler, candidate_layers  # noqa: E402

TARGET = 1.3
"""CPU time with the handlers over without."""


def spleen_network() -> UNet:
    """spleen_ct_segmentation's ``network_def``, seeded, in eval mode."""
    torch.manual_seed(0)
    return UNet(3, 1, 2, channels=(16, 32, 64, 128, 256), strides=(2, 2, 2, 2), num_res_units=2, norm="batch").eval()


def spleen_evaluator(network: UNet, data: list, handlers: list) -> SupervisedEvaluator:
    """spleen_ct_segmentation's validation evaluator on in-memory ``data``, with ``handlers``."""
    postprocessing = Compose([Activationsd("pred", softmax=True),
                              AsDiscreted(["pred", "label"], argmax=[True, False], to_onehot=2)])
    return SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=data, network=network,
        inferer=SlidingWindowInferer(roi_size=(96, 96, 96), sw_batch_size=4, overlap=0.5),
        postprocessing=postprocessing, val_handlers=handlers,
        key_val_metric={"val_mean_dice": MeanDice(include_background=False,
                                                  output_transform=from_engine(["pred", "label"]))},
    )


def drop_in_handlers(output_dir: str) -> list:
    """What ``monai-protoseg attach`` appends for an evaluation: SA on the candidate layers and the quality handler."""
    return [SAScoreHandler(), MeanSAQualityHandler(output_dir=output_dir, fit_estimator=True)]


def timed_run(network: UNet, data: list, with_handlers: bool, output_dir: str) -> tuple[float, float]:
    """Wall and process-CPU seconds of one evaluator run."""
    evaluator = spleen_evaluator(network, data, drop_in_handlers(output_dir) if with_handlers else [])
    wall, cpu = time.perf_counter(), time.process_time()
    evaluator.run()
    return time.perf_counter() - wall, time.process_time() - cpu


def stitched_bytes(network: UNet, data: list, output_dir: str) -> tuple[int, dict[str, tuple[int, ...]]]:
    """Bytes of the stitched whole-volume features of one case, and their shapes by layer."""
    handlers = drop_in_handlers(output_dir)
    evaluator = spleen_evaluator(network, data[:1], handlers)
    shapes: dict[str, tuple[int, ...]] = {}

    def keep_shapes(engine) -> None:
        shapes.update({layer: tuple(value.shape) for layer, value in engine.inferer.features.items()})

    evaluator.add_event_handler(Events.ITERATION_COMPLETED, keep_shapes)
    evaluator.run()
    return sum(4 * torch.Size(shape).numel() for shape in shapes.values()), shapes


def stitched_size(network: torch.nn.Module, in_channels: int, shape: tuple[int, ...], probe: int = 32) -> int:
    """Bytes (float32) of the whole-volume features of every candidate layer for one case of spatial ``shape``: the
    sum over layers of channels x voxels at the layer's scale, the scales read from one pass on a ``probe``^3 input."""
    layers = candidate_layers(network)
    with torch.no_grad(), FeatureRecorder(network, layers) as recorder:
        network(torch.zeros(1, in_channels, *(probe,) * len(shape)))
    total = 0
    for layer in layers:
        channels, *size = recorder[layer].shape[1:]
        total += 4 * channels * math.prod(extent * scale // probe for extent, scale in zip(shape, size))
    return total


def zoo_networks() -> dict[str, tuple[torch.nn.Module, int, tuple[int, ...]]]:
    """Networks of the zoo's sliding-window bundles with a case size: (network, input channels, spatial shape)."""
    brats = SegResNet(blocks_down=(1, 2, 2, 4), blocks_up=(1, 1, 1), init_filters=16, in_channels=4, out_channels=3,
                      dropout_prob=0.2).eval()  # brats_mri_segmentation's network_def
    return {
        "spleen_ct_segmentation, a 272x272x208 case (a CT at the config's 1.5x1.5x2 mm)": (
            spleen_network(), 1, (272, 272, 208)),
        "brats_mri_segmentation, its default window 240x240x160 (the whole case)": (brats, 4, (240, 240, 160)),
    }


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="192,192,96", help="spatial shape of the volumes (default 192,192,96)")
    parser.add_argument("--cases", type=int, default=2, help="validation volumes (default 2)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting; the best is kept")
    parser.add_argument("--output-dir", default=os.path.join("/tmp", "bench_zoo"),
                        help="where the quality handler writes its CSV")
    return parser


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``."""
    args = parser().parse_args(argv)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        shape = tuple(int(size) for size in args.shape.split(","))
        network = spleen_network()
        generator = torch.Generator().manual_seed(0)
        data = []
        for _ in range(args.cases):
            label = (torch.rand((1, 1, *shape), generator=generator) > 0.7).float()
            data.append({"image": label + 0.5 * torch.rand((1, 1, *shape), generator=generator), "label": label})
        with torch.no_grad():
            timed_run(network, data[:1], True, args.output_dir)  # warm-up
            plain, handled = [], []
            for _ in range(args.repeats):
                plain.append(timed_run(network, data, False, args.output_dir))
                handled.append(timed_run(network, data, True, args.output_dir))
            features, shapes = stitched_bytes(network, data, args.output_dir)
            peak_plain = extra_peak_bytes(lambda: timed_run(network, data[:1], False, args.output_dir),
                                          torch.device("cpu"))
            peak_handled = extra_peak_bytes(lambda: timed_run(network, data[:1], True, args.output_dir),
                                            torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    best_plain = min(plain, key=lambda t: t[1])
    best_handled = min(handled, key=lambda t: t[1])
    print(f"zoo: best of {args.repeats}: plain {best_plain[1]:.2f} s CPU, with handlers {best_handled[1]:.2f} s CPU; "
          f"stitched features {features / 2**20:.0f} MiB", flush=True)
    layers = candidate_layers(network)
    rows = [["plain evaluation", number(best_plain[0]), number(best_plain[1]), number(peak_plain / 2**20)],
            ["with SA + quality handlers", number(best_handled[0]), number(best_handled[1]),
             number(peak_handled / 2**20)]]
    size_rows = [[name, str(len(candidate_layers(net))), number(stitched_size(net, channels, shape) / 2**30)]
                  for name, (net, channels, shape) in zoo_networks().items()]
    feature_rows = [[layer, str(shapes.get(layer, "")), number(4 * torch.Size(shapes[layer]).numel() / 2**20)]
                    for layer in layers if layer in shapes]
    checks = [
        Check("CPU time with the handlers / without", best_handled[1] / best_plain[1], target=TARGET,
              comparison="<="),
        Check("wall time with the handlers / without", best_handled[0] / best_plain[0]),
        Check("stitched features of one case", features / 2**20, unit=" MiB"),
        Check("extra peak with the handlers", (peak_handled - peak_plain) / 2**20, unit=" MiB"),
    ]
    description = (
        f"spleen_ct_segmentation's evaluator (UNet (16, 32, 64, 128, 256), 2 residual units, SlidingWindowInferer roi "
        f"96^3, sw_batch_size 4, overlap 0.5) on {args.cases} volumes of {'x'.join(map(str, shape))}, torch on 1 "
        f"thread; with the handlers: SAScoreHandler on the {len(layers)} candidate layers and MeanSAQualityHandler "
        f"(fit_estimator). Best of {args.repeats} alternating runs; peak memory of one case from the torch profiler."
    )
    return BenchmarkResult(
        "zoo", "The drop-in handlers on the model zoo's spleen evaluation (issue 15)", command("bench_zoo.py", argv),
        description,
        [Table(["run", "wall (s)", "CPU (s)", "peak allocated (MiB)"], rows),
         Table(["layer", "stitched shape", "MiB"], feature_rows, align="llr"),
         Table(["bundle and case", "candidate layers", "stitched features (GiB)"], size_rows, align="lrr")],
        checks, time.perf_counter() - start,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine, then run the benchmark and print its Markdown section."""
    print(machine_line())
    print("\n" + run(sys.argv[1:] if argv is None else argv).markdown())


if __name__ == "__main__":
    main()
