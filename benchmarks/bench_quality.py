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
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Sequence

import monai
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

from monai_protoseg import FeatureRecorder, QualityCalibration, candidate_layers, sa_score  # noqa: E402
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


def case_signals(network: torch.nn.Module, layers: Sequence[str], tta: TestTimeAugmentation, realisations: int,
                 image: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """The three quality signals of one case (no ground truth used), MONAI's vvc, and the true Dice."""
    with torch.no_grad(), FeatureRecorder(network, layers) as recorder:
        prob = torch.sigmoid(network(torch.from_numpy(image)[None]))
    prediction = prob > 0.5
    mean_sa = torch.stack([sa_score(recorder[layer], prob, prediction) for layer in layers]).mean()
    confidence = torch.maximum(prob, 1 - prob).mean()

    with torch.no_grad():
        outputs = tta({"image": MetaTensor(torch.from_numpy(image))}, num_examples=realisations)
    volumes = outputs.sum(dim=(1, 2, 3))
    vvc = volumes.std() / volumes.mean()
    monai_vvc = outputs.std() / outputs.mean()  # what TestTimeAugmentation returns with return_full_data=False

    true_dice = compute_dice(prediction.float(), torch.from_numpy(label)[None].float(), ignore_empty=False)
    return {
        "mean SA": float(mean_sa),
        "confidence": float(confidence),
        "TTA, 1/(1+vvc)": float(1 / (1 + vvc)),
        "TTA, MONAI's vvc": float(1 / (1 + monai_vvc)),
        "true Dice": float(true_dice),
    }


def evaluate(
    network: torch.nn.Module, plan: list[dict], size: int, realisations: int, seed: int
) -> dict[str, np.ndarray]:
    """Signals and true Dice of every case of ``plan``, as arrays keyed by signal name."""
    layers = candidate_layers(network)[-3:-1]
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
        rows.append(case_signals(network, layers, tta, realisations, image, label))
    return {key: np.array([row[key] for row in rows]) for key in rows[0]}


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


def markdown_table(rows: list[list]) -> str:
    """The rows as a Markdown table; r with its sign, NaN as a dash."""
    columns = ["signal", "test n", "Pearson r", "MAE", "common n", "r (common)", "MAE (common)", "val r", "val LOO MAE"]
    lines = ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for row in rows:
        cells = [row[0]]
        for column, value in zip(columns[1:], row[1:]):
            if isinstance(value, int):
                cells.append(str(value))
            elif math.isnan(value):
                cells.append("-")
            else:
                cells.append(f"{value:+.3f}" if column in ("Pearson r", "r (common)", "val r") else f"{value:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> str:
    """Run the benchmark, print the machine, the settings and the Markdown tables; return the main table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a fast smoke run: 32x32, few steps and cases")
    parser.add_argument("--size", type=int, help="image edge in pixels (default 64; 32 with --quick)")
    parser.add_argument("--train-steps", type=int, help="training steps of 16 fresh cases (default 400; 30 quick)")
    parser.add_argument("--train-difficulty", type=float, default=0.2, help="largest training difficulty (0.2)")
    parser.add_argument("--sources", type=int, help="source images per evaluation set (default 24; 8 with --quick)")
    parser.add_argument("--levels", type=int, default=6, help="difficulties per source, 0 to 1 evenly (default 6)")
    parser.add_argument("--tta", type=int, default=8, help="test-time augmentation realisations per case (default 8)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    quick = args.quick
    size = args.size or (32 if quick else 64)
    steps = args.train_steps if args.train_steps is not None else (30 if quick else 400)
    sources = args.sources or (8 if quick else 24)
    if args.levels < 2:
        parser.error("--levels must be at least 2 (difficulties 0 and 1)")
    command = " ".join([".venv/bin/python benchmarks/bench_quality.py", *(sys.argv[1:] if argv is None else argv)])

    start = time.perf_counter()
    set_determinism(args.seed)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
          f"{platform.processor() or 'cpu'}, python {platform.python_version()}, torch {torch.__version__}, "
          f"monai {monai.__version__}")
    network = UNet(2, 1, 1, channels=(16, 32, 64, 128), strides=(2, 2, 2), num_res_units=2)
    loss = train(network, steps, 16, size, args.train_difficulty, args.seed)
    trained = time.perf_counter()
    print(f"trained {steps} steps x 16 cases of {size}x{size} (difficulty <= {args.train_difficulty}) in "
          f"{trained - start:.0f} s, final DiceCE loss {loss:.3f}")

    difficulties = tuple(np.linspace(0, 1, args.levels).round(3).tolist())
    validation_plan = case_plan(sources * args.levels, seed=0, difficulties=difficulties)
    test_plan = case_plan(sources * args.levels, seed=sources, difficulties=difficulties)
    validation = evaluate(network, validation_plan, size, args.tta, args.seed)
    test = evaluate(network, test_plan, size, args.tta, args.seed + 1)
    print(f"evaluated {len(validation_plan)} validation + {len(test_plan)} test cases ({sources} sources each, "
          f"difficulties {difficulties}, {args.tta} TTA realisations) in {time.perf_counter() - trained:.0f} s")
    layers = candidate_layers(network)[-3:-1]
    print(f"mean SA layers: {', '.join(layers)}")

    dice = test["true Dice"]
    print(f"\ntest true Dice: mean {dice.mean():.3f}, std {dice.std():.3f}, min {dice.min():.3f}, "
          f"quartiles {np.percentile(dice, 25):.3f} / {np.median(dice):.3f} / {np.percentile(dice, 75):.3f}, "
          f"max {dice.max():.3f}")
    for name in SIGNALS:
        undefined = np.isnan(test[name])
        if undefined.any():
            print(f"{name}: undefined on {undefined.sum()} test case(s) (true Dice {dice[undefined].mean():.3f} "
                  f"on average there)")
    table = markdown_table(score_rows(validation, test))
    print(f"\n{command}\n\n{table}")

    degradations = np.array([c["degradation"] for c in test_plan])
    print("\nPearson r with true Dice on the test cases, by degradation (cases where the signal is defined):\n")
    print("| signal | " + " | ".join(DEGRADATIONS) + " |\n|---|" + "---:|" * len(DEGRADATIONS))
    for name in SIGNALS:
        cells = []
        for degradation in DEGRADATIONS:
            keep = (degradations == degradation) & ~np.isnan(test[name])
            cells.append(f"{pearson(test[name][keep], dice[keep]):+.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    spread = " | ".join(f"{dice[degradations == d].mean():.3f} ± {dice[degradations == d].std():.3f}"
                        for d in DEGRADATIONS)
    print(f"| true Dice mean ± std | {spread} |")
    print(f"\ntotal time {time.perf_counter() - start:.0f} s")
    return table


if __name__ == "__main__":
    main()
