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
from monai_protoseg.estimator import default_feature_sets, feature_names, quality_features  # noqa: E402
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
    features = quality_features(prob, prediction, layer_sa.view(1, -1, 1), mean_sa_layers)[0, 0]
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
    return parser


def run(argv: Sequence[str] = ()) -> BenchmarkResult:
    """Run the benchmark with the command-line arguments ``argv``: the signals' scores on the test cases."""
    options = parser()
    args = options.parse_args(argv)
    quick = args.quick
    size = args.size or (32 if quick else 64)
    steps = args.train_steps if args.train_steps is not None else (30 if quick else 400)
    sources = args.sources or (8 if quick else 24)
    if args.levels < 2:
        options.error("--levels must be at least 2 (difficulties 0 and 1)")

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
    methods = estimates(validation, test, feature_names(layers), layers)
    checks += estimator_checks(methods, dice)
    return BenchmarkResult("quality", "Quality estimate without ground truth (issues 3 and 6)",
                           command("bench_quality.py", argv), description,
                           [score_table(rows), degradation_table(test, test_plan), estimator_table(methods, dice)],
                           checks, time.perf_counter() - start)


def main(argv: Sequence[str] | None = None) -> str:
    """Print the machine, run the benchmark and print its Markdown section; return the main table."""
    print(machine_line())
    result = run(sys.argv[1:] if argv is None else argv)
    print("\n" + result.markdown())
    return result.tables[0].markdown()


if __name__ == "__main__":
    main()
