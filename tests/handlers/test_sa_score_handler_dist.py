"""SAScoreHandler under torch.distributed (2 gloo processes, uneven split) equals a single process."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import DataLoader, DistributedSampler
from monai.engines import SupervisedEvaluator

from monai_protoseg.handlers import SAScoreHandler
from tests.handlers.test_sa_score_handler import LAYERS, make_batches, make_network


def cases() -> list[dict[str, torch.Tensor]]:
    """Five single images: two ranks get three and two."""
    batches = make_batches(count=3, batch=2)
    return [{key: batch[key][b] for key in batch} for batch in batches for b in range(2)][:5]


def evaluate(sampler=None) -> dict:
    network = make_network()
    loader = DataLoader(cases(), batch_size=1, sampler=sampler, num_workers=0)
    handler = SAScoreHandler(LAYERS)
    evaluator = SupervisedEvaluator(device=torch.device("cpu"), val_data_loader=loader, network=network,
                                    val_handlers=[handler])
    evaluator.run()
    details = evaluator.state.metric_details[f"sa_{LAYERS[0]}"]
    return {"metrics": evaluator.state.metrics, "details": sorted(details.flatten().tolist())}


def run_rank(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = evaluate(DistributedSampler(cases(), shuffle=False, even_divisible=False))
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
    single = evaluate()
    mp.spawn(run_rank, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert len(result["details"]) == 5
        assert result["details"] == pytest.approx(single["details"], abs=1e-6)
        for key, value in single["metrics"].items():
            assert result["metrics"][key] == pytest.approx(value, abs=1e-6), key
