"""Every attribution method, and ProtoSeg's input-image and layer maps, on one synthetic 2D and one 3D task: how
faithful each method's maps are to the network, and what they cost.

    .venv/bin/python benchmarks/bench_attribution.py [--quick] [--cases 8] [--train-steps 300] [--output-dir DIR]

Two tasks, each with a MONAI UNet (8, 16, 32, 64), strides 2, one residual unit and one sigmoid output channel,
trained briefly on CPU on fresh cases every step (DiceCE loss, Adam):

- 2D: circles of ``monai_protoseg.synthetic.make_case``, 64x64, trained by ``bench_quality.train`` (difficulty up to
  0.2); the held-out cases are source seeds 0, 1, ... at difficulty 0.2, each with its own degradation;
- 3D: spheres of ``monai.data.create_test_image_3d``, 32^3, 4 per volume, over uniform background noise up to 0.8
  (the spheres are 0.5 to 1 before rescaling); the held-out volumes are seeds 0, 1, ...

Every method explains the network's own prediction (the target region) on the decoder layers
(``attribution.decoder_layers``): Grad-CAM, Grad-CAM++, LayerCAM, Score-CAM (``--max-channels`` channels of highest mean
activation per layer and case), RISE (``--rise-masks-2d`` / ``--rise-masks-3d`` masks, grid 8) and Kernel-Weighted
Contribution (``--max-kernels`` kernels per layer and case), each with its own default score (summed logit; RISE and
KWC: summed probability); then ProtoSeg: the prototype map of the input image ("ProtoSeg input image") and those of
the decoder layers combined with equal weights by ``attribution.combine`` ("ProtoSeg layers"), prototypes guided by the
network's soft prediction, a map without prototypes (empty prediction) counting as 0. Every map is min-max normalised to
[0, 1] (``combine`` does it for ProtoSeg). Three reference rows: a map of all ones, a uniform random map, and the
network's foreground probability itself (what a map that only restates the prediction scores).

Per case: Prediction Preserved, Image Preserved, deletion and insertion AUC (``--deletion-steps`` steps, zero
baseline, on the predicted region; see ``monai_protoseg.attribution.faithfulness``), and the wall time of one call of
the method on the case alone; one table per task gives the means over the cases (NaN ignored: an empty prediction has
none). With ``--output-dir``: ``attribution_metrics.csv`` (the tables), ``attribution_maps.npz`` (every case's image,
prediction and maps) and ``attribution_maps.png`` (the maps of the first ``--figure-cases`` cases of each task side by
side), written atomically; ``monai-protoseg report RUN_DIR`` shows the table and the figure when they are in
``RUN_DIR/attribution``. ``--quick`` runs tiny sizes, a few training steps, masks and kernels: a smoke run whose numbers
mean nothing.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import create_test_image_3d
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.utils import set_determinism

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_quality import TRAIN_SOURCES, train  # noqa: E402
from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line, number  # noqa: E402
from monai_protoseg import FeatureRecorder, prototype_map  # noqa: E402
from monai_protoseg.attribution import (  # noqa: E402
    RISE,
    GradCAM,
    GradCAMpp,
    KernelWeightedContribution,
    LayerCAM,
    ScoreCAM,
    SegmentationAttribution,
    combine,
    decoder_layers,
    deletion_insertion,
    image_preserved,
    masked_prediction,
    prediction_preserved,
)
from monai_protoseg.attribution.figures import plot_attribution_maps  # noqa: E402
from monai_protoseg.figures import save_figure  # noqa: E402
from monai_protoseg.handlers.attribution import COLUMNS  # noqa: E402
from monai_protoseg.io import atomic_write_bytes, atomic_write_csv, format_number  # noqa: E402
from monai_protoseg.synthetic import case_plan, make_case  # noqa: E402

CHANNELS = (8, 16, 32, 64)
"""Channels of both tasks' UNet, input to bottleneck."""

TRAIN_DIFFICULTY = 0.2
"""Largest difficulty of the 2D training cases, and the difficulty of the 2D held-out cases."""

NOISE_3D = 0.8
"""``noise_max`` of ``create_test_image_3d``: the background is uniform noise up to it, the spheres are 0.5 to 1."""

BATCH_2D, BATCH_3D = 16, 4
"""Training cases per step."""

EXPLAINED = {"class_index": 0, "activation": "sigmoid"}
"""The explained output, for the methods and the faithfulness metrics: the one channel of a sigmoid network."""

INPUT = "input image"
"""The "layer" name of the input image in :func:`protoseg_map`."""

REFERENCES = ("all ones (reference)", "random (reference)", "prediction (reference)")
"""Maps that are not methods: all ones (keeps everything), uniform random, and the network's foreground probability
(a map that only restates the prediction)."""

DEFAULTS = {  # option: (full run, --quick)
    "size_2d": (64, 32),
    "size_3d": (32, 16),
    "train_steps": (300, 10),
    "cases": (16, 2),
    "rise_masks_2d": (500, 16),
    "rise_masks_3d": (200, 8),
    "max_channels": (8, 2),
    "max_kernels": (8, 2),
    "deletion_steps": (16, 4),
}

CSV_COLUMNS = ["task", "method", "reference", "cases", *COLUMNS, "seconds_per_case"]
"""The columns of ``attribution_metrics.csv``, which ``monai_protoseg.report`` reads."""


@dataclass(frozen=True)
class Task:
    """A trained network and its held-out cases."""

    name: str
    network: UNet
    images: torch.Tensor
    """``(N, 1, *S)`` held-out images."""
    prob: torch.Tensor
    """``(N, 1, *S)`` the network's foreground probability on them."""
    description: str


def unet(spatial_dims: int, seed: int) -> UNet:
    """A seeded UNet with ``CHANNELS``, strides 2, one residual unit and one output channel."""
    torch.manual_seed(seed)
    return UNet(spatial_dims, 1, 1, channels=CHANNELS, strides=(2, 2, 2), num_res_units=1)


def sphere_case(seed: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A 3D case: ``(1, size^3)`` float32 image with 4 spheres over background noise, and its binary label."""
    image, label = create_test_image_3d(size, size, size, num_objs=4, rad_max=size // 4, rad_min=max(2, size // 8),
                                        noise_max=NOISE_3D, num_seg_classes=1,
                                        random_state=np.random.RandomState(seed))
    return image[None].astype(np.float32), (label[None] > 0).astype(np.float32)


def train_3d(network: torch.nn.Module, steps: int, size: int) -> float:
    """Train on ``BATCH_3D`` fresh sphere volumes every step (seeds from ``TRAIN_SOURCES``); the final loss."""
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    network.train()
    for step in range(steps):
        cases = [sphere_case(TRAIN_SOURCES + step * BATCH_3D + i, size) for i in range(BATCH_3D)]
        optimizer.zero_grad()
        loss = loss_function(network(torch.from_numpy(np.stack([image for image, _ in cases]))),
                             torch.from_numpy(np.stack([label for _, label in cases])))
        loss.backward()
        optimizer.step()
    network.eval()
    return float(loss.detach())


def held_out(name: str, network: UNet, cases: list[tuple[np.ndarray, np.ndarray]], setting: str) -> Task:
    """The task of ``network`` on ``cases``: its prediction and, in the description, its Dice there."""
    images = torch.from_numpy(np.stack([image for image, _ in cases]))
    labels = torch.from_numpy(np.stack([label for _, label in cases])).float()
    with torch.no_grad():
        prob = torch.sigmoid(network(images))
    dice = compute_dice((prob > 0.5).float(), labels, ignore_empty=False)
    description = f"{setting}; held-out Dice mean {dice.mean():.3f} (min {dice.min():.3f}) on {len(cases)} cases"
    return Task(name, network, images, prob, description)


def task_2d(args: argparse.Namespace) -> Task:
    """The 2D task: a UNet trained on ``make_case`` circles, its held-out cases."""
    network = unet(2, args.seed)
    loss = train(network, args.train_steps, BATCH_2D, args.size_2d, TRAIN_DIFFICULTY, args.seed)
    plan = case_plan(args.cases, seed=0, difficulties=(TRAIN_DIFFICULTY,))
    cases = [make_case(case["source"], args.size_2d, case["difficulty"], case["degradation"]) for case in plan]
    setting = (f"2D: make_case circles {args.size_2d}x{args.size_2d}, {args.train_steps} steps x {BATCH_2D} cases "
               f"(difficulty <= {TRAIN_DIFFICULTY}, final DiceCE loss {loss:.3f}); held-out difficulty "
               f"{TRAIN_DIFFICULTY}")
    return held_out("2D", network, cases, setting)


def task_3d(args: argparse.Namespace) -> Task:
    """The 3D task: a UNet trained on ``create_test_image_3d`` spheres, its held-out volumes."""
    network = unet(3, args.seed)
    loss = train_3d(network, args.train_steps, args.size_3d)
    cases = [sphere_case(seed, args.size_3d) for seed in range(args.cases)]
    setting = (f"3D: create_test_image_3d spheres {args.size_3d}^3 (noise {NOISE_3D}), {args.train_steps} steps x "
               f"{BATCH_3D} volumes (final DiceCE loss {loss:.3f})")
    return held_out("3D", network, cases, setting)


def protoseg_map(network: torch.nn.Module, image: torch.Tensor, layers: Sequence[str]) -> torch.Tensor:
    """ProtoSeg as an attribution map: the prototype map of each layer (``INPUT``: the image's channels), guided by
    the network's soft prediction, NaN (no prototype) as 0, combined with equal weights by ``combine``: ``(B, 1, *S)``
    in [0, 1]."""
    with torch.no_grad(), FeatureRecorder(network, [layer for layer in layers if layer != INPUT]) as recorder:
        prob = torch.sigmoid(network(image))
    maps = {layer: prototype_map(image if layer == INPUT else recorder[layer], prob).nan_to_num(0.0)
            for layer in layers}
    return combine(maps, image.shape[2:])


def explained(method: SegmentationAttribution) -> Callable[[torch.Tensor], torch.Tensor]:
    """The combined map of ``method`` for a batch."""
    return lambda image: method(image).map


def attribution_methods(
    network: UNet, rise_masks: int, args: argparse.Namespace
) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """Every compared method and the ``REFERENCES``, by table name: a batch's ``(B, 1, *S)`` maps in [0, 1]."""
    layers = decoder_layers(network)
    generator = torch.Generator().manual_seed(args.seed)
    return {
        "Grad-CAM": explained(GradCAM(network, layers, **EXPLAINED)),
        "Grad-CAM++": explained(GradCAMpp(network, layers, **EXPLAINED)),
        "LayerCAM": explained(LayerCAM(network, layers, **EXPLAINED)),
        "Score-CAM": explained(ScoreCAM(network, layers, **EXPLAINED, max_channels=args.max_channels)),
        "RISE": explained(RISE(network, **EXPLAINED, n_masks=rise_masks, seed=args.seed)),
        "KWC": explained(KernelWeightedContribution(network, layers, **EXPLAINED, max_kernels=args.max_kernels)),
        "ProtoSeg input image": lambda image: protoseg_map(network, image, [INPUT]),
        "ProtoSeg layers": lambda image: protoseg_map(network, image, layers),
        REFERENCES[0]: lambda image: torch.ones(image.shape[0], 1, *image.shape[2:]),
        REFERENCES[1]: lambda image: torch.rand(image.shape[0], 1, *image.shape[2:], generator=generator),
        REFERENCES[2]: lambda image: masked_prediction(network, image, torch.ones_like(image[:, :1]), **EXPLAINED),
    }


def evaluate(
    task: Task, rise_masks: int, args: argparse.Namespace
) -> tuple[dict[str, list[float]], dict[str, torch.Tensor]]:
    """Per method: the means over the cases of ``COLUMNS`` and the seconds per case, and the maps ``(N, 1, *S)``."""
    methods = attribution_methods(task.network, rise_masks, args)
    methods["Grad-CAM"](task.images[:1])  # warm-up, not timed
    scores, maps = {}, {}
    for name, method in methods.items():
        seconds, case_maps = [], []
        for case in range(task.images.shape[0]):
            start = time.perf_counter()
            case_maps.append(method(task.images[case:case + 1]))
            seconds.append(time.perf_counter() - start)
        maps[name] = torch.cat(case_maps)
        prob_masked = masked_prediction(task.network, task.images, maps[name], **EXPLAINED)
        deletion, insertion, _ = deletion_insertion(task.network, task.images, maps[name], **EXPLAINED,
                                                    steps=args.deletion_steps)
        values = [prediction_preserved(task.prob, prob_masked), image_preserved(maps[name]), deletion, insertion]
        scores[name] = [*torch.stack([value.double() for value in values]).nanmean(1).tolist(), float(np.mean(seconds))]
        print(f"attribution: {task.name} {name}: {scores[name][-1]:.3f} s/case", flush=True)
    return scores, maps


def metrics_table(task: Task, scores: dict[str, list[float]]) -> Table:
    """One row per method: the four faithfulness means (3 decimals, NaN as a dash) and the seconds per case."""
    rows = [[name, *("-" if math.isnan(value) else f"{value:.3f}" for value in values[:-1]), number(values[-1])]
            for name, values in scores.items()]
    columns = ["method", "Prediction Preserved", "Image Preserved", "deletion AUC", "insertion AUC", "time (s/case)"]
    return Table(columns, rows, f"{task.description}:")


def save_outputs(folder: pathlib.Path, tasks: list[Task], scores: list[dict[str, list[float]]],
                 maps: list[dict[str, torch.Tensor]], figure_cases: int) -> None:
    """The metrics CSV, the ``.npz`` of every case's image, prediction and maps, and the figure, atomically."""
    atomic_write_csv(folder / "attribution_metrics.csv", CSV_COLUMNS, [
        [task.name, name, name in REFERENCES, task.images.shape[0], *(format_number(value) for value in values)]
        for task, task_scores in zip(tasks, scores) for name, values in task_scores.items()])
    methods = [name for name in maps[0] if name not in REFERENCES]
    arrays = {"methods": np.array(methods, dtype=str)}
    for task, task_maps in zip(tasks, maps):
        key = task.name.lower()
        arrays[f"{key}_images"] = task.images.numpy()
        arrays[f"{key}_predictions"] = (task.prob > 0.5).numpy()
        arrays[f"{key}_maps"] = torch.cat([task_maps[name] for name in methods], dim=1).numpy()  # (N, methods, *S)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(folder / "attribution_maps.npz", buffer.getvalue())
    shown = [(task, task_maps, case) for task, task_maps in zip(tasks, maps) for case in range(figure_cases)]
    figure = plot_attribution_maps([task.images[case] for task, _, case in shown],
                                   {name: [task_maps[name][case] for _, task_maps, case in shown] for name in methods},
                                   predictions=[task.prob[case] > 0.5 for task, _, case in shown],
                                   titles=[f"{task.name} case {case}" for task, _, case in shown])
    save_figure(figure, folder / "attribution_maps.png", dpi=80)


def parser() -> argparse.ArgumentParser:
    """The command-line options; those of ``DEFAULTS`` default to their full-run or ``--quick`` value."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: tiny sizes, few steps, masks and kernels")
    helps = {
        "size_2d": "edge of the 2D images", "size_3d": "edge of the 3D volumes",
        "train_steps": "training steps of each network", "cases": "held-out cases per task",
        "rise_masks_2d": "RISE masks in 2D", "rise_masks_3d": "RISE masks in 3D",
        "max_channels": "Score-CAM channels per layer and case", "max_kernels": "KWC kernels per layer and case",
        "deletion_steps": "steps of the deletion and insertion curves",
    }
    for name, (full, quick) in DEFAULTS.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int,
                            help=f"{helps[name]} (default {full}; {quick} with --quick)")
    parser.add_argument("--figure-cases", type=int, default=2, help="cases of each task in the figure (default 2)")
    parser.add_argument("--output-dir", type=pathlib.Path, help="where to write the CSV, the .npz and the figure")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def settings(argv: Sequence[str]) -> argparse.Namespace:
    """The options of ``argv``, those of ``DEFAULTS`` that are not given set to their full-run or ``--quick`` value."""
    options = parser()
    args = options.parse_args(argv)
    for name, (full, quick) in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if not 1 <= args.figure_cases <= args.cases:
        options.error(f"--figure-cases must be between 1 and --cases ({args.cases})")
    return args


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: one table per task, a row per method."""
    args = settings(argv)
    start = time.perf_counter()
    set_determinism(args.seed)
    tasks = [task_2d(args), task_3d(args)]
    print(f"attribution: trained both networks in {time.perf_counter() - start:.0f} s", flush=True)
    scores, maps = zip(*(evaluate(task, masks, args) for task, masks in
                         zip(tasks, (args.rise_masks_2d, args.rise_masks_3d))))
    if args.output_dir is not None:
        save_outputs(args.output_dir, tasks, list(scores), list(maps), args.figure_cases)

    description = (
        f"MONAI UNet {CHANNELS}, one residual unit, one sigmoid output, trained on CPU per task; decoder layers "
        f"{', '.join(decoder_layers(tasks[0].network))}. Score-CAM: {args.max_channels} channels per layer and case; "
        f"RISE: {args.rise_masks_2d} masks in 2D, {args.rise_masks_3d} in 3D; KWC: {args.max_kernels} kernels per "
        f"layer and case; deletion and insertion: {args.deletion_steps} steps, zero baseline. Prediction Preserved "
        "(PP, higher is better) is sum min(P, P') / sum P, with P' the prediction on the image multiplied by the map; "
        "Image Preserved (IP, lower is better) is the map's mean, the fraction of the image it keeps. They trade off: "
        "the map of all ones keeps the whole image and so the whole prediction (PP = IP = 1 exactly), so PP means "
        "something only beside IP; the random map shows what chance gives, and the prediction map (the network's "
        "foreground probability) what a map that only restates the prediction gives. Deletion AUC (lower is better): "
        "the predicted region's probability as the map's most important pixels are set to 0 first; insertion AUC "
        "(higher is better): as they alone are revealed; the map of all ones removes pixels in raster order. On a "
        "single-channel image the input-image ProtoSeg map is a monotone function of the intensity. Time: one call of "
        "the method per case, on the case alone (its forward passes included, the scoring not), mean over the "
        "cases. Seeded: the same maps and scores on every run on this machine; the times vary. No target was set; the "
        "figures compare ProtoSeg's deletion AUC with the random map's and with the prediction map's."
    )
    compared = [("ProtoSeg input image", REFERENCES[1]), ("ProtoSeg layers", REFERENCES[1]),
                ("ProtoSeg layers", REFERENCES[2])]
    checks = [Check(f"{task.name}: {name} deletion AUC / {reference.split()[0]} map's", task_scores[name][2]
                    / task_scores[reference][2])
              for task, task_scores in zip(tasks, scores) for name, reference in compared]
    return BenchmarkResult("attribution", "Attribution methods and ProtoSeg maps compared",
                           command("bench_attribution.py", argv), description,
                           [metrics_table(task, task_scores) for task, task_scores in zip(tasks, scores)], checks,
                           time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    """Print the machine, run the benchmark and print its Markdown section; return the result."""
    print(machine_line())
    result = run(sys.argv[1:] if argv is None else argv)
    print("\n" + result.markdown())
    return result


if __name__ == "__main__":
    main()
