"""The weak-supervision evaluation end to end: data in, every method's masks scored, files out.

:func:`evaluate_weak_segmentation` scores COIN and the classifier heatmaps on the same held-out cases and writes
``weak_segmentation.csv`` (one row per method and threshold), ``weak_cases.csv`` (per case and method) and the
figure ``weak_masks.png``; :func:`faithfulness_check` retrains the classifier on heatmap-filtered images (seed 003) and
writes ``faithfulness.csv``. The report (``monai-protoseg report``) shows both. Files are written atomically.
"""

from __future__ import annotations

import os
import pathlib
import time
from collections.abc import Callable, Sequence

import torch
from monai.data import DataLoader, Dataset, load_decathlon_datalist
from monai.engines import SupervisedTrainer
from monai.transforms import LoadImage, RandFlipd
from monai.utils import set_determinism
from torch import nn

from ..attribution import normalise, plot_attribution_maps
from ..checks import check_datalist
from ..figures import save_figure
from ..io import atomic_write_csv
from .evaluation import (
    CASE_COLUMNS,
    FAITHFULNESS_COLUMNS,
    METHOD_TITLES,
    SUMMARY_COLUMNS,
    classify,
    maps_to_masks,
    method_maps,
    per_case_scores,
    segmentation_scores,
)
from .heatmaps import classifier_heatmaps, heatmap_filtered

__all__ = [
    "read_weak_dataset",
    "evaluate_weak_segmentation",
    "format_weak_table",
    "format_faithfulness_table",
    "train_classifier",
    "faithfulness_check",
]


def read_weak_dataset(root: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load every case of a :func:`~monai_protoseg.weak.write_weak_dataset` folder into memory.

    Args:
        root: the dataset folder (with ``dataset.json``).

    Returns:
        ``{"image": (N, 1, H, W) float, "mask": (N, 1, H, W) bool, "label": (N,) long}`` and ``"name"``, the file
        names (a list).

    Raises:
        FileNotFoundError: no ``dataset.json``. ValueError: no case, a listed file is missing or empty, an image
            is not finite, a case's image and mask differ in shape, or the cases differ in shape (the message names
            the files).
    """
    root = pathlib.Path(root)
    if not (root / "dataset.json").is_file():
        raise FileNotFoundError(f"no dataset.json in {root} (write_weak_dataset writes it).")
    load = LoadImage(image_only=True, ensure_channel_first=True)
    images, masks, labels, names = [], [], [], []
    listing = str(root / "dataset.json")
    entries = load_decathlon_datalist(listing, data_list_key="training", base_dir=str(root))
    for entry in check_datalist(entries, ("image", "mask"), listing):
        image, mask = load(entry["image"]), load(entry["mask"])
        if not torch.isfinite(image).all():
            raise ValueError(f"{entry['image']} holds NaN or infinite values.")
        if image.shape != mask.shape or (images and image.shape != images[0].shape):
            raise ValueError(f"{entry['image']} {tuple(image.shape)} and {entry['mask']} {tuple(mask.shape)} must "
                             f"share one shape with every case (first case: "
                             f"{tuple(images[0].shape) if images else tuple(image.shape)}).")
        images.append(image.as_tensor().float())
        masks.append(mask.as_tensor() > 0)
        labels.append(int(entry["label"]))
        names.append(pathlib.Path(entry["image"]).name)
    return {"image": torch.stack(images), "mask": torch.stack(masks), "label": torch.tensor(labels),
            "name": names}


def evaluate_weak_segmentation(
    classifier: nn.Module,
    generator: nn.Module,
    data: dict[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    layers: Sequence[str],
    methods: Sequence[str] = ("coin", "gradcam", "scorecam", "layercam", "rise"),
    heatmap_thresholds: Sequence[str | float] = ("otsu", 0.5),
    coin_thresholds: Sequence[str | float] = ("otsu", 0.15),
    coin_open: int = 3,
    coin_close: int = 3,
    rise_masks: int = 500,
    scorecam_channels: int | None = None,
    figure_cases: int = 6,
    abnormal_class: int = 1,
    normal_class: int = 0,
    device: str | torch.device = "cpu",
) -> list[dict]:
    """Segment the held-out cases by every method, score them against the true masks and write the results.

    COIN's masks: ``|X - X_cf|`` above each of ``coin_thresholds``, opened, closed, largest component kept. Each
    heatmap's masks: the heatmap above each of ``heatmap_thresholds`` (no cleaning, as in seed 003). Every method
    segments only the cases the classifier labels abnormal (see :mod:`monai_protoseg.weak.evaluation`).

    Args:
        classifier: the trained classifier.
        generator: COIN's trained generator.
        data: the held-out cases, as :func:`read_weak_dataset` returns them.
        output_dir: where ``weak_segmentation.csv``, ``weak_cases.csv``, ``weak_masks.png`` (each method's masks
            beside the true mask) and ``weak_maps.png`` (the maps they come from, each case scaled to [0, 1]) go.
        layers: the classifier layers Grad-CAM, Score-CAM and LayerCAM explain.
        methods: the methods, in table order.
        heatmap_thresholds: each heatmap method is scored at each of these (``"otsu"`` or a number in [0, 1]).
        coin_thresholds: COIN is scored at each of these thresholds on ``|X - X_cf|`` (``"otsu"`` or a number in
            image intensity units).
        coin_open: COIN's opening size.
        coin_close: COIN's closing size.
        rise_masks: RISE's number of random masks.
        scorecam_channels: Score-CAM's ``max_channels`` (None: every channel).
        figure_cases: lesion cases shown in the figure (the first ones).
        abnormal_class: the class the heatmaps explain and the classifier flags.
        normal_class: COIN's target class.
        device: where the networks run.

    Returns:
        one dict per method and threshold with the :data:`SUMMARY_COLUMNS`.
    """
    output_dir = pathlib.Path(output_dir)
    images, truths = data["image"].to(device), data["mask"].to(device)
    abnormal = classify(classifier, images) == abnormal_class
    summary, case_rows, figure_masks, figure_maps = [], [], {}, {}
    for method in methods:
        options = {"rise": {"n_masks": rise_masks}, "scorecam": {"max_channels": scorecam_channels}}.get(method, {})
        start = time.perf_counter()
        maps = method_maps(method, images, classifier, generator=generator, layers=layers,
                           abnormal_class=abnormal_class, normal_class=normal_class, **options)
        seconds = (time.perf_counter() - start) / len(images)
        figure_maps[METHOD_TITLES.get(method, method)] = normalise(maps)
        cleaning = dict(open_size=coin_open, close_size=coin_close, largest_component=True) if method == "coin" else {}
        for threshold in coin_thresholds if method == "coin" else heatmap_thresholds:
            masks = maps_to_masks(maps, abnormal, threshold, **cleaning)
            summary.append({"method": method, "threshold": threshold, **segmentation_scores(masks, truths),
                            "seconds_per_case": seconds})
            counts = per_case_scores(masks, truths)
            case_rows += [[name, method, threshold, int(data["label"][i]), int(abnormal[i]), int(counts["true"][i]),
                           int(counts["predicted"][i]), int(counts["intersection"][i]), int(counts["union"][i]),
                           float(counts["dice"][i])] for i, name in enumerate(data["name"])]
            figure_masks[f"{METHOD_TITLES.get(method, method)} ({_threshold_text(threshold)})"] = masks
    atomic_write_csv(output_dir / "weak_segmentation.csv", SUMMARY_COLUMNS,
                     [[row[column] for column in SUMMARY_COLUMNS] for row in summary])
    atomic_write_csv(output_dir / "weak_cases.csv", CASE_COLUMNS, case_rows)
    shown = [i for i in range(len(images)) if truths[i].any()][:figure_cases]
    if shown:
        for name, columns, label in (("weak_masks.png", figure_masks, "mask"), ("weak_maps.png", figure_maps, "map")):
            figure = plot_attribution_maps(
                images[shown].cpu(), {title: values[shown].float().cpu() for title, values in columns.items()},
                predictions=truths[shown].float().cpu(), titles=[data["name"][i] for i in shown],
                reference_title="true mask", map_label=label)
            save_figure(figure, output_dir / name)
    return summary


def format_weak_table(summary: Sequence[dict]) -> str:
    """The rows of :func:`evaluate_weak_segmentation` as a plain-text table, one line per method and threshold.

    Example:
        >>> row = {"method": "coin", "threshold": 0.1, "iou": 0.5, "dice": 0.6, "normal_false_positive": 0.0,
        ...        "lesion_cases": 3, "normal_cases": 2, "seconds_per_case": 0.01}
        >>> print(format_weak_table([row]))  # doctest: +NORMALIZE_WHITESPACE
        method      threshold  dataset IoU  mean Dice  normal FP  s/case
        COIN              0.1        0.500      0.600      0.000    0.01
    """
    lines = [f"{'method':<11} {'threshold':>9}  {'dataset IoU':>11}  {'mean Dice':>9}  {'normal FP':>9}  {'s/case':>6}"]
    for row in summary:
        lines.append(f"{METHOD_TITLES.get(row['method'], row['method']):<11} {_threshold_text(row['threshold']):>9}  "
                     f"{row['iou']:>11.3f}  {row['dice']:>9.3f}  {row['normal_false_positive']:>9.3f}  "
                     f"{row['seconds_per_case']:>6.2g}")
    return "\n".join(lines)


def _threshold_text(threshold: str | float) -> str:
    return threshold if isinstance(threshold, str) else f"{threshold:g}"


def format_faithfulness_table(rows: Sequence[dict]) -> str:
    """The rows of :func:`faithfulness_check` as a plain-text table.

    Example:
        >>> print(format_faithfulness_table([{"training_images": "original", "test_images": "original",
        ...                                   "accuracy": 0.9}]))
        training and test images            accuracy
        original                               0.900
    """
    lines = [f"{'training and test images':<34} {'accuracy':>9}"]
    lines += [f"{row['training_images']:<34} {row['accuracy']:>9.3f}" for row in rows]
    return "\n".join(lines)


def train_classifier(
    network: nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    epochs: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> nn.Module:
    """Train ``network`` in place on in-memory images with MONAI's ``SupervisedTrainer`` (cross-entropy, Adam,
    shuffled batches, random left-right flips), as the bundle trains its classifier.

    Args:
        network: ``(B, C, *S) -> (B, K)``.
        images: ``(N, C, *S)``.
        labels: ``(N,)`` class indices.
        epochs: training epochs.
        batch_size: images per batch.
        learning_rate: Adam's learning rate.
        device: where it trains.
        seed: seed of the initial shuffle and flips (``monai.utils.set_determinism``).

    Returns:
        ``network``, trained, in eval mode.
    """
    set_determinism(seed=seed)
    data = [{"image": image, "label": label} for image, label in zip(images, labels)]
    flip = RandFlipd(keys="image", prob=0.5, spatial_axis=images.ndim - 3)
    loader = DataLoader(Dataset(data, transform=flip), batch_size=batch_size, shuffle=True)
    network = network.to(device)
    trainer = SupervisedTrainer(device=torch.device(device), max_epochs=epochs, train_data_loader=loader,
                                network=network, optimizer=torch.optim.Adam(network.parameters(), learning_rate),
                                loss_function=nn.CrossEntropyLoss(), decollate=False)
    trainer.run()
    set_determinism(seed=None)
    return network.eval()


def faithfulness_check(
    classifier: nn.Module,
    classifier_factory: Callable[[], nn.Module],
    train: dict[str, torch.Tensor],
    test: dict[str, torch.Tensor],
    output_dir: str | os.PathLike,
    *,
    layers: Sequence[str],
    method: str = "gradcam",
    epochs: int = 10,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> list[dict]:
    """Seed 003's faithfulness check: retrain the classifier on heatmap-filtered images and compare accuracies.

    The trained ``classifier``'s heatmaps of the abnormal class filter every image two ways: ``X * H`` keeps what the
    heatmap highlights, ``X * (1 - H)`` keeps the rest (its "dark regions"). A new classifier from
    ``classifier_factory`` is trained on each filtered training set (the same recipe as :func:`train_classifier`)
    and tested on the test images filtered the same way. If the heatmaps hold what the classifier uses, the
    highlighted images keep the accuracy and the rest loses it.

    Args:
        classifier: the trained classifier whose heatmaps filter the images.
        classifier_factory: makes a new, untrained classifier of the same kind.
        train: the training cases (:func:`read_weak_dataset`).
        test: the held-out cases.
        output_dir: where ``faithfulness.csv`` goes.
        layers: the classifier layers the heatmap method explains.
        method: the heatmap method.
        epochs: training epochs of each retrained classifier.
        batch_size: images per batch.
        learning_rate: Adam's learning rate.
        device: where it runs.
        seed: training seed.

    Returns:
        rows of :data:`FAITHFULNESS_COLUMNS`: the original classifier on the original images, then the retrained
        ones.
    """
    train_images, test_images = train["image"].to(device), test["image"].to(device)

    def accuracy(network: nn.Module, images: torch.Tensor) -> float:
        return float((classify(network, images) == test["label"].to(device)).double().mean())

    def heatmaps(images: torch.Tensor) -> torch.Tensor:
        return torch.cat([classifier_heatmaps(classifier, images[first:first + batch_size], method, layers)
                          for first in range(0, len(images), batch_size)])

    train_maps, test_maps = heatmaps(train_images), heatmaps(test_images)
    rows = [{"training_images": "original", "test_images": "original", "accuracy": accuracy(classifier, test_images)}]
    for keep, name in ((True, f"{method} highlighted (X * H)"), (False, f"{method} dark regions (X * (1 - H))")):
        network = train_classifier(classifier_factory(), heatmap_filtered(train_images, train_maps, keep),
                                   train["label"], epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                   device=device, seed=seed)
        rows.append({"training_images": name, "test_images": name,
                     "accuracy": accuracy(network, heatmap_filtered(test_images, test_maps, keep))})
    atomic_write_csv(pathlib.Path(output_dir) / "faithfulness.csv", FAITHFULNESS_COLUMNS,
                     [[row[column] for column in FAITHFULNESS_COLUMNS] for row in rows])
    return rows
