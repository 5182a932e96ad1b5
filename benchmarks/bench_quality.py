"""How well mean SA predicts the true Dice of a prediction without ground truth, against two baselines.

    .venv/bin/python benchmarks/bench_quality.py [--quick] [--size 64] [--train-steps 400] [--seed 0]

A MONAI 2D UNet (16, 32, 64, 128), sigmoid output, is trained briefly on CPU on synthetic cases
(``monai_protoseg.synthetic``) that are clean or mildly degraded (difficulty up to ``--train-difficulty``). A
validation set and a held-out test set then cover all four degradations at difficulties from 0 to 1, each source image
at every difficulty; the two sets and the training data use disjoint source seeds. Per case, three signals computed
without the ground truth:

- mean SA: SA of the last two decoder layers (``candidate_layers(network)[-3:-1]``) against the network's own
  prediction ``prob > 0.5``, prototypes guided by ``prob``; mean over the two layers. Undefined (NaN) when the
  prediction is empty;
- confidence: mean over pixels of ``max(prob, 1 - prob)``;
- TTA: the volume variation coefficient ``vvc = std / mean`` of the predicted foreground volume (pixels with
  ``prob > 0.5``) over ``--tta`` realisations of MONAI's ``TestTimeAugmentation`` (random flips, 90-degree and small
  rotations, which MONAI inverts, and intensity scaling and noise, which need no inverse); undefined when every
  realisation is empty. Quality falls as vvc rises and ``QualityCalibration`` needs values in [0, 1], so the signal
  is ``1 / (1 + vvc)`` (monotone decreasing in vvc: the sign of Pearson r flips relative to vvc itself).
  For reference, the ``vvc`` that ``TestTimeAugmentation`` itself returns is scored the same way in the row
  "TTA, MONAI's vvc": it is ``std / mean`` over all pixels of all realisations, which for binary realisations is
  ``sqrt((1 - f) / f)`` (up to Bessel's correction), ``f`` the mean predicted foreground fraction: a measure of how
  small the predicted foreground is, not of how much the realisations disagree.

Each signal gets a ``QualityCalibration`` fitted on the validation cases; the test table gives Pearson r of the signal
with true Dice (with its sign) and the mean absolute error of the calibrated Dice, on the test cases where the signal
is defined, plus the same on the cases where all signals are defined, and the error of predicting the validation
mean Dice for every case (no signal at all). A second table gives Pearson r per degradation. ``--quick`` trains for
only 30 steps: a smoke run whose numbers mean nothing.

``--task mni152`` is the real-anatomy task of issue 18, built to match the setting the issue measured (a 2D MONAI
UNet on real brain anatomy, held-out slices under graded noise and bias field, 3 training seeds x 2 calibration / test
splits by slice), decided before any test figure was read:

- axial 1 mm slices of the MNI152 tissue data nilearn ships (nothing downloaded), 48 x 48: enough slices (59 train)
  for a network that segments clean held-out slices well (its clean Dice is printed), at CPU cost;
- blocks of ``MNI_BLOCK`` neighbouring slices are the split unit, with a slice dropped at every change of split: no
  held-out slice is adjacent to a training slice, and none of the test part to one of the calibration part;
- every held-out slice under noise, bias field and blur at graded levels, so the test Dice spreads widely (printed);
- the two held-out parts swap roles (calibrate on one, test on the other): 2 splits per seed, all of it through
  ``MeanSAQualityHandler`` with ``group="block"`` so that its nested CV never splits a block.

About 3.5 minutes with ``OMP_NUM_THREADS=1``; ``--quick`` is the smoke run the tests use.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.data import MetaTensor, TestTimeAugmentation
from monai.losses import DiceCELoss
from monai.metrics import compute_dice
from monai.networks.nets import UNet
from monai.transforms import (
    Compose,
    RandFlipd,
    RandGaussianNoised,
    RandRotate90d,
    RandRotated,
    RandScaleIntensityd,
)
from monai.utils import set_determinism

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.results import BenchmarkResult, Check, Table, command, machine_line  # noqa: E402
from monai_protoseg import FeatureRecorder, QualityCalibration, QualityEstimator, candidate_layers, sa_score  # noqa: E402
from monai_protoseg.estimator import (  # noqa: E402
    ALPHAS,
    MARGIN_FEATURES,
    PREDICTION_FEATURES,
    PROTOTYPE_FEATURES,
    SPREAD_PREFIX,
    TTA_FEATURE,
    activation_spread,
    default_feature_sets,
    feature_names,
    quality_features,
)
from monai_protoseg.synthetic import DEGRADATIONS, case_plan, make_case  # noqa: E402

TRAIN_SOURCES = 1_000_000
"""First source seed of the training cases; validation uses seeds from 0, test the seeds after validation's."""

SIGNALS = ("mean SA", "confidence", "TTA, 1/(1+vvc)", "TTA, MONAI's vvc")


def train(network: torch.nn.Module, steps: int, batch: int, size: int, max_difficulty: float, seed: int) -> float:
    """Train on fresh cases every step (new source seeds, difficulty uniform in [0, max_difficulty]); final loss."""
    rng = np.random.default_rng(seed)
    loss_function = DiceCELoss(sigmoid=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=2e-3)
    network.train()
    for step in range(steps):
        cases = [
            make_case(TRAIN_SOURCES + step * batch + i, size, rng.uniform(0, max_difficulty), rng.choice(DEGRADATIONS))
            for i in range(batch)
        ]
        images = torch.from_numpy(np.stack([image for image, _ in cases]))
        labels = torch.from_numpy(np.stack([label for _, label in cases])).float()
        optimizer.zero_grad()
        loss = loss_function(network(images), labels)
        loss.backward()
        optimizer.step()
    network.eval()
    return float(loss.detach())


def tta_transform(seed: int) -> Compose:
    """Random flips, rotations and intensity changes; MONAI inverts the spatial ones on the prediction."""
    keys = ["image"]
    transform = Compose(
        [
            RandFlipd(keys, prob=0.5, spatial_axis=0),
            RandFlipd(keys, prob=0.5, spatial_axis=1),
            RandRotate90d(keys, prob=0.5),
            RandRotated(keys, range_x=math.pi / 12, prob=0.5, padding_mode="border"),
            RandScaleIntensityd(keys, factors=0.1, prob=0.5),
            RandGaussianNoised(keys, prob=0.5, std=0.05),
        ]
    )
    transform.set_random_state(seed=seed)
    return transform


def case_signals(network: torch.nn.Module, layers: Sequence[str], mean_sa_layers: Sequence[int],
                 tta: TestTimeAugmentation, realisations: int, image: np.ndarray, label: np.ndarray) -> dict:
    """The quality signals of one case (no ground truth used), the estimator's feature row, and the true Dice."""
    with torch.no_grad(), FeatureRecorder(network, layers) as recorder:
        prob = torch.sigmoid(network(torch.from_numpy(image)[None]))
    prediction = prob > 0.5
    layer_sa = torch.stack([sa_score(recorder[layer], prob, prediction) for layer in layers])  # (L,)
    spread = activation_spread({layer: recorder[layer] for layer in layers})
    features = quality_features(prob, prediction, layer_sa.view(1, -1, 1), mean_sa_layers, spread=spread)[0, 0]
    confidence = torch.maximum(prob, 1 - prob).mean()

    with torch.no_grad():
        outputs = tta({"image": MetaTensor(torch.from_numpy(image))}, num_examples=realisations)
    volumes = outputs.sum(dim=(1, 2, 3))
    vvc = volumes.std() / volumes.mean()
    monai_vvc = outputs.std() / outputs.mean()  # what TestTimeAugmentation returns with return_full_data=False

    true_dice = compute_dice(prediction.float(), torch.from_numpy(label)[None].float(), ignore_empty=False)
    return {
        "mean SA": float(layer_sa[list(mean_sa_layers)].mean()),
        "confidence": float(confidence),
        "TTA, 1/(1+vvc)": float(1 / (1 + vvc)),
        "TTA, MONAI's vvc": float(1 / (1 + monai_vvc)),
        "features": features.numpy(),
        "true Dice": float(true_dice),
    }


def profile_layers(network: torch.nn.Module) -> tuple[list[str], list[int]]:
    """The SA-profile layers (every candidate layer) and the indices of the two averaged into mean SA."""
    layers = candidate_layers(network)
    return layers, [len(layers) - 3, len(layers) - 2]


def evaluate(
    network: torch.nn.Module, plan: list[dict], size: int, realisations: int, seed: int
) -> dict[str, np.ndarray]:
    """Signals, feature rows (``"features"``, ``(N, F)``), source seeds and true Dice of every case of ``plan``."""
    layers, mean_sa_layers = profile_layers(network)
    with warnings.catch_warnings():  # the intensity transforms are random but need no inverse; TTA warns about them
        warnings.filterwarnings("ignore", message="TTA has encountered issues")
        tta = TestTimeAugmentation(
            tta_transform(seed),
            batch_size=realisations,
            inferrer_fn=lambda x: (torch.sigmoid(network(x)) > 0.5).float(),
            orig_key="image",
            return_full_data=True,
            progress=False,
        )
    rows = []
    for case in plan:
        image, label = make_case(case["source"], size, case["difficulty"], case["degradation"])
        rows.append(case_signals(network, layers, mean_sa_layers, tta, realisations, image, label))
    arrays = {key: np.array([row[key] for row in rows]) for key in rows[0]}
    arrays["source"] = np.array([case["source"] for case in plan])
    return arrays


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of ``x`` and ``y``; NaN with fewer than 3 cases or a constant one."""
    return float(np.corrcoef(x, y)[0, 1]) if x.size > 2 and x.std() > 0 and y.std() > 0 else math.nan


def score_rows(validation: dict[str, np.ndarray], test: dict[str, np.ndarray]) -> list[list]:
    """Table rows: signal, then n, Pearson r and MAE on the test cases where the signal is defined, the same on the
    cases where all signals are defined, and the calibration's own validation r and leave-one-out MAE."""
    dice = test["true Dice"]
    common = np.all([~np.isnan(test[name]) for name in SIGNALS], axis=0)
    rows = []
    for name in SIGNALS:
        calibration = QualityCalibration.fit(validation[name], validation["true Dice"])
        error = np.abs(calibration.predict(test[name]) - dice)
        row = [name]
        for subset in (~np.isnan(test[name]), common):
            row += [int(subset.sum()), pearson(test[name][subset], dice[subset]), float(error[subset].mean())]
        rows.append(row + [calibration.pearson_r, calibration.loo_mae])
    error = np.abs(np.nanmean(validation["true Dice"]) - dice)  # no signal: every case gets the validation mean
    rows.append(["none (validation mean Dice)", dice.size, math.nan, float(error.mean()),
                 int(common.sum()), math.nan, float(error[common].mean()), math.nan, math.nan])
    return rows


def signed(value: float) -> str:
    """A correlation with its sign and 3 decimals; NaN as a dash."""
    return "-" if math.isnan(value) else f"{value:+.3f}"


def score_table(rows: list[list]) -> Table:
    """The rows of :func:`score_rows` as a table; r with its sign, NaN as a dash."""
    columns = ["signal", "test n", "Pearson r", "MAE", "common n", "r (common)", "MAE (common)", "val r", "val LOO MAE"]
    cells = []
    for row in rows:
        line = [row[0]]
        for column, value in zip(columns[1:], row[1:]):
            if isinstance(value, int):
                line.append(str(value))
            elif column in ("Pearson r", "r (common)", "val r"):
                line.append(signed(value))
            else:
                line.append("-" if math.isnan(value) else f"{value:.3f}")
        cells.append(line)
    return Table(columns, cells)


def degradation_table(test: dict[str, np.ndarray], plan: list[dict]) -> Table:
    """Pearson r of each signal with true Dice per degradation (test cases where the signal is defined)."""
    dice = test["true Dice"]
    degradations = np.array([case["degradation"] for case in plan])
    rows = []
    for name in SIGNALS:
        keep = [(degradations == degradation) & ~np.isnan(test[name]) for degradation in DEGRADATIONS]
        rows.append([name, *(signed(pearson(test[name][k], dice[k])) for k in keep)])
    spread = [f"{dice[degradations == d].mean():.3f} ± {dice[degradations == d].std():.3f}" for d in DEGRADATIONS]
    rows.append(["true Dice mean ± std", *spread])
    return Table(["signal", *DEGRADATIONS], rows,
                 "Pearson r with true Dice on the test cases, by degradation (cases where the signal is defined):")


FLAG_BELOW = 0.7
"""Cases whose true Dice is under this should be flagged for review; a method flags those whose estimate is under it."""

BASELINES = ("mean SA", "confidence", "TTA, 1/(1+vvc)", "TTA, MONAI's vvc")
"""The single-signal baselines, each calibrated by a straight line (``QualityCalibration``) on the validation cases."""


def flag_scores(estimate: np.ndarray, dice: np.ndarray) -> tuple[float, float]:
    """Precision and recall of flagging ``estimate < FLAG_BELOW`` for the cases with ``dice < FLAG_BELOW``."""
    flagged, low = estimate < FLAG_BELOW, dice < FLAG_BELOW
    precision = float((flagged & low).sum() / flagged.sum()) if flagged.any() else math.nan
    recall = float((flagged & low).sum() / low.sum()) if low.any() else math.nan
    return precision, recall


def estimates(validation: dict[str, np.ndarray], test: dict[str, np.ndarray], names: list[str],
              layers: list[str]) -> dict[str, tuple[np.ndarray, float, float]]:
    """The test estimates of each method, with its cross-validated r and MAE on the validation cases.

    Baselines: each signal calibrated by a straight line (leave-one-out r and MAE). Estimators: a
    ``QualityEstimator`` per feature set, and one that chooses among all sets by grouped cross-validation (groups:
    the source image, so the difficulty levels of one image never straddle folds).
    """
    methods = {}
    for name in BASELINES:
        calibration = QualityCalibration.fit(validation[name], validation["true Dice"])
        methods[name] = (calibration.predict(test[name]), calibration.pearson_r, calibration.loo_mae)
    sets = default_feature_sets(names)
    for label, chosen_sets in [*((f"estimator: {set_name}", {set_name: columns}) for set_name, columns in sets.items()),
                               ("estimator: chosen by CV", sets)]:
        try:
            estimator = QualityEstimator.fit(validation["features"], validation["true Dice"], validation["source"],
                                             feature_names=names, layers=layers, feature_sets=chosen_sets)
        except ValueError as error:  # too few valid validation cases (a --quick run): said in the table, not hidden
            methods[f"{label} (not fitted: {error})"] = (np.full(test["true Dice"].size, math.nan), math.nan, math.nan)
            continue
        score = estimator.feature_sets[estimator.chosen]
        if len(chosen_sets) > 1:
            label += f" ({estimator.chosen})"
        methods[label] = (estimator.predict(test["features"]), score.cv_r, score.cv_mae)
    return methods


def estimator_table(methods: dict[str, tuple[np.ndarray, float, float]], dice: np.ndarray) -> Table:
    """Pearson r and MAE of each method's estimated Dice on the test cases, and its flagging precision and recall."""
    rows = []
    for name, (estimate, cv_r, cv_mae) in methods.items():
        defined = ~np.isnan(estimate)
        if not defined.any():
            rows.append([name, "0", *["-"] * 6])
            continue
        precision, recall = flag_scores(estimate[defined], dice[defined])
        rows.append([name, str(int(defined.sum())), signed(pearson(estimate[defined], dice[defined])),
                     f"{np.abs(estimate[defined] - dice[defined]).mean():.3f}",
                     *("-" if math.isnan(value) else f"{value:.2f}" for value in (precision, recall)),
                     signed(cv_r), f"{cv_mae:.3f}"])
    columns = ["method", "test n", "r (estimate)", "MAE", "flag precision", "flag recall", "val CV r", "val CV MAE"]
    title = (f"Estimated Dice on the test cases: Pearson r and MAE against true Dice, and flagging cases with true Dice "
             f"< {FLAG_BELOW} (estimate < {FLAG_BELOW}): precision and recall ({int((dice < FLAG_BELOW).sum())} of "
             f"{dice.size} test cases are below). Validation columns: for the baselines the signal's in-sample r and the "
             "calibration's leave-one-out MAE; for the estimators grouped cross-validation (by source image).")
    return Table(columns, rows, title)


def estimator_checks(methods: dict[str, tuple[np.ndarray, float, float]], dice: np.ndarray) -> list[Check]:
    """The chosen estimator against the best single-signal baseline, in r and in MAE."""
    def r_and_mae(estimate: np.ndarray) -> tuple[float, float]:
        defined = ~np.isnan(estimate)
        if not defined.any():
            return math.nan, math.nan
        return pearson(estimate[defined], dice[defined]), float(np.abs(estimate[defined] - dice[defined]).mean())

    chosen = r_and_mae(next(estimate for name, (estimate, _, _) in methods.items() if "chosen by CV" in name))
    baselines = {name: r_and_mae(methods[name][0]) for name in BASELINES}
    best_r = max(baselines, key=lambda name: baselines[name][0])
    best_mae = min(baselines, key=lambda name: baselines[name][1])
    return [
        Check(f"estimator r - best baseline r ({best_r})", chosen[0] - baselines[best_r][0], "", 0.0, ">"),
        Check(f"estimator MAE / best baseline MAE ({best_mae})", chosen[1] / baselines[best_mae][1], "x", 1.0, "<="),
    ]


# ---------------------------------------------------------------------------------------------------------------------
# Real anatomy: MNI152 tissue slices (issue 18)

MNI_DEGRADATIONS = ("noise", "bias", "blur")
"""The graded degradations of the real-anatomy task."""

MNI_NOISE_STD = 0.25
"""Gaussian noise standard deviation at difficulty 1 (the T1 slices are in [0, 1])."""

MNI_BIAS_RANGE = 3.0
"""A multiplicative bias field spans ``MNI_BIAS_RANGE ** +/-1`` at difficulty 1 (a random smooth quadratic surface)."""

MNI_BLUR_SIGMA = 1.5
"""Gaussian blur sigma in pixels at difficulty 1."""

COVERAGE = 0.9
"""Nominal coverage of the intervals in the benchmark."""


def degrade_slice(image: np.ndarray, degradation: str, difficulty: float, rng: np.random.Generator) -> np.ndarray:
    """One T1 slice degraded by noise, a smooth multiplicative bias field or blur, at ``difficulty`` in [0, 1]."""
    size = image.shape[0]
    if degradation == "noise":
        return image + difficulty * MNI_NOISE_STD * rng.standard_normal(image.shape)
    if degradation == "bias":
        y, x = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
        field = np.tensordot(rng.standard_normal(5), np.stack([x, y, x * x, y * y, x * y]), axes=1)
        return image * MNI_BIAS_RANGE ** (difficulty * field / np.abs(field).max())
    if degradation == "blur":
        sigma = difficulty * MNI_BLUR_SIGMA
        if sigma == 0:
            return image
        radius = math.ceil(3 * sigma)
        kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
        kernel /= kernel.sum()
        for axis in (0, 1):
            image = np.apply_along_axis(lambda line: np.convolve(np.pad(line, radius, mode="reflect"), kernel,
                                                                 mode="valid"), axis, image)
        return image
    raise ValueError(f"degradation must be one of {MNI_DEGRADATIONS}, got {degradation!r}.")


MNI_SIZE = 48
"""Slice edge in pixels (4 mm pixels): the brain's grey / white matter pattern is still resolved."""

MNI_BLOCK = 6
"""Neighbouring 1 mm slices per block: the unit of the train / held-out split and of the calibration / test split."""


def mni152_sets(size: int, levels: int) -> dict[str, list[dict]]:
    """Train slices (clean) and two held-out parts ``"a"`` and ``"b"`` (every slice at every degradation and level).

    1 mm axial slices (at least 10 % brain) are cut into blocks of ``MNI_BLOCK`` neighbouring slices
    (``split_by_blocks``, one slice left out at every change of split): half the blocks train, a quarter each go to
    ``"a"`` and ``"b"``, so slices of different splits are at least 2 mm apart. Each case is a dict with ``image``
    (float32 ``(size, size)``), ``label`` (``(size, size)``, 0/1/2), ``name``, ``z`` (the slice's index, 1 mm
    apart), ``block``, and for held-out cases ``degradation`` and ``level``.
    """
    from monai_protoseg.mni152 import mni152_axial_slices, split_by_blocks

    slices = mni152_axial_slices(size, slice_thickness=1, min_brain_fraction=0.1)
    z = slices["z"].tolist()
    splits = split_by_blocks(z, block_size=MNI_BLOCK, gap=1, fractions={"a": 0.25, "b": 0.25}, seed=0)
    difficulties = np.linspace(0, 1, levels)
    sets: dict[str, list[dict]] = {"train": [], "a": [], "b": []}
    for i, split in enumerate(splits):
        if split is None:
            continue
        image, label = slices["t1"][i].numpy(), slices["label"][i].numpy()
        block = (z[i] - z[0]) // MNI_BLOCK
        if split == "train":
            sets[split].append({"image": image, "label": label, "name": f"z{z[i]:03d}", "z": z[i], "block": block})
            continue
        for degradation in MNI_DEGRADATIONS:
            for level, difficulty in enumerate(difficulties):
                rng = np.random.default_rng([z[i], level, MNI_DEGRADATIONS.index(degradation)])
                degraded = degrade_slice(image.astype(np.float64), degradation, float(difficulty), rng)
                sets[split].append({"image": degraded.astype(np.float32), "label": label,
                                    "name": f"z{z[i]:03d}_{degradation}{level}", "z": z[i], "block": block,
                                    "degradation": degradation, "level": level})
    return sets


def train_tissue_network(train_cases: list[dict], steps: int, seed: int) -> torch.nn.Module:
    """A MONAI 2D UNet (16, 32, 64; 3 classes: background, grey and white matter) trained on the clean train slices
    with random left-right flips and mild noise / bias (difficulty up to 0.3)."""
    set_determinism(seed)
    rng = np.random.default_rng(seed)
    network = UNet(2, 1, 3, channels=(16, 32, 64), strides=(2, 2), num_res_units=1)
    loss_function = DiceCELoss(softmax=True, to_onehot_y=True)
    optimizer = torch.optim.Adam(network.parameters(), lr=5e-3)
    network.train()
    for _ in range(steps):
        chosen = rng.choice(len(train_cases), size=16)
        images, labels = [], []
        for index in chosen:
            case = train_cases[index]
            degradation = MNI_DEGRADATIONS[rng.integers(2)]  # noise or bias
            image = degrade_slice(case["image"].astype(np.float64), degradation, rng.uniform(0, 0.3), rng)
            label = case["label"]
            if rng.random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            images.append(image[None].astype(np.float32))
            labels.append(label[None].astype(np.int64))
        optimizer.zero_grad()
        loss = loss_function(network(torch.from_numpy(np.stack(images))), torch.from_numpy(np.stack(labels)))
        loss.backward()
        optimizer.step()
    return network.eval()


def handler_rows(network: torch.nn.Module, cases: list[dict], folder: str, **options) -> list[dict]:
    """Run ``cases`` through a ``SupervisedEvaluator`` with a ``MeanSAQualityHandler`` (``options``), grouped by the
    ``block`` meta-data key; the rows of the CSV it writes."""
    import csv

    from monai.engines import SupervisedEvaluator

    from monai_protoseg import MeanSAQualityHandler

    batches = []
    for start in range(0, len(cases), 32):
        part = cases[start:start + 32]
        meta = {"filename_or_obj": [f"/data/{case['name']}.nii.gz" for case in part],
                "block": [case["block"] for case in part]}
        batches.append({"image": MetaTensor(torch.from_numpy(np.stack([case["image"] for case in part])[:, None]),
                                            meta=meta),
                        "label": torch.from_numpy(np.stack([case["label"] for case in part])[:, None]).long()})
    handler = MeanSAQualityHandler(output_dir=folder, activation="softmax", class_names=["grey", "white"],
                                   group="block", coverage=COVERAGE, **options)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    val_handlers=[handler])
    evaluator.logger.setLevel("WARNING")
    handler.logger.setLevel("ERROR")
    evaluator.run()
    with open(handler.csv_path) as stream:
        return list(csv.DictReader(stream))


def column(rows: list[dict], name: str) -> np.ndarray:
    """One CSV column as floats."""
    return np.array([float(row[name]) for row in rows])


def mae_r(estimate: np.ndarray, dice: np.ndarray) -> tuple[float, float]:
    """MAE and Pearson r of the estimates where they are defined."""
    defined = ~np.isnan(estimate)
    return float(np.abs(estimate[defined] - dice[defined]).mean()), pearson(estimate[defined], dice[defined])


MNI_CONFIGS = {"estimator, handler defaults": {}, "estimator, tta_flip=[-1] (left-right)": {"tta_flip": [-1]},
               "estimator, tta_flip=[0, 1] (both axes, averaged)": {"tta_flip": [0, 1]}}
"""The handler configurations compared on the real-anatomy task."""

MNI_BASELINES = {"mean_sa": False, "fg_prob": False, "max_prob": False, "tta_disagreement": True, "entropy": True,
                 "boundary_margin": False, "proto_near": True}
"""The single signals calibrated as baselines (``True``: the signal is ``1 - value``, so that it rises with Dice)."""

PREVIOUS_FEATURES = ("mean_sa", "sa_", "fg_prob", "max_prob", "volume")
"""The estimator's features before issue 18's item 4 (``sa_`` stands for the SA profile)."""

FEATURE_ADDITIONS = {"features: SA + fg_prob, max_prob, volume (before issue 18)": (),
                     "features: + entropy": ("entropy",),
                     "features: + boundary_margin": ("boundary_margin",),
                     "features: + entropy, boundary_margin": MARGIN_FEATURES,
                     "features: + activation spread (spread_{layer})": (SPREAD_PREFIX,),
                     "features: + entropy, boundary_margin, activation spread (default sets)": (*MARGIN_FEATURES,
                                                                                               SPREAD_PREFIX),
                     "features: + prototype (proto_in, proto_out, proto_near)": PROTOTYPE_FEATURES,
                     "features: + all of them": (*MARGIN_FEATURES, SPREAD_PREFIX, *PROTOTYPE_FEATURES)}
"""Estimators fitted on the calibration CSV's columns (the default sets, ``all`` holding every column named): the
features before issue 18 and each addition of its item 4 (``spread_`` stands for every ``spread_{layer}`` column)."""

DEFAULT_FEATURES = "features: + entropy, boundary_margin, activation spread (default sets)"
"""The :data:`FEATURE_ADDITIONS` row whose columns are the handler's default sets: the variants change one option."""

VARIANTS = {"variant: per_class=True (default sets)": {"per_class": True},
            "variant: per_class=False (default sets)": {"per_class": False},
            "variant: selection one_se (default sets)": {"selection": "one_se"},
            "variant: selection min (default sets)": {"selection": "min"},
            "variant: target identity (default sets)": {"target": "identity"}}
"""Estimators on the default sets' columns with one option changed from the handler's defaults (``per_class="auto"``,
``selection="one_se_largest"``, ``target="logit"``): per-class estimators always or never, the other selection rules,
Dice as the target."""


def mni152_seed(sets: dict[str, list[dict]], steps: int, seed: int, folder: str) -> list[dict[str, dict]]:
    """Train one network; for each calibration / test split (``a`` / ``b`` and ``b`` / ``a``) score every method on
    the test rows: one ``{method: {"mae", "r", ...}}`` per split, and ``"data"``: the clean and test Dice."""
    network = train_tissue_network(sets["train"], steps, seed)
    per_split = []
    for calibration_part, test_part in (("a", "b"), ("b", "a")):
        results: dict[str, dict] = {}
        tables = {}
        for label, options in MNI_CONFIGS.items():
            path = f"{folder}/seed{seed}_{calibration_part}_{len(results)}"
            validation = handler_rows(network, sets[calibration_part], path, filename="quality_validation.csv",
                                      fit_estimator=True, fit_calibration=True, estimator=f"{path}/estimator.json",
                                      calibration=f"{path}/calibration.json", **options)
            test = handler_rows(network, sets[test_part], path, estimator=f"{path}/estimator.json",
                                calibration=f"{path}/calibration.json", **options)
            tables[label] = (validation, test)
            estimator = QualityEstimator.load(f"{path}/estimator.json")
            dice, estimate = column(test, "true_dice"), column(test, "estimated_dice")
            low, high = column(test, "estimate_low"), column(test, "estimate_high")
            defined = ~np.isnan(estimate) & ~np.isnan(dice)
            mae, r = mae_r(estimate[defined], dice[defined])
            inside = (low[defined] <= dice[defined]) & (dice[defined] <= high[defined])
            results[label] = {"mae": mae, "r": r, "nested_mae": estimator.nested_mae, "nested_r": estimator.nested_r,
                              "chosen": chosen_sets(estimator), "coverage": float(inside.mean()),
                              "width": float((high - low)[defined].mean()),
                              "flags": {rule: flag_scores(bound[defined], dice[defined])
                                        for rule, bound in (("estimate", estimate), ("upper", high))}}
        validation, test = tables["estimator, tta_flip=[-1] (left-right)"]
        dice_val, dice = column(validation, "true_dice"), column(test, "true_dice")
        keep_val, keep = ~np.isnan(dice_val), ~np.isnan(dice)
        for name, flip in MNI_BASELINES.items():
            x_val, x = column(validation, name), column(test, name)
            x_val, x = (1 - x_val, 1 - x) if flip else (x_val, x)
            calibration = QualityCalibration.fit(x_val[keep_val], dice_val[keep_val])
            mae, r = mae_r(calibration.predict(x[keep]), dice[keep])
            results[f"baseline: {name}, calibrated"] = {"mae": mae, "r": r, "nested_mae": calibration.loo_mae,
                                                        "nested_r": calibration.pearson_r}
        results.update(feature_experiments(*tables["estimator, handler defaults"]))
        results.update(in_sample_ceilings(tables["estimator, tta_flip=[-1] (left-right)"][1]))
        clean = [row for row in test if row["case"].endswith("0") and not np.isnan(float(row["true_dice"]))]
        clean_dice = {name: float(np.mean([float(row["true_dice"]) for row in clean if row["class"] == name]))
                      for name in ("grey", "white")}
        results["data"] = {"test_dice": dice[keep], "clean_dice": clean_dice}
        per_split.append(results)
    return per_split


def feature_experiments(validation: list[dict], test: list[dict]) -> dict[str, dict]:
    """Estimators fitted on the calibration CSV's feature columns (grouped by block, nested CV on), scored on the test
    rows: the features of the default sets and each addition (:data:`FEATURE_ADDITIONS`), and the handler's options
    changed one at a time (:data:`VARIANTS`)."""
    every = [name for name in validation[0] if name.startswith(("sa_", SPREAD_PREFIX))
             or name in ("mean_sa", *PREDICTION_FEATURES, *MARGIN_FEATURES, *PROTOTYPE_FEATURES)]
    previous = [name for name in every if name.startswith(PREVIOUS_FEATURES)]
    dice_val, dice = column(validation, "true_dice"), column(test, "true_dice")
    groups = np.array([row["group"] for row in validation])
    classes_val, classes = np.array([row["class"] for row in validation]), np.array([row["class"] for row in test])
    variants = {label: (previous + [name for name in every if name.startswith(added)], {})
                for label, added in FEATURE_ADDITIONS.items()}
    defaults = variants[DEFAULT_FEATURES][0]
    variants.update({label: (defaults, options) for label, options in VARIANTS.items()})
    results = {}
    for label, (columns, options) in variants.items():
        x_val = np.stack([column(validation, name) for name in columns], 1)
        x = np.stack([column(test, name) for name in columns], 1)
        estimator = QualityEstimator.fit(x_val, dice_val, groups, feature_names=columns, layers=[], classes=classes_val,
                                         feature_sets={**default_feature_sets(columns), "all": columns}, **options)
        estimate = estimator.predict(x, classes)
        keep = ~np.isnan(dice) & ~np.isnan(estimate)
        mae, r = mae_r(estimate[keep], dice[keep])
        results[label] = {"mae": mae, "r": r, "nested_mae": estimator.nested_mae, "nested_r": estimator.nested_r,
                          "chosen": chosen_sets(estimator)}
    return results


def chosen_sets(estimator: QualityEstimator) -> str:
    """The chosen feature set, or each class's (``grey: all / white: confidence``) for per-class estimators."""
    if not estimator.per_class:
        return estimator.chosen
    return " / ".join(f"{label}: {model.chosen}" for label, model in estimator.per_class.items())


def in_sample_ceilings(test: list[dict]) -> dict[str, dict]:
    """What the estimator's model could reach at best: fitted on the test rows themselves (the default sets' ``all``
    columns, with and without ``tta_disagreement``; the logit target and smallest penalty) and scored on the same
    rows. No held-out figure of this model on these features can be expected to do better."""
    columns = [name for name in test[0] if name in ("mean_sa", *PREDICTION_FEATURES, *MARGIN_FEATURES)
               or name.startswith(("sa_", SPREAD_PREFIX))]
    dice, groups = column(test, "true_dice"), np.array([row["group"] for row in test])
    results = {}
    for label, names in (("ceiling: default sets, fitted on the test part itself", columns),
                         ("ceiling: default sets + tta_disagreement, fitted on the test part itself",
                          [*columns, TTA_FEATURE])):
        x = np.stack([column(test, name) for name in names], 1)
        estimator = QualityEstimator.fit(x, dice, groups, feature_names=names, layers=[], feature_sets={"all": names},
                                         alphas=[min(ALPHAS)], nested=False)
        estimate = estimator.predict(x)
        keep = ~np.isnan(dice) & ~np.isnan(estimate)
        mae, r = mae_r(estimate[keep], dice[keep])
        results[label] = {"mae": mae, "r": r}
    return results


def mni152_task(args: argparse.Namespace, quick: bool) -> tuple[str, list[Table], list[Check]]:
    """The real-anatomy task: description, tables and checks, each figure the mean over training seeds and splits."""
    import tempfile

    size = args.mni_size or (32 if quick else MNI_SIZE)
    seeds = args.mni_seeds or (1 if quick else 3)
    steps = args.mni_steps if args.mni_steps is not None else (20 if quick else 300)
    levels = args.mni_levels or (2 if quick else 5)
    start = time.perf_counter()
    sets = mni152_sets(size, levels)
    runs = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in range(seeds):
            runs += mni152_seed(sets, steps, seed, folder)
            print(f"quality (MNI152): seed {seed} done after {time.perf_counter() - start:.0f} s", flush=True)
    methods = [method for method in runs[0] if method != "data"]

    def mean(method: str, key: str) -> float:
        values = [result[method][key] for result in runs if key in result[method]]
        return float(np.mean(values)) if values else math.nan

    def cell(value: float, signed_value: bool = False) -> str:
        return "-" if math.isnan(value) else (signed(value) if signed_value else f"{value:.3f}")

    rows = []
    for method in methods:
        flags = [result[method].get("flags") for result in runs]
        flag_cells = ["-"] * 4
        if flags[0] is not None:
            flag_cells = [cell(float(np.nanmean([f[rule][i] for f in flags])))
                          for rule in ("estimate", "upper") for i in (0, 1)]
        chosen = ", ".join(result[method]["chosen"] for result in runs) if "chosen" in runs[0][method] else "-"
        rows.append([method, cell(mean(method, "nested_r"), True), cell(mean(method, "nested_mae")),
                     cell(mean(method, "r"), True), cell(mean(method, "mae")), cell(mean(method, "coverage")),
                     cell(mean(method, "width")), *flag_cells, chosen])
    columns = ["method", "val nested CV r", "val nested CV MAE", "test r", "test MAE", "coverage", "mean width",
               "flag precision (estimate)", "flag recall (estimate)", "flag precision (upper)", "flag recall (upper)",
               "chosen set per run"]
    title = (f"Real anatomy (MNI152 tissue slices): mean over {seeds} training seed(s) x 2 calibration / test splits. "
             "Validation columns: nested grouped CV on the calibration part (baselines: in-sample r, leave-one-out "
             f"MAE); test columns: the held-out part. Intervals: split-conformal, nominal coverage {COVERAGE}. Flags: "
             f"true Dice < {FLAG_BELOW}; rule 'estimate' flags estimate < {FLAG_BELOW}, rule 'upper' flags the "
             "interval's upper bound < it. Baselines: one signal, linearly calibrated on the calibration rows. "
             "'features:' and 'variant:' rows: estimators fitted on the calibration CSV's columns (handler defaults "
             "run, no TTA).")
    table = Table(columns, rows, title)
    default = "estimator, handler defaults"
    baselines = [method for method in methods if method.startswith("baseline:")]
    best = min(baselines, key=lambda method: mean(method, "mae"))
    checks = [
        Check(f"real anatomy: estimator MAE / best calibrated baseline MAE ({best})",
              mean(default, "mae") / mean(best, "mae"), "x", 0.8, "<="),
        Check("real anatomy: estimator r", mean(default, "r"), "", 0.93, ">="),
        Check(f"real anatomy: interval coverage, distance from nominal {COVERAGE}",
              abs(mean(default, "coverage") - COVERAGE), "", 0.05, "<="),
    ]
    tta = "estimator, tta_flip=[-1] (left-right)"
    checks.append(Check(f"real anatomy: estimator with {tta.removeprefix('estimator, ')}: MAE / best calibrated "
                        f"baseline MAE", mean(tta, "mae") / mean(best, "mae"), "x", 0.8, "<="))
    checks.append(Check(f"real anatomy: estimator with {tta.removeprefix('estimator, ')}: r", mean(tta, "r"), "", 0.93,
                        ">="))
    for method in methods:
        if method.startswith("estimator, tta_flip"):
            checks.append(Check(f"real anatomy: MAE {method.removeprefix('estimator, ')} / without TTA",
                                mean(method, "mae") / mean(default, "mae"), "x", 1.0, "<="))
    dice = np.concatenate([result["data"]["test_dice"] for result in runs])
    clean = {name: np.mean([result["data"]["clean_dice"][name] for result in runs]) for name in ("grey", "white")}
    description = (
        f"Real anatomy: MNI152 2009 T1 axial 1 mm slices (nilearn) at {size}x{size}, labelled background / grey / "
        f"white matter, split by blocks of {MNI_BLOCK} neighbouring slices (one slice dropped at every change of "
        f"split): {len(sets['train'])} clean train slices, two held-out parts of {len(sets['a'])} and "
        f"{len(sets['b'])} cases (every held-out slice under {', '.join(MNI_DEGRADATIONS)} at {levels} levels from 0 "
        f"to 1). Per seed ({seeds}): a MONAI 2D UNet (16, 32, 64), softmax, trained {steps} steps x 16 slices "
        f"(random flips, mild noise / bias); clean held-out Dice grey {clean['grey']:.3f}, white {clean['white']:.3f}. "
        "Each part calibrates once and tests the other (2 splits): every figure through MeanSAQualityHandler "
        "(group='block', fitted on the calibration part, applied to the test part). Test true Dice (all runs): mean "
        f"{dice.mean():.3f}, std {dice.std():.3f}, min {dice.min():.3f}, quartiles {np.percentile(dice, 25):.3f} / "
        f"{np.median(dice):.3f} / {np.percentile(dice, 75):.3f}, max {dice.max():.3f}. Took "
        f"{time.perf_counter() - start:.0f} s."
    )
    return description, [table], checks


def parser() -> argparse.ArgumentParser:
    """The command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 32x32, few steps and cases")
    parser.add_argument("--size", type=int, help="image edge in pixels (default 64; 32 with --quick)")
    parser.add_argument("--train-steps", type=int, help="training steps of 16 fresh cases (default 400; 30 quick)")
    parser.add_argument("--train-difficulty", type=float, default=0.2, help="largest training difficulty (0.2)")
    parser.add_argument("--sources", type=int, help="source images per evaluation set (default 24; 8 with --quick)")
    parser.add_argument("--levels", type=int, default=6, help="difficulties per source, 0 to 1 evenly (default 6)")
    parser.add_argument("--tta", type=int, default=8, help="test-time augmentation realisations per case (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("synthetic", "mni152", "both"), default="both",
                        help="synthetic cases, real anatomy (MNI152 tissue slices, needs nilearn), or both (default)")
    parser.add_argument("--mni-size", type=int, help="MNI152 slice edge in pixels (default 48; 32 with --quick)")
    parser.add_argument("--mni-seeds", type=int, help="MNI152 training seeds (default 3; 1 with --quick)")
    parser.add_argument("--mni-steps", type=int, help="MNI152 training steps of 16 slices (default 300; 20 quick)")
    parser.add_argument("--mni-levels", type=int, help="MNI152 degradation levels, 0 to 1 (default 5; 2 quick)")
    return parser


def synthetic_task(args: argparse.Namespace, quick: bool) -> tuple[str, list[Table], list[Check]]:
    """The synthetic task: description, tables and checks."""
    size = args.size or (32 if quick else 64)
    steps = args.train_steps if args.train_steps is not None else (30 if quick else 400)
    sources = args.sources or (8 if quick else 24)

    start = time.perf_counter()
    set_determinism(args.seed)
    network = UNet(2, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss = train(network, steps, 16, size, args.train_difficulty, args.seed)
    trained = time.perf_counter()
    print(f"quality: trained {steps} steps x 16 cases of {size}x{size} (difficulty <= {args.train_difficulty}) in "
          f"{trained - start:.0f} s, final DiceCE loss {loss:.3f}", flush=True)

    difficulties = tuple(np.linspace(0, 1, args.levels).round(3).tolist())
    validation_plan = case_plan(sources * args.levels, seed=0, difficulties=difficulties)
    test_plan = case_plan(sources * args.levels, seed=sources, difficulties=difficulties)
    validation = evaluate(network, validation_plan, size, args.tta, args.seed)
    test = evaluate(network, test_plan, size, args.tta, args.seed + 1)
    print(f"quality: evaluated {len(validation_plan)} validation + {len(test_plan)} test cases in "
          f"{time.perf_counter() - trained:.0f} s", flush=True)

    dice = test["true Dice"]
    undefined = ""
    for name in SIGNALS:
        missing = np.isnan(test[name])
        if missing.any():
            undefined += (f" {name}: undefined on {missing.sum()} test case(s) (true Dice "
                          f"{dice[missing].mean():.3f} on average there).")
    description = (
        f"MONAI 2D UNet (16, 32, 64, 128) trained for {steps} steps x 16 synthetic cases of {size}x{size} (difficulty "
        f"<= {args.train_difficulty}, final DiceCE loss {loss:.3f}); {len(validation_plan)} validation and "
        f"{len(test_plan)} test cases ({sources} sources each, difficulties {difficulties}), {args.tta} TTA "
        f"realisations; mean SA of {', '.join(candidate_layers(network)[-3:-1])}; SA profile of all {len(candidate_layers(network))} candidate layers. Test true Dice: mean "
        f"{dice.mean():.3f}, std {dice.std():.3f}, min {dice.min():.3f}, quartiles {np.percentile(dice, 25):.3f} / "
        f"{np.median(dice):.3f} / {np.percentile(dice, 75):.3f}, max {dice.max():.3f}.{undefined} Seeded: the same "
        "numbers on every run on this machine. No target was set; the figures compare each signal's test MAE with that "
        "of no signal (every case gets the validation mean Dice), on the test cases where all signals are defined."
    )
    rows = score_rows(validation, test)
    no_signal = rows[-1][6]  # column 6: MAE on the test cases where all signals are defined
    checks = [Check(f"{row[0]}: MAE / MAE of no signal", row[6] / no_signal) for row in rows[:-1]]
    layers, mean_sa_layers = profile_layers(network)
    methods = estimates(validation, test, feature_names(layers, spread=True), layers)
    checks += estimator_checks(methods, dice)
    return description, [score_table(rows), degradation_table(test, test_plan), estimator_table(methods, dice)], checks


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: the signals' scores on the test cases."""
    options = parser()
    args = options.parse_args(argv)
    if args.levels < 2:
        options.error("--levels must be at least 2 (difficulties 0 and 1)")
    start = time.perf_counter()
    description, tables, checks = "", [], []
    for task, function in (("synthetic", synthetic_task), ("mni152", mni152_task)):
        if args.task in (task, "both"):
            text, more_tables, more_checks = function(args, args.quick)
            description, tables, checks = (description + " " + text).strip(), tables + more_tables, checks + more_checks
    return BenchmarkResult("quality", "Quality estimate without ground truth (issues 3, 6 and 18)",
                           command("bench_quality.py", argv), description, tables, checks,
                           time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> str:
    """Print the machine, run the benchmark and print its Markdown section; return the main table."""
    print(machine_line())
    result = run(sys.argv[1:] if argv is None else argv)
    print("\n" + result.markdown())
    return result.tables[0].markdown()


if __name__ == "__main__":
    main()
