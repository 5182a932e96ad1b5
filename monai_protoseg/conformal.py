"""Split-conformal intervals: from the errors of held-out estimates, a half-width that covers a new case's true value
with a stated probability.

Pure numpy and the standard library: no ignite, no MONAI, no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = ["conformal_halfwidth", "conformal_interval"]


def conformal_halfwidth(residuals: Sequence[float] | np.ndarray | torch.Tensor, coverage: float) -> float:
    """Split-conformal half-width: the ``ceil((n + 1) * coverage)``-th smallest of the ``n`` absolute residuals.

    If the residuals of held-out estimates and that of a new case are exchangeable, the interval ``estimate +/- q``
    holds the new case's true value with probability at least ``coverage``. With too few residuals for that
    (``ceil((n + 1) * coverage) > n``) the half-width is infinite.

    Args:
        residuals: ``(n,)`` residuals of held-out estimates (their absolute values are used); NaN ones are ignored.
        coverage: the nominal coverage, in (0, 1).

    Returns:
        The half-width ``q`` (``inf`` with too few residuals).

    Example:
        >>> conformal_halfwidth([0.1, -0.3, 0.2, 0.05], 0.5)  # ceil(5 * 0.5) = 3rd smallest of 0.05, 0.1, 0.2, 0.3
        0.2
    """
    if not isinstance(coverage, (int, float)) or isinstance(coverage, bool) or not 0 < coverage < 1:
        raise ValueError(f"coverage must be a number in (0, 1), got {coverage!r}.")
    if isinstance(residuals, torch.Tensor):
        residuals = residuals.detach().cpu().double().numpy()
    values = np.abs(np.asarray(residuals, dtype=np.float64))
    if values.ndim != 1:
        raise ValueError(f"residuals must be 1-D, got shape {values.shape}.")
    values = np.sort(values[~np.isnan(values)])
    rank = math.ceil((values.size + 1) * coverage)
    return math.inf if rank > values.size else float(values[rank - 1])


def conformal_interval(
    estimate: float | np.ndarray, halfwidth: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The interval ``estimate +/- halfwidth`` clipped to [0, 1] (a Dice-like score); NaN stays NaN.

    Example:
        >>> [value.tolist() for value in conformal_interval(np.array([0.5, 0.95]), 0.1)]
        [[0.4, 0.85], [0.6, 1.0]]
    """
    estimate = np.asarray(estimate, dtype=np.float64)
    return np.clip(estimate - halfwidth, 0, 1), np.clip(estimate + halfwidth, 0, 1)
