"""SAScoreHandler and MeanSAQualityHandler under torch.distributed (2 gloo processes, uneven split) equal a single
process; only rank 0 writes files."""

from __future__ import annotations

import csv
import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import DataLoader, DistributedSampler, MetaTensor
from monai.engines import SupervisedEvaluator

from monai_protoseg import QualityCalibration
from monai_protoseg.handlers import MeanSAQualityHandler, SAScoreHandler
from tests.handlers.test_sa_score_handler import ALIASES, LAYERS, make_batches, make_network


def cases() -> list[dict[str, torch.Tensor]]:
    """Five single images: two ranks get three and two."""
    batches = make_batches(count=3, batch=2)
    images = [batch["image"][b] for batch in batches for b in range(2)]
    labels = [batch["label"][b] for batch in batches for b in range(2)]
    return [{"image": MetaTensor(images[i], meta={"filename_or_obj": f"case{i}.nii.gz"}), "label": labels[i]}
            for i in range(5)]


def evaluate(output_dir: str, sampler=None) -> dict:
    network = make_network()
    loader = DataLoader(cases(), batch_size=1, sampler=sampler, num_workers=0)
    handlers = [SAScoreHandler(LAYERS), MeanSAQualityHandler(LAYERS[:2], output_dir=output_dir, fit_calibration=True,
                                                             calibration=os.path.join(output_dir, "calibration.json"))]
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network,
                                    val_handlers=handlers)
    evaluator.run()
    details = evaluator.state.metric_details[f"sa_{ALIASES[LAYERS[0]]}"]
    return {"metrics": evaluator.state.metrics, "details": sorted(details.flatten().tolist())}


def run_rank(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = evaluate(os.path.join(out_dir, "dist"), DistributedSampler(cases(), shuffle=False, even_divisible=False))
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_ranks_with_uneven_split_equal_one_process(tmp_path):
    single = evaluate(str(tmp_path / "single"))
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["details"]) == 5
        assert result["details"] == pytest.approx(single["details"], abs=1e-6)
        for key, value in single["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
    # one CSV, one calibration and the layer names, written by rank 0, with the single process's rows (in rank order)
    assert sorted(path.name for path in (tmp_path / "dist").iterdir()) == ["calibration.json", "layer_names.csv",
                                                                           "quality.csv"]
    rows = {name: sorted(read_rows(tmp_path / name / "quality.csv"), key=lambda row: row["case"])
            for name in ("single", "dist")}
    assert [row["case"] for row in rows["dist"]] == [f"case{i}" for i in range(5)]
    for single_row, dist_row in zip(rows["single"], rows["dist"]):
        for column in ("mean_sa", "true_dice", "estimated_dice"):
            assert float(dist_row[column]) == pytest.approx(float(single_row[column]), abs=1e-5), column
    calibrations = [QualityCalibration.load(tmp_path / name / "calibration.json") for name in ("single", "dist")]
    assert calibrations[1].slope == pytest.approx(calibrations[0].slope, abs=1e-6)
    assert calibrations[1].n_cases == calibrations[0].n_cases == 5


def read_rows(path) -> list[dict[str, str]]:
    with open(path, newline="") as stream:
        return list(csv.DictReader(stream))
