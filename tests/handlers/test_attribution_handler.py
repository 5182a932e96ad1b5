"""AttributionHandler on a bare ignite Engine and inside MONAI's SupervisedEvaluator and SupervisedTrainer."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from ignite.engine import Engine, Events
from monai.data import MetaTensor
from monai.engines import SupervisedEvaluator, SupervisedTrainer
from monai.handlers import ValidationHandler
from monai.networks.nets import UNet
from monai.utils import set_determinism

from monai_protoseg.attribution.faithfulness import (
    deletion_insertion,
    image_preserved,
    masked_prediction,
    prediction_preserved,
)
from monai_protoseg.attribution.gradcam import GradCAM
from monai_protoseg.attribution.kwc import KernelWeightedContribution
from monai_protoseg.attribution.rise import RISE
from monai_protoseg.handlers import SAScoreHandler
from monai_protoseg.handlers.attribution import COLUMNS, AttributionHandler

STEPS = 3


def make_network() -> UNet:
    set_determinism(seed=0)
    return UNet(2, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1)


def make_batches(count: int = 2, batch: int = 2, size: int = 16) -> list[dict[str, torch.Tensor]]:
    """Images with a bright square, and its label (class indices)."""
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(count):
        label = torch.zeros(batch, 1, size, size)
        for b in range(batch):
            top, left = torch.randint(0, size // 2, (2,), generator=gen).tolist()
            label[b, :, top:top + 6, left:left + 6] = 1
        image = label + 0.2 * torch.randn(batch, 1, size, size, generator=gen)
        batches.append({"image": image, "label": label})
    return batches


def bare_engine(network: torch.nn.Module) -> Engine:
    def step(engine: Engine, batch: dict) -> dict:
        with torch.no_grad():
            return {"image": batch["image"], "label": batch["label"], "pred": network(batch["image"])}

    return Engine(step)


def hook_count(network: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in network.modules())


def expected_values(method, batches, by_label: bool = False) -> torch.Tensor:
    """``(N, 4)``: the pure functions called directly, batch by batch."""
    network, rows = method.network, []
    for batch in batches:
        result = method(batch["image"], label=batch["label"] if by_label else None)
        prob = masked_prediction(network, batch["image"], torch.ones_like(result.map))
        prob_masked = masked_prediction(network, batch["image"], result.map)
        deletion, insertion, _ = deletion_insertion(network, batch["image"], result.map, steps=STEPS,
                                                    region=result.region)
        rows.append(torch.stack([prediction_preserved(prob, prob_masked).double(),
                                 image_preserved(result.map).double(), deletion, insertion], 1))
    return torch.cat(rows)


def assert_metrics(metrics: dict, expected: torch.Tensor, name: str = "attribution") -> None:
    for column, values in zip(COLUMNS, expected.T):
        assert metrics[f"{name}_{column}"] == pytest.approx(values.nanmean().item(), abs=1e-6)


def test_values_match_the_pure_functions():
    network, batches = make_network(), make_batches()
    method = KernelWeightedContribution(network, max_kernels=2, batch_size=8)
    engine = bare_engine(network)
    handler = AttributionHandler(method, deletion_steps=STEPS)
    handler.attach(engine)
    engine.run(batches)
    expected = expected_values(method, batches)
    assert_metrics(engine.state.metrics, expected)
    assert not expected.isnan().any() and expected.shape == (4, 4)
    torch.testing.assert_close(handler.values.get_buffer(), expected, atol=1e-6, rtol=0)
    assert hook_count(network) == 0


def test_label_region_and_a_missing_label_is_named():
    network, batches = make_network(), make_batches(1)
    method = RISE(network, region="label", n_masks=4, grid_size=4)
    engine = bare_engine(network)
    AttributionHandler(method, deletion_steps=STEPS).attach(engine)
    engine.run(batches)
    assert_metrics(engine.state.metrics, expected_values(method, batches, by_label=True))
    unlabelled = Engine(lambda engine, batch: {"image": batch["image"]})
    AttributionHandler(method, deletion_steps=STEPS).attach(unlabelled)
    with pytest.raises(ValueError, match="region is 'label', but engine.state.batch has no 'label'"):
        unlabelled.run([{"image": batch["image"]} for batch in batches])


def test_drop_in_evaluator_writes_the_csv_and_leaves_other_handlers_alone(tmp_path):
    network, batches = make_network(), make_batches()
    for i, batch in enumerate(batches):
        batch["image"] = MetaTensor(batch["image"], meta={"filename_or_obj": [f"/d/c{i}{b}.nii.gz" for b in range(2)]})
    method = RISE(network, n_masks=4, grid_size=4)

    def evaluate(with_attribution: bool) -> SupervisedEvaluator:
        handlers = [SAScoreHandler(["model.0", "model.1.submodule.2"], activation="softmax")]
        if with_attribution:
            handlers.insert(0, AttributionHandler(method, output_dir=tmp_path, name="rise", class_name="square",
                                                  deletion_steps=STEPS))
        evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches, network=network,
                                        val_handlers=handlers)
        evaluator.run()
        return evaluator

    plain, evaluator = evaluate(False), evaluate(True)
    assert evaluator.state.metrics["sa_mean"] == plain.state.metrics["sa_mean"]  # the SA hooks saw no extra pass
    expected = expected_values(method, [{"image": b["image"].as_tensor(), "label": b["label"]} for b in batches])
    assert_metrics(evaluator.state.metrics, expected, name="rise")
    with open(tmp_path / "rise.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert [(row["case"], row["class"]) for row in rows] == [(f"c{i}{b}", "square") for i in range(2) for b in range(2)]
    written = torch.tensor([[float(row[column]) for column in COLUMNS] for row in rows], dtype=torch.float64)
    torch.testing.assert_close(written, expected, atol=1e-6, rtol=0)
    assert hook_count(network) == 0


def test_gradient_methods_work_inside_an_evaluator():
    network = make_network()
    handler = AttributionHandler(GradCAM(network), deletion_steps=STEPS)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=make_batches(1), network=network,
                                    key_val_metric={"val_pp": handler})
    evaluator.run()
    metrics = evaluator.state.metrics
    assert metrics["val_pp"] == metrics["attribution_prediction_preserved"]
    assert all(math.isfinite(metrics[f"attribution_{column}"]) for column in COLUMNS)
    assert all(parameter.grad is None for parameter in network.parameters()) and hook_count(network) == 0


def test_hooks_removed_when_the_engine_raises_and_the_error_propagates():
    network = make_network()
    engine = bare_engine(network)
    AttributionHandler(KernelWeightedContribution(network, max_kernels=1), deletion_steps=STEPS).attach(engine)

    def fail(engine: Engine) -> None:
        if engine.state.iteration == 2:
            raise RuntimeError("boom")

    engine.add_event_handler(Events.ITERATION_COMPLETED, fail)
    with pytest.raises(RuntimeError, match="boom"):
        engine.run(make_batches(3))
    assert hook_count(network) == 0


def test_attach_is_idempotent_and_bad_arguments_are_named():
    network = make_network()
    engine = bare_engine(network)
    handler = AttributionHandler(RISE(network, n_masks=2))
    handler.attach(engine)
    handler.attach(engine)
    assert len(engine._event_handlers[Events.ITERATION_COMPLETED]) == 1
    with pytest.raises(TypeError, match="method must be a SegmentationAttribution"):
        AttributionHandler(network)
    with pytest.raises(ValueError, match="deletion_steps must be at least 1"):
        AttributionHandler(RISE(network), deletion_steps=0)
    with pytest.raises(ValueError, match="batch_size must be at least 1"):
        AttributionHandler(RISE(network), batch_size=0)


def train(with_attribution: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    network = make_network()
    losses = []
    handlers = [AttributionHandler(KernelWeightedContribution(network, max_kernels=2), deletion_steps=STEPS)]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=make_batches(1), network=network,
                                    val_handlers=handlers if with_attribution else None)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=make_batches(2), network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.1),
        loss_function=lambda pred, label: torch.nn.functional.cross_entropy(pred, label[:, 0].long()),
        train_handlers=[ValidationHandler(interval=1, validator=evaluator, epoch_level=True)],
    )
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: losses.append(engine.state.output[0]["loss"]))
    set_determinism(seed=1)
    trainer.run()
    if with_attribution:
        assert "attribution_deletion_auc" in evaluator.state.metrics
    return losses, {k: v.clone() for k, v in network.state_dict().items()}


def test_training_with_the_handler_is_bit_identical():
    losses_plain, weights_plain = train(with_attribution=False)
    losses_attribution, weights_attribution = train(with_attribution=True)
    assert losses_plain == losses_attribution and len(losses_plain) == 6
    assert all(torch.equal(weights_plain[k], weights_attribution[k]) for k in weights_plain)
