"""benchmarks/gpu_check.py (``make gpu-check``): says so when there is no GPU."""

from __future__ import annotations

import pytest
import torch

from benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: make gpu-check runs")
def test_without_a_gpu_the_check_says_so_and_points_to_the_cpu_smoke_run():
    with pytest.raises(SystemExit, match=r"CUDA is not available on this machine \(use --device cpu"):
        gpu_check.run([])
