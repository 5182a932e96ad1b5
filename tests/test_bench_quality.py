"""benchmarks/bench_quality.py and bench_quality_signals.py run end to end on tiny sizes and print tables of finite
numbers; their signals against hand-computed values."""

from __future__ import annotations

import importlib.util
import math
import pathlib

import numpy as np
import pytest
import torch
from monai.data import TestTimeAugmentation
from monai.networks.nets import UNet
from monai.transforms import Compose, RandFlipd, RandRotate90d

from monai_protoseg import candidate_layers
from monai_protoseg.synthetic import make_case

BENCHMARK = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_quality.py"


def load_benchmark(name: str = "bench_quality"):
    spec = importlib.util.spec_from_file_location(name, BENCHMARK.with_name(f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_prints_a_table_of_finite_numbers(capsys):
    bench_quality = load_benchmark()
    table = bench_quality.main(["--quick", "--size", "32", "--train-steps", "20", "--sources", "4", "--levels", "3",
                                "--tta", "4"])
    printed = capsys.readouterr().out
    assert table in printed and "machine:" in printed
    assert ".venv/bin/python benchmarks/bench_quality.py --quick --size 32" in printed

    lines = table.splitlines()
    assert lines[0].startswith("| signal | test n | Pearson r | MAE |")
    rows = {line.split(" | ")[0].strip("| "): line.strip("|").split("|")[1:] for line in lines[2:]}
    assert list(rows) == [*bench_quality.SIGNALS, "none (validation mean Dice)"]
    for name, cells in rows.items():
        n, r, mae = int(cells[0]), cells[1].strip(), float(cells[2])
        assert 0 < n <= 12 and 0 <= mae <= 1, name
        if name != "none (validation mean Dice)":
            assert -1 <= float(r) <= 1, name
    # confidence is defined on every case, so the full test set (4 sources x 3 difficulties) is scored
    assert int(rows["confidence"][0]) == 12

    # issue 6: every estimator feature set and the one chosen by grouped CV, beside the calibrated baselines
    estimator_lines = printed[printed.index("| method | test n | r (estimate) | MAE | flag precision"):].split("\n\n")[0]
    methods = [line.split(" | ")[0].strip("| ") for line in estimator_lines.splitlines()[2:]]
    assert methods[:len(bench_quality.BASELINES)] == list(bench_quality.BASELINES)
    assert methods[len(bench_quality.BASELINES):-1] == [f"estimator: {name}" for name in
                                                         ("mean_sa", "sa_profile", "confidence", "all")]
    assert methods[-1].startswith("estimator: chosen by CV (")
    assert "estimator MAE / best baseline MAE" in printed

    # issue 18: the real-anatomy task (MNI152 slices through MeanSAQualityHandler) beside the synthetic one
    real = printed[printed.index("| method | val nested CV r | val nested CV MAE | test r | test MAE"):]
    real = real.split("\n\n")[0]
    methods = [line.split(" | ")[0].strip("| ") for line in real.splitlines()[2:]]
    assert methods[:3] == list(bench_quality.MNI_CONFIGS)
    assert {f"baseline: {name}, calibrated" for name in bench_quality.MNI_BASELINES} <= set(methods)
    assert {*bench_quality.FEATURE_ADDITIONS, *bench_quality.VARIANTS} <= set(methods)
    assert {method for method in methods if method.startswith("ceiling:")} == {
        "ceiling: default sets, fitted on the test part itself",
        "ceiling: default sets + tta_disagreement, fitted on the test part itself"}
    for line in real.splitlines()[2:5]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        nested, mae, coverage = float(cells[2]), float(cells[4]), float(cells[5])
        assert 0 <= mae <= 1 and 0 <= nested <= 1 and 0 <= coverage <= 1
    assert "clean held-out Dice grey" in printed and "Test true Dice (all runs): mean" in printed
    for figure in ("real anatomy: estimator MAE / best calibrated baseline MAE", "real anatomy: estimator r",
                   "real anatomy: interval coverage, distance from nominal 0.9"):
        assert figure in printed


def test_degraded_slices_are_graded():
    bench_quality = load_benchmark()
    image = np.random.default_rng(0).uniform(0, 1, (16, 16))
    for degradation in bench_quality.MNI_DEGRADATIONS:  # difficulty 0 leaves the slice as it is
        clean = bench_quality.degrade_slice(image, degradation, 0.0, np.random.default_rng(1))
        np.testing.assert_allclose(clean, image, atol=1e-12)
    noisy = [bench_quality.degrade_slice(image, "noise", d, np.random.default_rng(1)) - image for d in (0.5, 1.0)]
    assert noisy[1].std() == pytest.approx(2 * noisy[0].std()) and noisy[1].std() == pytest.approx(
        bench_quality.MNI_NOISE_STD, rel=0.15)
    blurred = bench_quality.degrade_slice(np.pad(np.ones((4, 4)), 6), "blur", 1.0, np.random.default_rng(0))
    assert blurred.sum() == pytest.approx(16, rel=0.02) and blurred.max() < 1  # blur spreads, keeps the mass
    with pytest.raises(ValueError, match="degradation must be one of"):
        bench_quality.degrade_slice(image, "contrast", 0.5, np.random.default_rng(0))


def test_flagging_precision_and_recall():
    bench_quality = load_benchmark()
    dice = np.array([0.2, 0.5, 0.8, 0.9, 0.6])
    estimate = np.array([0.3, 0.8, 0.5, 0.95, 0.65])  # flags cases 0, 2, 4; truly low: 0, 1, 4
    assert bench_quality.flag_scores(estimate, dice) == pytest.approx((2 / 3, 2 / 3))
    assert math.isnan(bench_quality.flag_scores(np.ones(3), dice[:3])[0])  # nothing flagged: precision undefined


def test_signals_of_an_empty_prediction_and_of_augmentations_that_agree():
    bench_quality = load_benchmark()
    image, label = make_case(0, 32)
    network = UNet(2, 1, 1, channels=(4, 8, 16), strides=(2, 2)).eval()
    with torch.no_grad():  # logits -10 everywhere: an empty prediction
        for parameter in network.parameters():
            parameter.zero_()
        network.model[-1].conv.bias.fill_(-10.0)
    # flips and 90-degree rotations are inverted exactly, and thresholding the clean image at 0.45 gives the label
    transform = Compose([RandFlipd("image", prob=0.5, spatial_axis=0), RandRotate90d("image", prob=0.5)])
    transform.set_random_state(0)
    tta = TestTimeAugmentation(transform, batch_size=4, inferrer_fn=lambda x: (x > 0.45).float(), orig_key="image",
                               return_full_data=True, progress=False)
    layers = candidate_layers(network)
    signals = bench_quality.case_signals(network, layers, [len(layers) - 3, len(layers) - 2], tta, 4, image, label)

    assert math.isnan(signals["mean SA"])  # no foreground prototype
    # mean SA, the SA profile, fg_prob, max_prob, volume, entropy, boundary_margin, the activation spreads
    features = signals["features"]
    assert features.shape == (2 * len(layers) + 6,)
    assert np.isnan(features[:len(layers) + 2]).all() and features[len(layers) + 3] == 0  # SA, fg_prob; volume 0
    assert np.isnan(features[-len(layers) - 1])  # no boundary
    assert (features[-len(layers):] == 0).all()  # zero weights: every layer's features are constant
    assert signals["confidence"] == pytest.approx(1 - 1 / (1 + math.exp(10)), abs=1e-6)
    assert signals["true Dice"] == 0
    assert signals["TTA, 1/(1+vvc)"] == 1.0  # four equal volumes: vvc 0
    # MONAI's vvc of binary realisations is a function of the foreground fraction alone
    f, count = float(label.mean()), 4 * label.size
    assert signals["TTA, MONAI's vvc"] == pytest.approx(1 / (1 + math.sqrt((1 - f) / f * count / (count - 1))))


def test_candidate_signals_quick_run_scores_every_candidate(capsys):
    signals = load_benchmark("bench_quality_signals")
    single, added, analysed = signals.run(["--quick"])
    assert [row[0] for row in single.rows] == [*signals.CANDIDATES[:-1],
                                              "tta_disagreement (the handler's, for reference)"]
    assert [row[0] for row in added.rows] == ["none: the handler defaults' columns",
                                             *(f"+ {name}" for name in signals.CANDIDATES),
                                             "gradient-boosted trees instead of ridge (same columns)"]
    for row in added.rows[:-1]:  # every ridge estimator is fitted and scored (the trees need scikit-learn)
        assert 0 <= float(row[1]) <= 1 and -1 <= float(row[2]) <= 1
    assert [row[0] for row in analysed.rows] == list(signals.ANALYSES)
    assert analysed.rows[0][1:] == added.rows[0][1:]  # the same ridge estimator on the same columns
    for row in analysed.rows:
        assert 0 <= float(row[1]) <= 1 and -1 <= float(row[2]) <= 1


def test_candidate_disagreements_are_zero_for_a_network_blind_to_the_perturbation():
    signals = load_benchmark("bench_quality_signals")
    network = UNet(2, 1, 3, channels=(4, 8), strides=(2,)).eval()
    with torch.no_grad():  # zero weights, constant biases: the same prediction (class 1 everywhere) for any input
        for parameter in network.parameters():
            parameter.zero_()
        network.model[-1].conv.bias.copy_(torch.tensor([0.0, 2.0, 0.0]))
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    values = signals.candidate_signals(network, images, seed=0)
    for name in ("noise", "bias field", "gamma", "shift", "blur", "sharpen", "feature dropout", "half resolution"):
        assert (values[name] == 0).all(), name
    assert (values["isolated pixels"] == 0).all()  # class 1 everywhere has no isolated pixel, class 2 no pixel
    p = math.exp(2) / (math.exp(2) + 2)  # softmax of (0, 2, 0)
    np.testing.assert_allclose(values["soft Dice"][:, 0], 2 * p * 256 / (p * 256 + 256))
    np.testing.assert_allclose(values["flip soft Dice"][:, 0], 2 * p * 256 / (p * 256 + 256))
    assert (values["soft Dice"][:, 1] == 0).all()  # class 2 is predicted nowhere
    assert (values["boundary fraction"] == 0).all() and (values["spread in mask"] == 0).all()
    rough = ((images[..., 1:] - images[..., :-1]) ** 2).mean((1, 2, 3)) / images.flatten(1).var(1)
    np.testing.assert_allclose(values["image roughness"][:, 0], rough.double().numpy(), rtol=1e-6)


def numpy_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    radius = math.ceil(3 * sigma)
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    for axis in (0, 1):
        image = np.apply_along_axis(lambda line: np.convolve(np.pad(line, radius, mode="reflect"), kernel, "valid"),
                                    axis, image)
    return image


def test_blur_noise_level_and_isolated_pixels_against_numpy():
    signals = load_benchmark("bench_quality_signals")
    images = torch.rand(2, 1, 12, 12, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    blurred = signals.blurred(images, 0.75)
    for image, result in zip(images[:, 0].numpy(), blurred[:, 0].numpy()):
        np.testing.assert_allclose(result, numpy_blur(image, 0.75), atol=1e-12)

    network = UNet(2, 1, 3, channels=(4, 8), strides=(2,)).eval()
    values = signals.candidate_signals(network, images.float(), seed=0)
    prediction = signals.predict(network, images.float())[1].numpy()
    for i, image in enumerate(images[:, 0].float().numpy()):
        difference = np.abs(image.astype(np.float64) - numpy_blur(image.astype(np.float64), 1.0)).ravel()
        level = np.sort(difference)[(difference.size - 1) // 2] / image.std(ddof=1)  # torch's median: the lower one
        assert values["noise level"][i] == pytest.approx([level, level], rel=1e-5)
        for k in range(2):
            mask = np.pad(prediction[i, k], 1)
            same = sum(np.roll(np.roll(mask, dy, 0), dx, 1) for dy in (-1, 0, 1) for dx in (-1, 0, 1)
                       if (dy, dx) != (0, 0))[1:-1, 1:-1]
            isolated = (prediction[i, k] & (same < 3)).sum() / max(prediction[i, k].sum(), 1)
            assert values["isolated pixels"][i, k] == pytest.approx(isolated)


def test_neighbour_correction_adds_the_mean_residual_of_the_nearest_rows_of_the_class(monkeypatch):
    signals = load_benchmark("bench_quality_signals")
    calibration = {"true_dice": np.array([0.9, 0.5, 0.7, np.nan, 0.6]),
                   "class": np.array(["grey", "grey", "grey", "grey", "white"])}
    test = {"true_dice": np.array([0.8, 0.8, 0.8]), "class": np.array(["grey", "white", "grey"])}
    estimate_calibration, estimate = np.array([0.8, 0.8, 0.8, 0.8, 0.8]), np.array([0.5, 0.6, 0.7])
    monkeypatch.setattr(signals, "ridge", lambda *args: (estimate_calibration, estimate))
    distance = np.array([[3.0, 1.0, 2.0, 0.0, 0.0],  # nearest grey rows with a residual: 1 (-0.3), then 2 (-0.1)
                         [0.0, 0.0, 0.0, 0.0, 9.0],  # the only white row: 4 (-0.2)
                         [np.inf, np.inf, np.inf, 0.0, 0.0]])  # no grey row left: no correction
    corrected = signals.neighbour_corrected(calibration, test, [], distance, k=2)
    np.testing.assert_allclose(corrected, [0.5 + (-0.3 - 0.1) / 2, 0.6 - 0.2, 0.7])


def test_feature_distance_and_other_class_columns():
    signals = load_benchmark("bench_quality_signals")
    rng = np.random.default_rng(0)
    calibration, test = {"embedding": rng.normal(size=(5, 3))}, {"embedding": rng.normal(size=(4, 3))}
    mean, std = calibration["embedding"].mean(0), calibration["embedding"].std(0)
    expected = [[(((t - mean) / std - (c - mean) / std) ** 2).sum() for c in calibration["embedding"]]
                for t in test["embedding"]]
    np.testing.assert_allclose(signals.feature_distance(calibration, test), expected, rtol=1e-5)

    table = {"case": np.array(["a", "a", "b", "b"]), "class": np.array(["grey", "white", "white", "grey"]),
             "fg_prob": np.array([0.1, 0.2, 0.3, 0.4])}
    assert signals.with_other_class(table, ["fg_prob"]) == ["other fg_prob"]
    np.testing.assert_array_equal(table["other fg_prob"], [0.2, 0.1, 0.4, 0.3])
