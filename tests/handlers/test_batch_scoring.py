"""BatchScoring: what the scoring handlers of one engine compute once per batch (their probabilities, stacked and
one-hot labels, the prototype weights of the shared SA pass), and that sharing changes no number."""

from __future__ import annotations

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator

from monai_protoseg import MeanSAQualityHandler, SAScoreHandler, protoseg
from monai_protoseg.estimator import prototype_margins
from monai_protoseg.handlers import probe
from monai_protoseg.handlers.scoring import BatchScoring, batch_scoring
from tests.handlers.test_mean_sa_quality_handler import LAYERS, QUALITY_LAYERS, make_network, named_batches, read_rows


def test_shared_values_are_computed_once_per_iteration_and_source_data():
    engine, scoring = Engine(lambda engine, batch: None), BatchScoring()
    engine.state.epoch, engine.state.iteration = 1, 1
    calls = []

    def compute(value: float):
        def run():
            calls.append(value)
            return value
        return run

    source = torch.zeros(2, 3)
    assert scoring.shared(engine, "k", source, compute(1.0)) == 1.0
    assert scoring.shared(engine, "k", source.as_subclass(torch.Tensor), compute(2.0)) == 1.0  # a view: reused
    assert scoring.shared(engine, "k", source.clone(), compute(3.0)) == 3.0  # equal values, other data: computed
    assert scoring.shared(engine, "k", source[:1], compute(4.0)) == 4.0  # a part of the same data: computed
    items = [torch.ones(3), torch.ones(3)]
    assert scoring.shared(engine, "list", items, compute(5.0)) == 5.0
    assert scoring.shared(engine, "list", list(items), compute(6.0)) == 5.0  # the same tensors in a new list
    assert scoring.shared(engine, "list", items[:1], compute(7.0)) == 7.0
    engine.state.iteration = 2  # the next batch: nothing is reused, even for the same tensor
    assert scoring.shared(engine, "list", items[:1], compute(8.0)) == 8.0
    assert calls == [1.0, 3.0, 4.0, 5.0, 7.0, 8.0]


def test_two_handlers_activate_stack_and_one_hot_each_batch_once_and_score_as_alone(tmp_path, monkeypatch):
    counts = {"activate": 0, "one_hot_label": 0, "as_batch": 0}
    for name, owner in (("activate", probe.LayerProbeHandler), ("one_hot_label", probe.LayerProbeHandler)):
        original = getattr(owner, name)

        def counted(self, *args, _original=original, _name=name):
            counts[_name] += 1
            return _original(self, *args)

        monkeypatch.setattr(owner, name, counted)
    original_as_batch = probe.as_batch

    def counted_as_batch(value):
        counts["as_batch"] += 1
        return original_as_batch(value)

    monkeypatch.setattr(probe, "as_batch", counted_as_batch)
    network, batches = make_network(out_channels=3), named_batches(count=3, classes=3)

    def run(handlers):
        evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                        val_handlers=handlers)
        evaluator.run()
        return evaluator

    together = run([SAScoreHandler(LAYERS, activation="softmax"),
                    MeanSAQualityHandler(QUALITY_LAYERS, activation="softmax", output_dir=tmp_path / "both")])
    assert counts == {"activate": 3, "one_hot_label": 3, "as_batch": 3}  # once a batch for both handlers
    alone = run([SAScoreHandler(LAYERS, activation="softmax")])
    run([MeanSAQualityHandler(QUALITY_LAYERS, activation="softmax", output_dir=tmp_path / "alone")])
    for name, value in alone.state.metrics.items():
        assert together.state.metrics[name] == value, name
    assert read_rows(tmp_path / "both" / "quality.csv") == read_rows(tmp_path / "alone" / "quality.csv")


def test_prototype_margins_reuse_the_prototype_weights_of_the_scoring_pass(tmp_path, monkeypatch):
    built = []

    class CountedGuide(protoseg._Guide):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    network, batches = make_network(), named_batches(count=1)
    engine = Engine(lambda engine, batch: None)
    handler = MeanSAQualityHandler(QUALITY_LAYERS, network=network, output_dir=tmp_path)
    handler.attach(engine)
    seen = {}

    def step(engine: Engine) -> None:
        request, _ = batch_scoring(engine).scores(engine, handler)
        guides = batch_scoring(engine).guides(handler)
        (guide,) = guides.values()
        moved = dict(guide._moved)
        features = {layer: request.features[layer] for layer in QUALITY_LAYERS}
        assert {tuple(features[layer].shape[2:]) for layer in QUALITY_LAYERS} <= moved.keys()
        with monkeypatch.context() as patch:
            patch.setattr(protoseg, "_Guide", CountedGuide)
            seen["shared"] = prototype_margins(features, request.prob, guides=guides)
            assert not built  # no prototype weights built or moved again
            seen["alone"] = prototype_margins(features, request.prob)
            assert len(built) == 1
        assert guide._moved.keys() == moved.keys() and all(guide._moved[k] is v for k, v in moved.items())

    engine.add_event_handler(Events.ITERATION_COMPLETED, step)

    def process(engine: Engine, batch: dict) -> dict:
        with torch.no_grad():
            return {"pred": network(batch["image"]), "label": batch["label"]}

    engine._process_function = process
    engine.run(batches)
    assert seen["shared"].shape[1] == len(QUALITY_LAYERS)
    torch.testing.assert_close(seen["shared"], seen["alone"], rtol=0, atol=0, equal_nan=True)


def test_prototype_margins_name_the_layer_of_bad_features():
    prob = torch.rand(1, 1, 8, 8)
    bad = torch.zeros(1, 2, 4, 4)
    bad[0, 1, 2, 2] = float("nan")
    with pytest.raises(ValueError, match=r"layer 'decoder': features contain NaN"):
        prototype_margins({"encoder": torch.rand(1, 2, 4, 4), "decoder": bad}, prob)
    with pytest.raises(ValueError, match=r"layer 'encoder': .*prob must be a foreground probability"):
        prototype_margins({"encoder": torch.rand(1, 2, 4, 4)}, prob + 1)
