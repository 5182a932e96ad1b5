"""Candidate quality signals measured on the real-anatomy task and not adopted (issue 18, item 4: "report what did not
help too").

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_quality_signals.py [--quick] [--seeds 3]

The task, the networks and the calibration / test splits are those of ``bench_quality.py --task mni152`` (its
functions build them). Per seed and split, ``MeanSAQualityHandler`` (defaults, ``tta_flip=[-1]``, ``group="block"``)
writes the feature columns of the calibration and test parts; the candidates below are computed beside them from
extra passes of the same network (no ground truth), for each case and scored class:

- ``noise``: ``1 - Dice`` between the prediction and the prediction for the input plus Gaussian noise of 0.1 times
  the image's standard deviation, averaged over 4 draws;
- ``bias field``: the same for the input times a random smooth field ``exp(0.2 * q)``, ``q`` a quadratic surface
  scaled to [-1, 1] (what MONAI's ``RandBiasField`` does), 4 draws;
- ``gamma``: the same for the input's intensities (min-max scaled) raised to 0.8 and to 1.25, averaged;
- ``soft Dice``: ``2 sum(p * prediction) / (sum p + sum prediction)``, the Dice expected of a calibrated network;
- ``boundary fraction``: the prediction's boundary pixels over its pixels;
- ``flip soft Dice``: the soft Dice of the prediction against the probabilities of the left-right flipped pass;
- ``image roughness``: the mean squared difference of horizontally neighbouring pixels of the input over its
  variance (noise raises it, blur lowers it);
- ``shift``: the same for the input rolled by one pixel (right, down, both, left; the prediction rolled back),
  averaged: a strided network is not shift-equivariant;
- ``blur``: the same for the input blurred by a Gaussian of sigma 0.75 pixel;
- ``sharpen``: the same for the input sharpened by an unsharp mask (input plus input minus its blur of sigma 1);
- ``feature dropout``: the same for the network with dropout (p = 0.1, inverted scaling) on the output of every probed
  layer but the first and the last (forward hooks, removed after), 4 draws: a perturbation of the model, not of
  the input;
- ``half resolution``: the same for the input downsampled by 2 (area) and upsampled back (bilinear);
- ``isolated pixels``: the predicted pixels of the class with fewer than 3 of their 8 neighbours predicted the
  same, over the predicted pixels (noise makes the prediction speckled);
- ``noise level``: the median absolute difference of the input and its blur of sigma 1, over the input's standard
  deviation;
- ``spread in mask``: the activation spread (``activation_spread``) of every layer inside the class's predicted mask
  only, at the layer's resolution.

Two tables score the candidates: each as a single signal, linearly calibrated on the calibration part;
and the estimator of the handler defaults' columns (``all``: the SA profile, confidence, entropy, boundary margin,
activation spread, ``tta_disagreement``), fitted on the calibration part, with each candidate added in turn. A
candidate helps if it lowers the test MAE of that estimator. The last row replaces the ridge regression by
scikit-learn's gradient-boosted trees on the same columns, when scikit-learn is installed: a check that the linear
model is not what limits the estimate.

A third table asks where the rest of the error lies, with the same ridge estimator: with the other class's columns of
the same case; with each slice's degradation and level as columns (known to the benchmark only); and corrected by the
mean residual (on the calibration part) of the 15 calibration rows of the same class nearest in the network's own
features (the probed layers but the first and the last, each channel averaged over the image, standardised), with
every calibration slice as a neighbour, and with those within 10 mm of the test slice left out. The last row corrects
by the residuals of the 3 calibration slices nearest in z at the same degradation and level (known to the benchmark
only).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_quality import (  # noqa: E402
    MNI_SIZE,
    column,
    handler_rows,
    mae_r,
    mni152_sets,
    train_tissue_network,
)
from benchmarks.results import Table, machine_line  # noqa: E402
from monai_protoseg import FeatureRecorder, QualityEstimator, candidate_layers  # noqa: E402
from monai_protoseg.estimator import PROTOTYPE_FEATURES, _boundary  # noqa: E402

CLASSES = ("grey", "white")
"""The scored classes of the tissue network (output channels 1 and 2)."""

CANDIDATES = ("noise", "bias field", "gamma", "soft Dice", "boundary fraction", "flip soft Dice", "image roughness",
              "shift", "blur", "sharpen", "feature dropout", "half resolution", "isolated pixels", "noise level",
              "spread in mask")
"""The candidates; ``spread in mask`` has one column per layer and no single-signal row."""


def predict(network: torch.nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax probabilities of the scored classes ``(N, 2, H, W)`` and the argmax prediction of each (bool)."""
    with torch.no_grad():
        prob = torch.softmax(network(images), 1)
    prediction = torch.nn.functional.one_hot(prob.argmax(1), prob.shape[1]).movedim(-1, 1).bool()
    return prob[:, 1:].double(), prediction[:, 1:]


def disagreement(prediction: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``1 - Dice`` of two bool ``(N, K, H, W)`` predictions, 0 where both are empty: ``(N, K)``."""
    total = (prediction.sum((2, 3)) + other.sum((2, 3))).double()
    overlap = (prediction & other).sum((2, 3)).double()
    return torch.where(total > 0, 1 - 2 * overlap / total.clamp_min(1), 0.0)


def perturbed(network: torch.nn.Module, images: torch.Tensor, prediction: torch.Tensor,
              perturbations: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> np.ndarray:
    """The mean disagreement of the prediction with those for the perturbed inputs: ``(N, K)``."""
    return np.mean([disagreement(prediction, predict(network, perturb(images))[1]).numpy()
                    for perturb in perturbations], 0)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """``(N, 1, H, W)`` images blurred by a Gaussian of ``sigma`` pixels (separable, reflected at the border)."""
    radius = math.ceil(3 * sigma)
    kernel = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=images.dtype) / sigma) ** 2)
    kernel = kernel / kernel.sum()
    rows = torch.nn.functional.conv2d(torch.nn.functional.pad(images, (radius, radius, 0, 0), mode="reflect"),
                                      kernel.view(1, 1, 1, -1))
    return torch.nn.functional.conv2d(torch.nn.functional.pad(rows, (0, 0, radius, radius), mode="reflect"),
                                      kernel.view(1, 1, -1, 1))


def dropout_prediction(network: torch.nn.Module, images: torch.Tensor, layers: Sequence[str], p: float,
                       generator: torch.Generator) -> torch.Tensor:
    """The prediction of :func:`predict` with dropout (``p``, inverted scaling) on the output of each of ``layers``;
    the hooks are removed afterwards."""
    modules = dict(network.named_modules())

    def drop(module: torch.nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
        return output * (torch.rand(output.shape, generator=generator) >= p) / (1 - p)

    handles = [modules[name].register_forward_hook(drop) for name in layers]
    try:
        return predict(network, images)[1]
    finally:
        for handle in handles:
            handle.remove()


def candidate_signals(network: torch.nn.Module, images: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    """Every candidate of :data:`CANDIDATES` for each image and scored class: ``(N, K)`` (``(N, K, L)`` for the
    per-layer ``spread in mask``)."""
    generator = torch.Generator().manual_seed(seed)
    layers = candidate_layers(network)
    with FeatureRecorder(network, layers) as recorder:
        prob, prediction = predict(network, images)
        features = {layer: recorder[layer].as_subclass(torch.Tensor) for layer in layers}
    size = images.shape[-1]
    y, x = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    basis = torch.stack([x, y, x * x, y * y, x * y])
    std = images.flatten(1).std(1).view(-1, 1, 1, 1)
    low, high = images.amin((1, 2, 3), keepdim=True), images.amax((1, 2, 3), keepdim=True)

    def noise(image: torch.Tensor) -> torch.Tensor:
        return image + 0.1 * std * torch.randn(image.shape, generator=generator)

    def bias(image: torch.Tensor) -> torch.Tensor:
        field = torch.einsum("nk,kyx->nyx", torch.randn(image.shape[0], 5, generator=generator), basis)
        return image * torch.exp(0.2 * field / field.flatten(1).abs().amax(1).view(-1, 1, 1))[:, None]

    def gamma(power: float) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda image: low + (high - low) * ((image - low) / (high - low)).clamp(0, 1) ** power

    flip_prob = predict(network, images.flip(-1))[0].flip(-1)
    count, mass = prediction.sum((2, 3)).double(), prob.sum((2, 3))
    boundary = _boundary(prediction).sum((2, 3)).double()
    roughness = (images[..., 1:] - images[..., :-1]).pow(2).mean((1, 2, 3)) / images.flatten(1).var(1)
    in_mask = []
    for layer_features in features.values():
        weights = torch.nn.functional.interpolate(prediction.double(), size=layer_features.shape[2:], mode="area")
        values = layer_features.double()[:, None]  # (N, 1, C, h, w)
        weights = weights[:, :, None]  # (N, K, 1, h, w)
        total = weights.sum((3, 4)).clamp_min(1e-6)
        mean = (weights * values).sum((3, 4)) / total
        variance = (weights * (values - mean[..., None, None]) ** 2).sum((3, 4)) / total
        in_mask.append(variance.sqrt().mean(-1).numpy())
    shifts = []
    for shift in ((0, 1), (1, 0), (1, 1), (0, -1)):
        rolled = predict(network, images.roll(shift, (2, 3)))[1].roll(tuple(-step for step in shift), (2, 3))
        shifts.append(disagreement(prediction, rolled).numpy())
    dropped = [disagreement(prediction, dropout_prediction(network, images, layers[1:-1], 0.1, generator)).numpy()
               for _ in range(4)]

    def half_resolution(image: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.interpolate(image, scale_factor=0.5, mode="area")
        return torch.nn.functional.interpolate(small, size=image.shape[2:], mode="bilinear", align_corners=False)

    same = torch.nn.functional.conv2d(prediction.flatten(0, 1)[:, None].double(), torch.ones(1, 1, 3, 3).double(),
                                      padding=1).view(prediction.shape) - prediction.double()
    isolated = (prediction & (same < 3)).sum((2, 3)).double() / count.clamp_min(1)
    noise_level = (images - blurred(images, 1.0)).flatten(1).abs().median(1).values / images.flatten(1).std(1)
    return {
        "noise": perturbed(network, images, prediction, [noise] * 4),
        "bias field": perturbed(network, images, prediction, [bias] * 4),
        "gamma": perturbed(network, images, prediction, [gamma(0.8), gamma(1.25)]),
        "soft Dice": (2 * (prob * prediction).sum((2, 3)) / (mass + count).clamp_min(1e-9)).numpy(),
        "boundary fraction": (boundary / count.clamp_min(1)).numpy(),
        "flip soft Dice": (2 * (flip_prob * prediction).sum((2, 3)) / (flip_prob.sum((2, 3)) + count)
                           .clamp_min(1e-9)).numpy(),
        "image roughness": np.repeat(roughness.double().numpy()[:, None], prob.shape[1], 1),
        "shift": np.mean(shifts, 0),
        "blur": perturbed(network, images, prediction, [lambda image: blurred(image, 0.75)]),
        "sharpen": perturbed(network, images, prediction, [lambda image: 2 * image - blurred(image, 1.0)]),
        "feature dropout": np.mean(dropped, 0),
        "half resolution": perturbed(network, images, prediction, [half_resolution]),
        "isolated pixels": isolated.numpy(),
        "noise level": np.repeat(noise_level.double().numpy()[:, None], prob.shape[1], 1),
        "spread in mask": np.stack(in_mask, -1),
    }


def pooled_features(network: torch.nn.Module, images: torch.Tensor) -> np.ndarray:
    """Each channel of the probed layers but the first and the last, averaged over the image: ``(N, channels)``."""
    layers = candidate_layers(network)[1:-1]
    with FeatureRecorder(network, layers) as recorder, torch.no_grad():
        network(images)
        return torch.cat([recorder[layer].as_subclass(torch.Tensor).mean((2, 3)) for layer in layers], 1).numpy()


def split_tables(sets: dict[str, list[dict]], network: torch.nn.Module, seed: int, folder: str) -> dict:
    """For parts ``a`` and ``b``: the handler's CSV columns with the candidates beside them (one row per case and
    class, in the CSV's order), as ``{part: {column: (n,) array}}``."""
    parts = {}
    for part in ("a", "b"):
        path = f"{folder}/seed{seed}_{part}"
        rows = handler_rows(network, sets[part], path, fit_estimator=True, estimator=f"{path}/estimator.json",
                            tta_flip=[-1])
        images = torch.from_numpy(np.stack([case["image"] for case in sets[part]])[:, None])
        signals = candidate_signals(network, images, seed)
        embedding = pooled_features(network, images)
        index = {case["name"]: i for i, case in enumerate(sets[part])}
        cases = np.array([index[row["case"]] for row in rows])
        classes = np.array([CLASSES.index(row["class"]) for row in rows])
        table = {name: column(rows, name) for name in rows[0] if name not in ("case", "class", "group", "review",
                                                                              "note")}
        for key in ("case", "class", "group"):
            table[key] = np.array([row[key] for row in rows])
        table["embedding"] = embedding[cases]
        table["z"] = np.array([sets[part][i]["z"] for i in cases])
        table["condition"] = np.array([f"{sets[part][i]['degradation']}{sets[part][i]['level']}" for i in cases])
        for name, values in signals.items():
            if values.ndim == 3:
                for layer in range(values.shape[-1]):
                    table[f"{name} {layer}"] = values[cases, classes, layer]
            else:
                table[name] = values[cases, classes]
        parts[part] = table
    return parts


def estimator_columns(table: dict[str, np.ndarray]) -> list[str]:
    """The handler defaults' ``all`` columns (and ``tta_disagreement``): every feature column but the prototype ones."""
    first, last = list(table).index("mean_sa"), list(table).index("true_dice")
    return [name for name in list(table)[first:last] if name not in PROTOTYPE_FEATURES]


def ridge(calibration: dict, test: dict, columns: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The estimates of a ridge estimator on ``columns`` fitted on the calibration part (grouped by block), for the
    calibration rows and the test rows."""
    x = np.stack([calibration[name] for name in columns], 1)
    estimator = QualityEstimator.fit(x, calibration["true_dice"], calibration["group"], feature_names=columns,
                                     layers=[], classes=calibration["class"], feature_sets={"all": columns},
                                     nested=False, per_class=False)
    return estimator.predict(x), estimator.predict(np.stack([test[name] for name in columns], 1))


def test_scores(estimate: np.ndarray, test: dict) -> tuple[float, float]:
    """MAE and r of test estimates, on the rows where both the estimate and Dice are defined."""
    keep = ~np.isnan(estimate) & ~np.isnan(test["true_dice"])
    return mae_r(estimate[keep], test["true_dice"][keep])


def scores(calibration: dict, test: dict, columns: list[str]) -> tuple[float, float]:
    """Test MAE and r of a ridge estimator on ``columns`` fitted on the calibration part (grouped by block)."""
    return test_scores(ridge(calibration, test, columns)[1], test)


def neighbour_corrected(calibration: dict, test: dict, columns: list[str], distance: np.ndarray, k: int) -> np.ndarray:
    """The ridge estimates of the test rows plus the mean calibration residual (Dice minus estimate) of the ``k``
    calibration rows of the same class nearest by ``distance`` ``(test rows, calibration rows)``; ``inf`` excludes a
    pair, and the correction is 0 for a row with no neighbour left."""
    estimate_calibration, estimate = ridge(calibration, test, columns)
    residual = calibration["true_dice"] - estimate_calibration
    distance = np.where((test["class"][:, None] == calibration["class"][None]) & ~np.isnan(residual)[None], distance,
                        np.inf)
    nearest = np.argsort(distance, 1, kind="stable")[:, :k]
    found = np.isfinite(np.take_along_axis(distance, nearest, 1))
    total = np.where(found, np.nan_to_num(residual[nearest]), 0).sum(1)
    return estimate + total / np.maximum(found.sum(1), 1)


def feature_distance(calibration: dict, test: dict) -> np.ndarray:
    """Squared Euclidean distances of the test rows' pooled features to the calibration rows', each channel
    standardised on the calibration part: ``(test rows, calibration rows)``."""
    mean, std = calibration["embedding"].mean(0), calibration["embedding"].std(0) + 1e-6
    a, b = (test["embedding"] - mean) / std, (calibration["embedding"] - mean) / std
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T


def with_other_class(table: dict, columns: list[str]) -> list[str]:
    """Adds to ``table`` the other scored class's value of each of ``columns`` for the same case (``other {name}``);
    their names."""
    row = {(case, label): i for i, (case, label) in enumerate(zip(table["case"], table["class"]))}
    other = np.array([row[case, CLASSES[1 - CLASSES.index(label)]] for case, label in zip(table["case"],
                                                                                           table["class"])])
    for name in columns:
        table[f"other {name}"] = table[name][other]
    return [f"other {name}" for name in columns]


def with_condition(calibration: dict, test: dict) -> list[str]:
    """Adds to both tables one 0/1 column per degradation and level of the calibration part (``condition {name}``);
    their names."""
    conditions = sorted(set(calibration["condition"]))
    for table in (calibration, test):
        for condition in conditions:
            table[f"condition {condition}"] = (table["condition"] == condition).astype(float)
    return [f"condition {condition}" for condition in conditions]


ANALYSES = ("ridge on the handler defaults' columns", "+ the other class's columns of the same case",
            "+ each slice's degradation and level (known to the benchmark only)",
            "+ residual of the 15 nearest calibration rows in the network's features",
            "+ the same, calibration slices within 10 mm of the test slice left out",
            "+ residual of the 3 calibration slices nearest in z, same degradation and level (known to the benchmark "
            "only)")
"""The rows of the third table (module docstring)."""


def analyses(calibration: dict, test: dict, columns: list[str]) -> list[tuple[float, float]]:
    """Test MAE and r of each of :data:`ANALYSES`."""
    other = with_other_class(calibration, columns)
    with_other_class(test, columns)
    features = feature_distance(calibration, test)
    near = np.abs(test["z"][:, None] - calibration["z"][None]) <= 10
    same_condition = test["condition"][:, None] == calibration["condition"][None]
    in_z = np.where(same_condition, np.abs(test["z"][:, None] - calibration["z"][None]).astype(float), np.inf)
    return [scores(calibration, test, columns),
            scores(calibration, test, columns + other),
            scores(calibration, test, columns + with_condition(calibration, test)),
            test_scores(neighbour_corrected(calibration, test, columns, features, 15), test),
            test_scores(neighbour_corrected(calibration, test, columns, np.where(near, np.inf, features), 15), test),
            test_scores(neighbour_corrected(calibration, test, columns, in_z, 3), test)]


def boosted_scores(calibration: dict, test: dict, columns: list[str]) -> tuple[float, float]:
    """Test MAE and r of gradient-boosted trees on the logit of Dice (scikit-learn; NaN without it)."""
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError:
        return math.nan, math.nan

    def rows(table: dict) -> np.ndarray:
        return np.stack([table[name] for name in columns] + [(table["class"] == CLASSES[0]).astype(float)], 1)

    dice = np.clip(calibration["true_dice"], 0.01, 0.99)
    keep = ~np.isnan(dice)
    model = HistGradientBoostingRegressor(max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=20,
                                          random_state=0)
    model.fit(rows(calibration)[keep], np.log(dice[keep] / (1 - dice[keep])))
    estimate = 1 / (1 + np.exp(-model.predict(rows(test))))
    defined = ~np.isnan(test["true_dice"])
    return mae_r(estimate[defined], test["true_dice"][defined])


def single_scores(calibration: dict, test: dict, name: str) -> tuple[float, float]:
    """Test MAE and r of one signal linearly calibrated on the calibration part (the least-squares line of Dice on
    the signal, estimates clipped to [0, 1], as ``QualityCalibration`` does for signals in [0, 1]); NaN for a signal
    that is constant on the calibration part."""
    x_cal, x = calibration[name], test[name]
    keep_cal = ~np.isnan(x_cal) & ~np.isnan(calibration["true_dice"])
    keep = ~np.isnan(x) & ~np.isnan(test["true_dice"])
    if not keep.any() or np.ptp(x_cal[keep_cal]) == 0:
        return math.nan, math.nan
    slope, intercept = np.polyfit(x_cal[keep_cal], calibration["true_dice"][keep_cal], 1)
    return mae_r(np.clip(slope * x[keep] + intercept, 0, 1), test["true_dice"][keep])


def run(argv: Sequence[str] = ()) -> list[Table]:
    """Train, compute the candidates and score them; the three tables (mean over seeds and splits)."""
    options = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    options.add_argument("--quick", action="store_true", help="a smoke run: 32x32, 20 steps, 2 levels, 1 seed")
    options.add_argument("--seeds", type=int, help="training seeds (default 3; 1 with --quick)")
    args = options.parse_args(argv)
    size, steps, levels = (32, 20, 2) if args.quick else (MNI_SIZE, 300, 5)
    seeds = args.seeds or (1 if args.quick else 3)
    start = time.perf_counter()
    sets = mni152_sets(size, levels)
    single: dict[str, list] = {name: [] for name in CANDIDATES if name != "spread in mask"}
    single["tta_disagreement (the handler's, for reference)"] = []
    added: dict[str, list] = {"none: the handler defaults' columns": []}
    added |= {f"+ {name}": [] for name in CANDIDATES}
    added["gradient-boosted trees instead of ridge (same columns)"] = []
    analysed: dict[str, list] = {name: [] for name in ANALYSES}
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(seeds):
            parts = split_tables(sets, train_tissue_network(sets["train"], steps, seed), seed, folder)
            for calibration, test in ((parts["a"], parts["b"]), (parts["b"], parts["a"])):
                columns = estimator_columns(calibration)
                for name in CANDIDATES:
                    if name in single:
                        single[name].append(single_scores(calibration, test, name))
                    extra = [key for key in calibration if key == name or key.startswith(f"{name} ")]
                    added[f"+ {name}"].append(scores(calibration, test, columns + extra))
                single["tta_disagreement (the handler's, for reference)"].append(
                    single_scores(calibration, test, "tta_disagreement"))
                added["none: the handler defaults' columns"].append(scores(calibration, test, columns))
                added["gradient-boosted trees instead of ridge (same columns)"].append(
                    boosted_scores(calibration, test, columns))
                for name, result in zip(ANALYSES, analyses(calibration, test, columns)):
                    analysed[name].append(result)
            print(f"quality signals: seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)

    def rows(results: dict[str, list]) -> list[list[str]]:
        return [[name, *("-" if math.isnan(value) else f"{value:{form}}"
                         for value, form in zip(np.mean(values, 0), (".4f", "+.3f")))] for name, values in
                results.items()]

    runs = f"mean over {seeds} training seed(s) x 2 calibration / test splits, {time.perf_counter() - start:.0f} s"
    return [Table(["signal", "test MAE", "test r"], rows(single),
                  f"Each candidate alone, linearly calibrated on the calibration part ({runs}):"),
            Table(["estimator columns", "test MAE", "test r"], rows(added),
                  "The handler defaults' estimator (ridge, `all` set, tta_flip=[-1]) with each candidate added:"),
            Table(["estimator", "test MAE", "test r"], rows(analysed),
                  "Where the rest of the error lies (the same ridge estimator, module docstring):")]


def main(argv: Sequence[str] | None = None) -> None:
    """Print the machine and the three tables."""
    print(machine_line())
    for table in run(sys.argv[1:] if argv is None else argv):
        print("\n" + table.markdown())


if __name__ == "__main__":
    main()
