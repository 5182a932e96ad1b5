"""The handlers' ``mode`` on a sliding window: streamed scores, quality rows and maps equal stitched ones; ``"auto"``
chooses by the memory budget; handlers sharing a window agree on one mode or fail naming both."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer
from monai.networks.nets import UNet
from monai.utils import set_determinism

from monai_protoseg import MeanSAQualityHandler, ProtoSegInferer, SAScoreHandler
from monai_protoseg.handlers import PrototypeMapHandler
from tests.handlers.test_sa_score_handler import hook_count, make_batches

LAYERS = ["model.0", "model.1.submodule.1.submodule", "model.1.submodule.2", "model.2"]
"""Layers at scales 1/2, 1/4 (the bottleneck), 1/2 and 1 of a 2D UNet."""


def network_and_batches(classes: int = 1, count: int = 2) -> tuple[UNet, list[dict]]:
    """A 2D UNet and ``count`` batches of two 32x48 images with file names (several windows of 16x16 each)."""
    set_determinism(seed=0)
    network = UNet(2, 1, classes, channels=(4, 8, 16), strides=(2, 2), num_res_units=1).eval()
    batches = []
    for i, batch in enumerate(make_batches(count=count, classes=classes, size=48)):
        files = [f"/data/imagesTr/case_{i}{b}.nii.gz" for b in range(2)]
        image = torch.nn.functional.pad(batch["image"], (0, 0, 0, -16))  # 32 x 48
        label = torch.nn.functional.pad(batch["label"], (0, 0, 0, -16))
        batches.append({"image": MetaTensor(image, meta={"filename_or_obj": files}), "label": label})
    return network, batches


def window(mode: str = "constant") -> SlidingWindowInferer:
    return SlidingWindowInferer(roi_size=(16, 16), sw_batch_size=3, overlap=0.5, mode=mode)


def run(network, batches, handlers, inferer=None) -> SupervisedEvaluator:
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    inferer=inferer or window(), val_handlers=handlers)
    evaluator.run()
    return evaluator


def rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.parametrize("blend, classes, activation", [("constant", 1, "auto"), ("gaussian", 3, "auto"),
                                                        ("gaussian", 3, "sigmoid")], ids=["one", "softmax", "multi-label"])
def test_streamed_scores_and_quality_rows_equal_stitched(tmp_path, blend, classes, activation):
    network, batches = network_and_batches(classes)
    results = {}
    for mode in ("stitch", "stream"):
        sa = SAScoreHandler(LAYERS, mode=mode, output_dir=tmp_path / mode, activation=activation)
        quality = MeanSAQualityHandler(LAYERS[2:], mode=mode, output_dir=tmp_path / mode, activation=activation)
        evaluator = run(network, batches, [sa, quality], window(blend))
        assert hook_count(network) == 0 and isinstance(evaluator.inferer, SlidingWindowInferer)
        results[mode] = sa.metric.layer_scores(), rows(tmp_path / mode / "quality.csv")
    stitched, streamed = results["stitch"], results["stream"]
    assert stitched[0].shape == (4, len(LAYERS), max(classes - 1, 1))
    assert not stitched[0].isnan().all()
    torch.testing.assert_close(streamed[0], stitched[0], atol=1e-6, rtol=0, equal_nan=True)
    assert [row["case"] for row in streamed[1]] == [row["case"] for row in stitched[1]]
    for got, want in zip(streamed[1], stitched[1]):
        assert float(got["mean_sa"]) == pytest.approx(float(want["mean_sa"]), abs=1e-6, nan_ok=True)


def test_streamed_estimator_rows_leave_out_the_stitched_feature_columns_and_say_so(tmp_path, caplog):
    network, batches = network_and_batches(count=6)  # 12 cases: enough to fit an estimator
    results = {}
    for mode in ("stitch", "stream"):
        quality = MeanSAQualityHandler(LAYERS[2:], mode=mode, output_dir=tmp_path / mode, fit_estimator=True)
        with caplog.at_level(logging.WARNING, logger="monai_protoseg.handlers.mean_sa_quality"):
            run(network, batches, [quality])
        results[mode] = rows(tmp_path / mode / "quality.csv"), caplog.text
        caplog.clear()
    (stitched, stitch_log), (streamed, stream_log) = results["stitch"], results["stream"]
    stitched_only = [name for name in stitched[0] if name.startswith("spread_") or name.startswith("proto_")]
    assert len(stitched_only) == 5 + 3 and "not kept" not in stitch_log  # a spread per candidate layer
    assert list(streamed[0]) == [name for name in stitched[0] if name not in stitched_only]
    assert "spread_{layer} columns are left out" in stream_log and "proto_in, proto_out, proto_near" in stream_log
    for got, want in zip(streamed, stitched, strict=True):
        for name in ("mean_sa", "fg_prob", "entropy", "boundary_margin"):
            assert float(got[name]) == pytest.approx(float(want[name]), abs=1e-6, rel=1e-6, nan_ok=True), name


def test_an_estimator_using_spread_estimates_nan_when_the_window_streams(tmp_path, caplog):
    network, batches = network_and_batches(count=6)
    fitted = tmp_path / "estimator.json"
    run(network, batches, [MeanSAQualityHandler(LAYERS[2:], mode="stitch", output_dir=tmp_path, estimator=fitted,
                                                fit_estimator=True, feature_sets={"spread": ["spread_model.0"]})])
    assert not any(row["estimated_dice"] == "nan" for row in rows(tmp_path / "quality.csv"))
    quality = MeanSAQualityHandler(LAYERS[2:], mode="stream", output_dir=tmp_path / "stream", estimator=fitted)
    with caplog.at_level(logging.WARNING, logger="monai_protoseg.handlers.mean_sa_quality"):
        run(network, batches, [quality])
    assert all(row["estimated_dice"] == "nan" for row in rows(tmp_path / "stream" / "quality.csv"))
    assert "an estimator that uses them estimates NaN (fit it with the same mode)" in caplog.text


def test_streaming_builds_no_stitched_features_and_runs_the_windows_twice_per_batch(monkeypatch, tmp_path):
    network, batches = network_and_batches()
    calls = []
    original = ProtoSegInferer.prototype_logits
    monkeypatch.setattr(ProtoSegInferer, "prototype_logits",
                        lambda self, *args: calls.append(dict(self.features)) or original(self, *args))
    sa = SAScoreHandler(LAYERS, mode="stream")
    quality = MeanSAQualityHandler(LAYERS[2:], mode="stream", output_dir=tmp_path)
    run(network, batches, [sa, quality])
    assert calls == [{}, {}]  # one pair of passes per batch for both handlers, never a stitched feature


def test_auto_streams_over_the_budget_and_stitches_within_it(caplog):
    network, batches = network_and_batches()
    chosen = []
    for budget in (1024, 2**30):
        sa = SAScoreHandler(LAYERS, memory_budget=budget)
        with caplog.at_level(logging.INFO, logger="monai_protoseg.inferers"):
            evaluator = run(network, batches, [sa])
        chosen.append("over the memory budget" in caplog.text and "streaming" in caplog.text)
        caplog.clear()
        assert evaluator.state.metrics["sa_mean"] == evaluator.state.metrics["sa_mean"]  # a number, not NaN
    assert chosen == [True, False]


def test_unit_wise_needs_stitching(tmp_path):
    with pytest.raises(ValueError, match=r"SAScoreHandler\(mode='stream'\) cannot give unit-wise scores"):
        SAScoreHandler(LAYERS, unit_wise=True, mode="stream")
    network, batches = network_and_batches()
    sa = SAScoreHandler(LAYERS, unit_wise=True)  # auto: stitches, and the quality handler's auto follows
    quality = MeanSAQualityHandler(LAYERS[2:], memory_budget=1024, output_dir=tmp_path)
    evaluator = run(network, batches, [sa, quality])
    assert sa.unit_scores and evaluator.state.metrics["quality_mean_sa"] == evaluator.state.metrics["quality_mean_sa"]


def test_handlers_with_different_explicit_modes_fail_naming_both(tmp_path):
    network, batches = network_and_batches()
    sa = SAScoreHandler(LAYERS, mode="stitch")
    quality = MeanSAQualityHandler(LAYERS[2:], mode="stream", output_dir=tmp_path)
    with pytest.raises(ValueError, match=r"MeanSAQualityHandler needs mode='stream'.*wrapped with mode='stitch'"):
        run(network, batches, [sa, quality])
    assert hook_count(network) == 0


def test_auto_handler_follows_a_users_streaming_inferer():
    network, batches = network_and_batches()
    inferer = ProtoSegInferer(window(), [], mode="stream")
    sa = SAScoreHandler(LAYERS)
    run(network, batches, [sa], inferer)
    assert inferer.streamed and inferer.mode == "stream"
    assert inferer.layers == []  # the user's wrapper is left as it was: no layer of the handler's stays recorded
    stitched = SAScoreHandler(LAYERS, mode="stitch")
    run(network, batches, [stitched])
    torch.testing.assert_close(sa.metric.layer_scores(), stitched.metric.layer_scores(), atol=1e-6, rtol=0,
                               equal_nan=True)


@pytest.mark.parametrize("mode, message", [("tile", "mode must be one of"), ("auto", "memory_budget must be")])
def test_bad_mode_and_budget_are_named(mode, message):
    with pytest.raises(ValueError, match=message):
        SAScoreHandler(LAYERS, mode=mode, memory_budget=0 if mode == "auto" else 2**30)


def test_streamed_prototype_map_snapshots_equal_stitched(monkeypatch):
    network, batches = network_and_batches(classes=3)
    streamed_batches = []
    original = ProtoSegInferer.prototype_logits
    monkeypatch.setattr(ProtoSegInferer, "prototype_logits",
                        lambda self, prob: streamed_batches.append(self.streamed) or original(self, prob))
    snapshots = {}
    for mode in ("stitch", "stream"):
        handler = PrototypeMapHandler(LAYERS, num_cases=3, mode=mode)
        run(network, batches, [handler])
        snapshots[mode] = handler.snapshots
    assert streamed_batches == [True, True]  # streaming: the maps of both batches from the inferer's passes
    assert len(snapshots["stream"]) == len(snapshots["stitch"]) == 6  # 3 cases x 2 classes
    for got, want in zip(snapshots["stream"], snapshots["stitch"]):
        assert (got.case, got.class_name) == (want.case, want.class_name)
        assert got.layers == want.layers and len(got.layers) == len(LAYERS)
        torch.testing.assert_close(torch.as_tensor(got.maps), torch.as_tensor(want.maps), atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.as_tensor(got.sa), torch.as_tensor(want.sa), atol=1e-6, rtol=0)


def test_a_users_auto_inferer_gets_its_settings_back_after_a_streaming_run(tmp_path):
    network, batches = network_and_batches()
    inferer = ProtoSegInferer(window(), ["model.0"], mode="auto", memory_budget=2**30)
    sa = SAScoreHandler(LAYERS, mode="stream", memory_budget=1024)
    quality = MeanSAQualityHandler(LAYERS[2:], output_dir=tmp_path)
    run(network, batches, [sa, quality], inferer)
    assert inferer.streamed  # the run streamed: the handlers' explicit mode counted while it ran
    assert (inferer.layers, inferer.mode, inferer.memory_budget) == (["model.0"], "auto", 2**30)
