"""SAScoreHandler on a bare ignite Engine and inside MONAI's SupervisedEvaluator and SupervisedTrainer."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import MetricsSaver, StatsHandler, ValidationHandler
from monai.networks.nets import UNet
from monai.utils import set_determinism

from monai_protoseg import FeatureRecorder
from monai_protoseg.handlers import SAScoreHandler
from tests.naive_protoseg import naive_sa_score

LAYERS = ["model.0", "model.1.submodule.2", "model.2"]
ALIASES = {"model.0": "encoder.1", "model.1.submodule.2": "decoder.1", "model.2": "output"}
"""The names results use for LAYERS of make_network()'s UNet (see monai_protoseg.layer_aliases)."""


def make_network(out_channels: int = 1) -> UNet:
    set_determinism(seed=0)
    return UNet(2, 1, out_channels, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def make_batches(count: int = 3, batch: int = 2, classes: int = 1, size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Images with a bright square, and labels (class indices) of the square's halves."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        label = torch.zeros(batch, 1, size, size)
        for b in range(batch):
            top, left = torch.randint(0, size // 2, (2,), generator=gen).tolist()
            label[b, :, top:top + 6, left:left + 3] = 1
            label[b, :, top:top + 6, left + 3:left + 6] = classes - 1 if classes > 1 else 1
        image = (label > 0).float() + 0.2 * torch.randn(batch, 1, size, size, generator=gen)
        batches.append({"image": image, "label": label})
    return batches


def bare_engine(network: torch.nn.Module) -> Engine:
    def step(engine: Engine, batch: dict) -> dict:
        with torch.no_grad():
            return {"pred": network(batch["image"]), "label": batch["label"]}

    return Engine(step)


def hook_count(network: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in network.modules())


def expected_scores(network, batches, activation, classes, reference="label", guide="soft"):
    """Independent computation: record features directly, score every image with the naive formulation; with
    ``guide="binary"`` the prototypes are weighted by the binarised prediction (argmax for softmax)."""
    per_layer = {layer: [] for layer in LAYERS}
    for batch in batches:
        with torch.no_grad(), FeatureRecorder(network, LAYERS) as recorder:
            logits = network(batch["image"])
        prob = torch.sigmoid(logits) if activation == "sigmoid" else torch.softmax(logits, 1)
        for layer in LAYERS:
            rows = []
            for k in classes:
                if reference == "pred":
                    target = (prob.argmax(1, keepdim=True) == k) if activation == "softmax" else prob[:, k:k + 1] > 0.5
                elif logits.shape[1] == 1:
                    target = batch["label"] > 0.5
                else:
                    target = batch["label"] == k
                own = (prob.argmax(1, keepdim=True) == k) if activation == "softmax" else prob[:, k:k + 1] > 0.5
                weights = prob[:, k:k + 1] if guide == "soft" else own
                rows.append(naive_sa_score(recorder[layer].double(), weights.double(), target))
            per_layer[layer].append(torch.stack(rows, 1))
    return {layer: torch.cat(rows) for layer, rows in per_layer.items()}  # (N, K)


def test_layer_scores_match_an_independent_computation():
    network, batches = make_network(), make_batches()
    engine = bare_engine(network)
    SAScoreHandler(LAYERS, network=network).attach(engine)
    engine.run(batches)
    expected = expected_scores(network, batches, "sigmoid", [0])
    for layer, alias in ALIASES.items():
        assert engine.state.metrics[f"sa_{alias}"] == pytest.approx(expected[layer].nanmean().item(), abs=1e-5)
        torch.testing.assert_close(engine.state.metric_details[f"sa_{alias}"].double(), expected[layer],
                                   atol=1e-5, rtol=0, equal_nan=True)
    means = [engine.state.metrics[f"sa_{ALIASES[layer]}"] for layer in LAYERS]
    assert engine.state.metrics["sa_mean"] == pytest.approx(sum(means) / len(means))
    assert engine.state.metrics["sa_undefined"] == 0
    assert hook_count(network) == 0


def test_softmax_multi_class_against_prediction_with_names():
    network, batches = make_network(out_channels=3), make_batches(classes=3)
    engine = bare_engine(network)
    handler = SAScoreHandler(LAYERS, network=network, activation="softmax", class_names=["left", "right"],
                             reference="pred", unit_wise=True)
    handler.attach(engine)
    engine.run(batches)
    expected = expected_scores(network, batches, "softmax", [1, 2], reference="pred")
    for layer in LAYERS:
        for k, name in enumerate(["left", "right"]):
            value = engine.state.metrics[f"sa_{ALIASES[layer]}_{name}"]
            reference = expected[layer][:, k].nanmean().item()
            assert (math.isnan(value) and math.isnan(reference)) or value == pytest.approx(reference, abs=1e-5)
        assert engine.state.metric_details[f"sa_{ALIASES[layer]}"].shape == (6, 2)
    assert {layer: tuple(scores.shape) for layer, scores in handler.unit_scores.items()} == {
        "model.0": (2, 4), "model.1.submodule.2": (2, 4), "model.2": (2, 3)}


@pytest.mark.parametrize("activation, classes", [("sigmoid", [0]), ("softmax", [1, 2])])
def test_binary_guide_weights_the_prototypes_by_the_binarised_prediction(activation, classes):
    network = make_network(out_channels=len(classes) + (activation == "softmax"))
    batches = make_batches(classes=3 if activation == "softmax" else 1)
    engine = bare_engine(network)
    SAScoreHandler(LAYERS, network=network, activation=activation, guide="binary").attach(engine)
    engine.run(batches)
    binary = expected_scores(network, batches, activation, classes, guide="binary")
    soft = expected_scores(network, batches, activation, classes)
    for layer, alias in ALIASES.items():
        torch.testing.assert_close(engine.state.metric_details[f"sa_{alias}"].double(), binary[layer], atol=1e-5,
                                   rtol=0, equal_nan=True)
    assert any(not torch.allclose(binary[layer], soft[layer], equal_nan=True) for layer in LAYERS)
    with pytest.raises(ValueError, match="guide must be one of"):
        SAScoreHandler(LAYERS, guide="hard")


def test_multi_label_sigmoid_with_background_channel_scored():
    network = make_network(out_channels=3)
    batches = [{"image": b["image"], "label": torch.cat([b["label"]] * 3, 1)} for b in make_batches()]
    engine = bare_engine(network)
    SAScoreHandler(LAYERS, network=network, activation="sigmoid", include_background=True,
                   class_names=["TC", "WT", "ET"]).attach(engine)
    engine.run(batches)
    assert {f"sa_output_{name}" for name in ("TC", "WT", "ET")} <= set(engine.state.metrics)


def test_empty_prediction_is_undefined_not_zero():
    network = make_network()
    torch.nn.init.constant_(network.model[2][1].conv.unit0.conv.bias, -100.0)  # every pixel predicted background
    engine = bare_engine(network)
    SAScoreHandler(LAYERS, network=network, reference="pred").attach(engine)
    engine.run(make_batches(count=1))
    assert engine.state.metrics["sa_undefined"] == 2 * len(LAYERS)
    assert math.isnan(engine.state.metrics["sa_mean"])


def test_hooks_removed_when_the_engine_raises_and_the_error_propagates():
    network = make_network()
    engine = bare_engine(network)
    SAScoreHandler(LAYERS, network=network).attach(engine)

    def fail(engine: Engine) -> None:
        if engine.state.iteration == 2:
            raise RuntimeError("boom")

    engine.add_event_handler(Events.ITERATION_COMPLETED, fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run(make_batches())
    assert hook_count(network) == 0


def test_attach_is_idempotent_and_bad_arguments_are_named():
    network = make_network()
    engine = bare_engine(network)
    handler = SAScoreHandler(LAYERS, network=network)
    handler.attach(engine)
    handler.attach(engine)
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 1
    with pytest.raises(ValueError, match="activation must be"):
        SAScoreHandler(LAYERS, activation="relu")
    with pytest.raises(ValueError, match="reference must be"):
        SAScoreHandler(LAYERS, reference="truth")


@pytest.mark.parametrize(
    "handler_kwargs,batches,message",
    [
        ({"layers": ["model.9"]}, make_batches(1), "layer 'model.9' is not a submodule"),
        ({"class_names": ["a", "b"]}, make_batches(1), "class_names has 2 names but 1 classes"),
        ({}, [{"image": torch.rand(1, 1, 16, 16), "label": torch.zeros(1, 1, 8, 8)}],
         r"the label \(engine.state.batch\['label'\]\) is not on the grid the network saw: it is \(8, 8\), "
         r"the network's input \(16, 16\)"),
    ],
)
def test_bad_input_is_a_clear_error(handler_kwargs, batches, message):
    network = make_network()
    engine = bare_engine(network)
    SAScoreHandler(**{"layers": LAYERS, "network": network, **handler_kwargs}).attach(engine)
    with pytest.raises(ValueError, match=message):
        engine.run(batches)
    assert hook_count(network) == 0


def test_drop_in_evaluator_results_reach_handlers_listed_before_it(tmp_path, caplog):
    network = make_network()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=make_batches(), network=network,
        val_handlers=[StatsHandler(name="sa_stats", iteration_log=False),
                      MetricsSaver(str(tmp_path), metrics="*", metric_details="*"), SAScoreHandler(LAYERS)],
    )
    logger = logging.getLogger("sa_stats")  # MONAI's get_logger does not propagate to the root logger
    logger.addHandler(caplog.handler)
    try:
        evaluator.run()
    finally:
        logger.removeHandler(caplog.handler)
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "sa_stats")
    assert "sa_mean:" in logged and "sa_encoder.1:" in logged and "model." not in logged  # readable log lines
    assert "sa_mean" in (tmp_path / "metrics.csv").read_text()
    assert len((tmp_path / "sa_encoder.1_raw.csv").read_text().splitlines()) == 1 + 6  # header, one row per image
    assert hook_count(network) == 0


def train(with_sa: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    network = make_network()
    losses = []
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=make_batches(2), network=network,
        val_handlers=[SAScoreHandler(LAYERS)] if with_sa else None,
    )
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=make_batches(3), network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1), loss_function=torch.nn.BCEWithLogitsLoss(),
        train_handlers=[ValidationHandler(interval=1, validator=evaluator, epoch_level=True)],
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))
    set_determinism(seed=1)
    trainer.run()
    if with_sa:
        assert "sa_mean" in evaluator.state.metrics
    return losses, {k: v.clone() for k, v in network.state_dict().items()}


def test_training_with_the_handler_is_bit_identical():
    losses_plain, weights_plain = train(with_sa=False)
    losses_sa, weights_sa = train(with_sa=True)
    assert losses_plain == losses_sa and len(losses_plain) == 9
    assert all(torch.equal(weights_plain[k], weights_sa[k]) for k in weights_plain)


def test_tensorboard_scalars_whatever_the_handler_order(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from monai.handlers import TensorBoardStatsHandler

    network = make_network()
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=make_batches(), network=network,
        val_handlers=[TensorBoardStatsHandler(log_dir=str(tmp_path), iteration_log=False), SAScoreHandler(LAYERS)],
    )
    evaluator.run()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    expected = {"sa_encoder.1", "sa_decoder.1", "sa_output", "sa_mean", "sa_undefined"}
    assert expected == set(events.Tags()["scalars"])  # tags a person reads: no qualified name
    assert events.Scalars("sa_mean")[0].value == pytest.approx(evaluator.state.metrics["sa_mean"], abs=1e-6)


def test_as_an_evaluator_metric_it_can_be_the_key_metric():
    network = make_network()
    handler = SAScoreHandler(LAYERS)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=make_batches(), network=network,
                                    key_val_metric={"val_sa": handler})
    evaluator.run()
    assert evaluator.state.metrics["val_sa"] == evaluator.state.metrics["sa_mean"]
    assert evaluator.state.best_metric == pytest.approx(evaluator.state.metrics["sa_mean"])
    assert hook_count(network) == 0


def test_output_dir_gets_per_case_and_per_unit_csvs(tmp_path):
    import csv

    from monai.data import MetaTensor

    network, batches = make_network(out_channels=3), make_batches(classes=3)
    for i, batch in enumerate(batches):
        batch["image"] = MetaTensor(batch["image"], meta={"filename_or_obj": [f"/d/c{i}{b}.nii.gz" for b in range(2)]})
    handler = SAScoreHandler(LAYERS, activation="softmax", class_names=["left", "right"], unit_wise=True,
                             output_dir=tmp_path)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                    val_handlers=[handler])
    evaluator.run()
    with open(tmp_path / "sa_layers.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["case"], row["class"]) for row in rows[:3]] == [("c00", "left"), ("c00", "right"), ("c01", "left")]
    assert list(rows[0]) == ["case", "class", "encoder.1", "decoder.1", "output"]  # a column per layer alias
    for layer in LAYERS:
        details = evaluator.state.metric_details[f"sa_{ALIASES[layer]}"].flatten().double()  # (case, class) rows
        torch.testing.assert_close(torch.tensor([float(row[ALIASES[layer]]) for row in rows], dtype=torch.float64),
                                   details, atol=1e-6, rtol=0, equal_nan=True)
    with open(tmp_path / "sa_units.csv", newline="") as stream:
        units = list(csv.DictReader(stream))
    assert len(units) == sum(scores.numel() for scores in handler.unit_scores.values())
    first = units[0]
    assert list(first) == ["layer", "qualified_name", "class", "unit", "sa"]
    assert (first["layer"], first["qualified_name"], first["class"], first["unit"]) == ("encoder.1", "model.0", "left",
                                                                                        "0")
    assert (tmp_path / "layer_names.csv").read_text() == (
        "layer,qualified_name\nencoder.1,model.0\ndecoder.1,model.1.submodule.2\noutput,model.2\n")
    value = handler.unit_scores["model.0"][0, 0].item()
    assert (first["sa"] == "nan" and math.isnan(value)) or float(first["sa"]) == pytest.approx(value, abs=1e-6)
