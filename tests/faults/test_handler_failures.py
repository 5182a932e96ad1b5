"""A failed or interrupted run propagates its exception and leaves every earlier output byte-identical; bad labels
are refused with the values found."""

from __future__ import annotations

import hashlib

import pytest
import torch
from ignite.engine import Events
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer

from monai_protoseg import MeanSAQualityHandler, PrototypeMapHandler, SAScoreHandler
from tests.handlers.test_mean_sa_quality_handler import QUALITY_LAYERS, named_batches
from tests.handlers.test_sa_score_handler import LAYERS, hook_count, make_network


class FailingAt(torch.nn.Module):
    """The network, raising ``error`` on its ``failing_call``-th forward pass (1-based)."""

    def __init__(self, network: torch.nn.Module, failing_call: int, error: BaseException) -> None:
        super().__init__()
        self.network, self.failing_call, self.error, self.calls = network, failing_call, error, 0

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.failing_call:
            raise self.error
        return self.network(image)


def hashes(folder) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file()}


def handlers(output_dir) -> list:
    layers = [f"network.{layer}" for layer in LAYERS]
    return [SAScoreHandler(layers, output_dir=output_dir),
            MeanSAQualityHandler([f"network.{layer}" for layer in QUALITY_LAYERS], output_dir=output_dir)]


def run(network, output_dir, extra=(), inferer=None) -> SupervisedEvaluator:
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=named_batches(count=3),
                                    network=network, inferer=inferer, val_handlers=[*handlers(output_dir), *extra])
    evaluator.run()
    return evaluator


@pytest.mark.parametrize("error", [RuntimeError("out of memory on batch 2"), KeyboardInterrupt()],
                         ids=["error", "ctrl-c"])
@pytest.mark.parametrize("sliding", [False, True], ids=["whole", "sliding"])
def test_a_failed_run_raises_and_leaves_earlier_files_byte_identical(tmp_path, error, sliding):
    network = make_network()
    run(FailingAt(network, 0, error), tmp_path)  # a complete run writes the files
    before = hashes(tmp_path)
    assert {"sa_layers.csv", "quality.csv"} <= set(before)
    inferer = SlidingWindowInferer(roi_size=(16, 16)) if sliding else None
    failing = FailingAt(network, 2, error)
    with pytest.raises(type(error)):
        run(failing, tmp_path, inferer=inferer)
    assert hashes(tmp_path) == before
    assert hook_count(failing) == 0


def test_the_other_exception_handlers_still_run(tmp_path):
    network = make_network()
    failing = FailingAt(network, 2, RuntimeError("broken batch"))
    inferer = SlidingWindowInferer(roi_size=(16, 16))
    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"), val_data_loader=named_batches(count=3), network=failing, inferer=inferer,
        val_handlers=[*handlers(tmp_path), PrototypeMapHandler([f"network.{LAYERS[0]}"])],
    )
    seen = []
    evaluator.add_event_handler(Events.EXCEPTION_RAISED, lambda engine, error: seen.append(str(error)))
    with pytest.raises(RuntimeError, match="broken batch"):
        evaluator.run()
    assert set(seen) == {"broken batch"}  # a handler registered after them still ran (a final checkpoint, a log)
    assert hook_count(failing) == 0 and evaluator.inferer is inferer
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("label_value, channels, message", [
    (0.5, 1, r"must be binary \(0/1\) per channel; found values \{0, 0.5\}"),
    (5.0, 3, r"must be whole numbers in \[0, 3\) for a 3-channel output; found values \{0, 5\}"),
    (1.5, 3, r"must be whole numbers in \[0, 3\).*found values \{0, 1.5\}"),
    (float("nan"), 1, r"'label'.*found values \{0, nan\}"),
])
def test_labels_that_are_not_masks_or_class_indices_are_refused(tmp_path, label_value, channels, message):
    batches = named_batches(count=1)
    label = batches[0]["label"]
    batches[0]["label"] = torch.where(label > 0, label_value, label)
    for handler in (SAScoreHandler(LAYERS), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path)):
        evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=batches,
                                        network=make_network(channels), val_handlers=[handler])
        with pytest.raises(ValueError, match=message):
            evaluator.run()
    assert not (tmp_path / "quality.csv").exists()
