"""benchmarks/bench_scaling.py: the scaling exponent and the options (its --quick run is in test_bench_run_all.py)."""

from __future__ import annotations

import argparse
import contextlib
import io
import math

import pytest

from benchmarks import bench_scaling


def test_log_log_slope_is_the_exponent_of_a_power_law():
    voxels = [64**3, 96**3, 128**3, 160**3]
    assert bench_scaling.log_log_slope(voxels, [3e-8 * v for v in voxels]) == pytest.approx(1.0)
    assert bench_scaling.log_log_slope(voxels, [2.0 * v**1.5 for v in voxels]) == pytest.approx(1.5)
    assert bench_scaling.log_log_slope(voxels, [0.5] * 4) == pytest.approx(0.0, abs=1e-12)
    # least squares: noise on one point moves the slope less than the two-point slope through it
    noisy = [3e-8 * v for v in voxels]
    noisy[-1] *= 2
    two_point = math.log(noisy[-1] / noisy[-2]) / math.log(voxels[-1] / voxels[-2])
    assert 1.0 < bench_scaling.log_log_slope(voxels, noisy) < two_point


def test_log_log_slope_is_undefined_without_two_positive_points():
    assert math.isnan(bench_scaling.log_log_slope([8], [1.0]))
    assert math.isnan(bench_scaling.log_log_slope([8, 27], [1.0, 0.0]))


def test_layer_counts_and_sizes_are_checked():
    assert bench_scaling.layer_counts("1,2,4,all") == ["1", "2", "4", "all"]
    for text in ("0", "two", "1,,all", "-1"):
        with pytest.raises(argparse.ArgumentTypeError):
            bench_scaling.layer_counts(text)
    for sizes in ("40", "16,32"):  # the UNet needs multiples of 16, and more than one voxel at its bottom
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            bench_scaling.run(["--sizes", sizes])
