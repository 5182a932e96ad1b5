"""The handlers on a GPU: the same numbers as on the CPU, under autocast too (skipped without CUDA; run by
``make gpu-check``)."""

from __future__ import annotations

import pytest
import torch
from monai.engines import SupervisedEvaluator
from monai.inferers import SlidingWindowInferer

from monai_protoseg import MeanSAQualityHandler, ProtoSegInferer, SAScoreHandler
from tests.handlers.test_mean_sa_quality_handler import QUALITY_LAYERS, named_batches, read_rows
from tests.handlers.test_sa_score_handler import LAYERS, hook_count, make_network

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available on this machine")


def evaluate(device: torch.device, output_dir, amp_dtype: torch.dtype | None = None, inferer=None) -> dict:
    """SA and quality handlers (with the flipped pass) on ``device``; the evaluator's metrics."""
    network = make_network().to(device)
    handlers = [SAScoreHandler(LAYERS), MeanSAQualityHandler(QUALITY_LAYERS, output_dir=output_dir,
                                                              fit_estimator=False, estimator=None)]
    evaluator = SupervisedEvaluator(device=device, val_data_loader=named_batches(count=3), network=network,
                                    inferer=inferer, val_handlers=handlers, amp=amp_dtype is not None,
                                    amp_kwargs={"dtype": amp_dtype} if amp_dtype is not None else None)
    evaluator.run()
    assert hook_count(network) == 0
    return evaluator.state.metrics


@pytest.mark.parametrize("sliding", [False, True], ids=["whole", "sliding"])
def test_handlers_on_cuda_match_the_cpu(tmp_path, sliding):
    inferer = SlidingWindowInferer(roi_size=(16, 16), overlap=0.5) if sliding else None
    cpu = evaluate(torch.device("cpu"), tmp_path / "cpu", inferer=inferer)
    gpu = evaluate(torch.device("cuda"), tmp_path / "cuda", inferer=inferer)
    for key, value in cpu.items():
        assert gpu[key] == pytest.approx(value, abs=1e-4, nan_ok=True), key
    rows = zip(read_rows(tmp_path / "cpu" / "quality.csv"), read_rows(tmp_path / "cuda" / "quality.csv"))
    for cpu_row, gpu_row in rows:
        assert float(gpu_row["mean_sa"]) == pytest.approx(float(cpu_row["mean_sa"]), abs=1e-4, nan_ok=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_autocast_validation_is_close_to_float32(tmp_path, dtype):
    full = evaluate(torch.device("cuda"), tmp_path / "full")
    half = evaluate(torch.device("cuda"), tmp_path / "half", amp_dtype=dtype)
    for layer in LAYERS:
        assert half[f"sa_{layer}"] == pytest.approx(full[f"sa_{layer}"], abs=0.05)


def test_quality_flipped_pass_and_streaming_on_cuda(tmp_path):
    network = make_network().cuda().eval()
    image = torch.rand(2, 1, 32, 32, device="cuda")
    inferer = ProtoSegInferer(SlidingWindowInferer(roi_size=(16, 16), overlap=0.5), LAYERS)
    with torch.no_grad():
        prediction = inferer(image, network)
    assert prediction.device.type == "cuda"
    assert all(value.device.type == "cuda" for value in inferer.features.values())
    handler = MeanSAQualityHandler(QUALITY_LAYERS, output_dir=tmp_path, fit_estimator=True, tta_flip=True)
    evaluator = SupervisedEvaluator(device=torch.device("cuda"), val_data_loader=named_batches(count=6),
                                    network=network, val_handlers=[handler])
    evaluator.run()
    assert "tta_disagreement" in read_rows(tmp_path / "quality.csv")[0]
