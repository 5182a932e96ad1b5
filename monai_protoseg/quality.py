"""Quality calibration: turn the mean SA of a prediction (no ground truth needed) into an estimated Dice.

Scored against the network's own binarised prediction and averaged over the last layers, SA correlates with the
true Dice of the output. ``QualityCalibration`` fits a straight line ``Dice ~ slope * mean_sa + intercept`` on
validation cases that do have ground truth, reports how good that fit is (Pearson r, in-sample and leave-one-out
mean absolute error), predicts an estimated Dice clipped to [0, 1] for new cases, and saves to / loads from JSON.

Pure numpy/torch and the standard library: no ignite, no MONAI.
"""

from __future__ import annotations

import math
import numbers
import os
import pathlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

from .conformal import conformal_halfwidth, conformal_interval
from .fingerprint import NetworkFingerprint
from .io import read_json, write_json

__all__ = ["QualityCalibration", "CALIBRATION_FORMAT", "CALIBRATION_VERSION", "MIN_CASES"]

CALIBRATION_FORMAT = "monai_protoseg.QualityCalibration"
"""The ``"format"`` field of a saved calibration."""

CALIBRATION_VERSION = 1
"""The ``"version"`` field written by ``QualityCalibration.save``; ``load`` reads this version and older."""

MIN_CASES = 3
"""Fewest valid (non-NaN) cases ``QualityCalibration.fit`` accepts: with 2 the line passes through both points and
leave-one-out error is undefined."""

_LOO_RECOMPUTE = 1e-6
"""Leave-one-out fits whose remaining spread of mean SA is below this fraction of the total are refitted directly
instead of by the downdating formula, which loses precision there."""

ArrayLike = float | Sequence[float] | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class QualityCalibration:
    """Linear calibration of true Dice on mean SA, fitted on validation cases with ground truth.

    Build it with ``QualityCalibration.fit`` (or ``load`` / ``from_dict``), then ``predict`` an estimated Dice.

    Attributes:
        slope: slope of the least-squares line of true Dice on mean SA.
        intercept: its intercept.
        pearson_r: Pearson correlation of mean SA and true Dice over the fitted cases; NaN when true Dice is the
            same in all of them.
        mae: mean absolute error of the clipped fitted predictions against true Dice over the fitted cases
            (in-sample, optimistic).
        loo_mae: leave-one-out mean absolute error: each case predicted (and clipped) by the line fitted on all the
            others; an honest estimate of the error on new cases. NaN when leaving out some case leaves cases
            that all have the same mean SA (no line can be fitted to them).
        n_cases: number of cases fitted (pairs with neither value NaN).
        n_excluded: number of pairs excluded because mean SA or true Dice was NaN.
        fingerprint: the network (and mean-SA layers) it was fitted for, when ``MeanSAQualityHandler`` fitted it;
            ``None`` otherwise (``fit`` knows no network).
        loo_residuals: the absolute leave-one-out errors, for split-conformal intervals (:meth:`interval`); ``()``
            where leave-one-out is undefined or in files written before they were kept.

    Example:
        >>> calibration = QualityCalibration.fit([0.2, 0.4, 0.6, 0.8], [0.3, 0.5, 0.7, 0.9])
        >>> round(calibration.slope, 6), round(calibration.intercept, 6), round(calibration.pearson_r, 6)
        (1.0, 0.1, 1.0)
        >>> calibration.predict(0.5), calibration.predict(0.95)  # clipped to [0, 1]
        (0.6, 1.0)
    """

    slope: float
    intercept: float
    pearson_r: float
    mae: float
    loo_mae: float
    n_cases: int
    n_excluded: int = 0
    fingerprint: NetworkFingerprint | None = None
    loo_residuals: tuple[float, ...] = ()

    @classmethod
    def fit(cls, mean_sa: ArrayLike, true_dice: ArrayLike) -> QualityCalibration:
        """Least-squares line of ``true_dice`` on ``mean_sa`` over the validation cases.

        Pairs where either value is NaN (no prototype, empty reference) are left out and counted in
        ``n_excluded``.

        Args:
            mean_sa: mean SA of each case against the network's own prediction, values in [0, 1] or NaN; a
                sequence, or a 1-D numpy array or tensor.
            true_dice: Dice of each case's prediction against its ground truth, same length, in [0, 1] or NaN.

        Returns:
            The fitted calibration.

        Raises:
            ValueError: the inputs are not 1-D numbers of equal length, contain Inf or values outside [0, 1], fewer
                than ``MIN_CASES`` pairs are valid, or mean SA is the same in all valid pairs.

        Example:
            >>> calibration = QualityCalibration.fit([0.5, 0.7, float("nan"), 0.9], [0.55, 0.8, 0.9, 0.85])
            >>> calibration.n_cases, calibration.n_excluded
            (3, 1)
        """
        x = _as_vector(mean_sa, "mean_sa")
        y = _as_vector(true_dice, "true_dice")
        if x.shape != y.shape:
            raise ValueError(f"mean_sa and true_dice must have the same length, got {x.size} and {y.size}.")
        valid = ~(np.isnan(x) | np.isnan(y))
        x, y = x[valid], y[valid]
        n, n_excluded = int(x.size), int(valid.size - x.size)
        for name, values in (("mean_sa", x), ("true_dice", y)):
            if not np.isfinite(values).all():
                raise ValueError(f"{name} contains Inf values; use NaN for an undefined score.")
            if values.size and (values.min() < 0 or values.max() > 1):
                raise ValueError(
                    f"{name} must be in [0, 1] (a Dice-like score, not a percentage), got values in "
                    f"[{values.min():.4g}, {values.max():.4g}]."
                )
        if n < MIN_CASES:
            raise ValueError(
                f"cannot fit a quality calibration on {n} valid case(s) ({n_excluded} of {valid.size} excluded "
                f"because mean SA or true Dice is NaN): at least {MIN_CASES} are needed."
            )
        line = _fit_line(x, y)
        if line is None:
            raise ValueError(
                f"cannot fit a quality calibration: mean SA is {x[0]:.6g} in all {n} valid cases, so it cannot "
                f"tell good predictions from bad ones (check the layers and the reference it was scored against)."
            )
        slope, intercept = line
        xc, yc = x - x.mean(), y - y.mean()
        sxx, syy = float(xc @ xc), float(yc @ yc)
        constant_dice = bool(np.all(y == y[0]))
        pearson_r = math.nan if constant_dice else float(np.clip((xc @ yc) / math.sqrt(sxx * syy), -1, 1))
        mae = float(np.abs(np.clip(slope * x + intercept, 0, 1) - y).mean())
        residuals = _loo_residuals(x, y)
        return cls(
            slope=slope,
            intercept=intercept,
            pearson_r=pearson_r,
            mae=mae,
            loo_mae=math.nan if residuals is None else float(residuals.mean()),
            n_cases=n,
            n_excluded=n_excluded,
            loo_residuals=() if residuals is None else tuple(residuals.tolist()),
        )

    def interval(self, estimate: ArrayLike, coverage: float) -> tuple[np.ndarray, np.ndarray]:
        """Split-conformal intervals ``estimate +/- q`` clipped to [0, 1], ``q`` from the leave-one-out residuals
        (:func:`~monai_protoseg.conformal.conformal_halfwidth`); NaN where there are none (or ``estimate`` is NaN).

        Args:
            estimate: estimated Dice from :meth:`predict`, any shape.
            coverage: the nominal coverage, in (0, 1).

        Returns:
            ``(low, high)`` float64 numpy arrays of the estimate's shape.
        """
        if isinstance(estimate, torch.Tensor):
            estimate = estimate.detach().cpu().double().numpy()
        width = conformal_halfwidth(self.loo_residuals, coverage) if self.loo_residuals else math.nan
        if not self.loo_residuals:
            conformal_halfwidth([], coverage)  # checks coverage
        return conformal_interval(np.asarray(estimate, dtype=np.float64), width)

    def predict(self, mean_sa: ArrayLike) -> float | np.ndarray | torch.Tensor:
        """Estimated Dice ``clip(slope * mean_sa + intercept, 0, 1)``; NaN where ``mean_sa`` is NaN.

        Args:
            mean_sa: mean SA of one or more cases: a number, a sequence or numpy array (any shape), or a tensor.

        Returns:
            The same kind as the input: a ``float`` for a number; a tensor of the same shape on the same device for
            a tensor (its dtype if floating, else the default dtype); a float64 numpy array otherwise.

        Example:
            >>> calibration = QualityCalibration(slope=1.0, intercept=0.1, pearson_r=0.9, mae=0.05, loo_mae=0.06,
            ...                                  n_cases=20)
            >>> calibration.predict([0.0, 0.5, 0.95, float("nan")])
            array([0.1, 0.6, 1. , nan])
            >>> calibration.predict(torch.tensor([0.5]))
            tensor([0.6000])
        """
        if isinstance(mean_sa, torch.Tensor):
            dtype = mean_sa.dtype if mean_sa.is_floating_point() else torch.get_default_dtype()
            values = mean_sa.detach().as_subclass(torch.Tensor).to(torch.float64)
            return (values * self.slope + self.intercept).clamp(0, 1).to(dtype)
        if isinstance(mean_sa, numbers.Real):
            return float(np.clip(float(mean_sa) * self.slope + self.intercept, 0, 1))
        try:
            values = np.asarray(mean_sa, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"mean_sa must be a number, a sequence of numbers, a numpy array or a tensor, got "
                f"{type(mean_sa).__name__}: {error}"
            ) from error
        return np.clip(values * self.slope + self.intercept, 0, 1)

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict, with ``format``, ``version`` and the package version.

        NaN values (``pearson_r``, ``loo_mae``) become ``None`` (JSON ``null``); ``from_dict`` turns them back. The
        ``fingerprint`` is written only when there is one.

        Example:
            >>> QualityCalibration.fit([0.2, 0.5, 0.9], [0.3, 0.6, 0.8]).to_dict()["format"]
            'monai_protoseg.QualityCalibration'
        """
        from . import __version__  # here, not at import time: the package imports this module while initialising

        values = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "fingerprint"}
        values["loo_residuals"] = list(self.loo_residuals)
        for name, value in values.items():
            if isinstance(value, float) and math.isnan(value):
                values[name] = None
        if self.fingerprint is not None:
            values["fingerprint"] = self.fingerprint.to_dict()
        return {
            "format": CALIBRATION_FORMAT,
            "version": CALIBRATION_VERSION,
            "monai_protoseg_version": __version__,
            **values,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QualityCalibration:
        """The calibration described by ``data``, as written by ``to_dict``; extra keys are ignored.

        Every value is checked: ``slope`` and ``intercept`` finite, ``pearson_r`` in [-1, 1], ``mae`` and ``loo_mae``
        in [0, 1] (``pearson_r`` and ``loo_mae`` may be ``None``: undefined), the counts whole numbers, the optional
        ``fingerprint`` two sha256 digests.

        Raises:
            ValueError: ``data`` is not a mapping, has another ``format`` or a newer ``version``, misses fields, or
                a field has the wrong type or value; the message names the field.

        Example:
            >>> calibration = QualityCalibration.fit([0.2, 0.5, 0.9], [0.3, 0.6, 0.8])
            >>> QualityCalibration.from_dict(calibration.to_dict()) == calibration
            True
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"a QualityCalibration must be a JSON object / mapping, got {type(data).__name__}.")
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(f"format must be {CALIBRATION_FORMAT!r}, got {data.get('format')!r}.")
        version = data.get("version")
        if not _is_int(version) or not 1 <= version <= CALIBRATION_VERSION:
            raise ValueError(
                f"version {version!r} is not supported: this monai_protoseg reads versions 1 to "
                f"{CALIBRATION_VERSION} (a newer monai_protoseg may have written it)."
            )
        names = [f.name for f in fields(cls) if f.name not in ("fingerprint", "loo_residuals")]  # both optional
        missing = [name for name in names if name not in data]
        if missing:
            raise ValueError(f"missing field(s): {', '.join(missing)}.")
        values: dict[str, Any] = {name: _number(data[name], name) for name in ("slope", "intercept")}
        values["pearson_r"] = _number(data["pearson_r"], "pearson_r", nullable=True, low=-1, high=1)
        values["mae"] = _number(data["mae"], "mae", low=0, high=1)
        values["loo_mae"] = _number(data["loo_mae"], "loo_mae", nullable=True, low=0, high=1)
        for name, low in (("n_cases", MIN_CASES), ("n_excluded", 0)):
            if not _is_int(data[name]) or data[name] < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {data[name]!r}.")
            values[name] = int(data[name])
        residuals = data.get("loo_residuals", [])
        if not isinstance(residuals, list):
            raise ValueError(f"loo_residuals must be a list, got {residuals!r}.")
        values["loo_residuals"] = tuple(_number(value, f"loo_residuals[{i}]", low=0, high=1)
                                        for i, value in enumerate(residuals))
        return cls(**values, fingerprint=_fingerprint(data))

    def save(self, path: str | os.PathLike) -> pathlib.Path:
        """Write the calibration to ``path`` as JSON, atomically (see ``monai_protoseg.io.write_json``).

        Returns:
            ``path`` as a ``pathlib.Path``.
        """
        return write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityCalibration:
        """Read a calibration written by ``save``.

        Raises:
            FileNotFoundError: ``path`` does not exist (the message names it).
            ValueError: the file is not JSON or not a valid calibration; the message names the file and the reason.

        Example:
            >>> import tempfile
            >>> calibration = QualityCalibration.fit([0.2, 0.5, 0.9], [0.3, 0.6, 0.8])
            >>> path = calibration.save(f"{tempfile.mkdtemp()}/calibration.json")
            >>> QualityCalibration.load(path) == calibration
            True
        """
        data = read_json(path, "QualityCalibration")
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{path} is not a valid QualityCalibration file: {error}") from error


def _as_vector(values: ArrayLike, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 numpy array; ValueError naming the argument otherwise."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().as_subclass(torch.Tensor).to(torch.float64).numpy()
    try:
        array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a sequence of numbers, got {type(values).__name__}: {error}") from error
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one value per case), got shape {array.shape}.")
    return array


def _fit_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float] | None:
    """Least-squares ``(slope, intercept)`` of ``y`` on ``x``, or ``None`` when ``x`` is constant."""
    if x.size == 0 or np.all(x == x[0]):
        return None
    if np.all(y == y[0]):  # exactly flat, free of the rounding of the mean
        return 0.0, float(y[0])
    x_mean, y_mean = x.mean(), y.mean()
    xc = x - x_mean
    slope = float(xc @ (y - y_mean) / (xc @ xc))
    return slope, float(y_mean - slope * x_mean)


def _loo_residuals(x: np.ndarray, y: np.ndarray) -> np.ndarray | None:
    """Absolute leave-one-out errors of the clipped line; ``None`` if some leave-one-out fit is impossible.

    The sums of the fit without case ``i`` come from the full ones by downdating, in O(n):
    ``Sxx_{-i} = Sxx - n / (n - 1) (x_i - mean x)^2`` (likewise ``Sxy_{-i}``). Where ``Sxx_{-i}`` is small relative to
    ``Sxx`` the subtraction cancels, so those cases are refitted directly.
    """
    n = x.size
    xc, yc = x - x.mean(), y - y.mean()
    sxx, sxy = xc @ xc, xc @ yc
    scale = n / (n - 1)
    sxx_loo = sxx - scale * xc * xc
    sxy_loo = sxy - scale * xc * yc
    x_mean_loo = xc * (-1 / (n - 1))  # mean of the others, relative to the full mean
    y_mean_loo = yc * (-1 / (n - 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        predicted = y.mean() + y_mean_loo + sxy_loo / sxx_loo * (xc - x_mean_loo)
    for i in np.flatnonzero(sxx_loo <= _LOO_RECOMPUTE * sxx):
        line = _fit_line(np.delete(x, i), np.delete(y, i))
        if line is None:
            return None
        predicted[i] = line[0] * x[i] + line[1]
    return np.abs(np.clip(predicted, 0, 1) - y)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _number(
    value: Any, name: str, *, nullable: bool = False, low: float = -math.inf, high: float = math.inf,
    positive: bool = False,
) -> float:
    """A number read from JSON: finite, in ``[low, high]`` (and > 0 with ``positive``); ``None`` is NaN (undefined)
    where ``nullable``.

    Raises:
        ValueError: naming the field ``name``, the value and what it must be.
    """
    if value is None and nullable:
        return math.nan
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number{' or null' if nullable else ''}, got {value!r}.")
    if positive and value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}.")
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low:g}, {high:g}], got {value!r}.")
    return float(value)


def _fingerprint(data: Mapping[str, Any]) -> NetworkFingerprint | None:
    """The optional ``fingerprint`` of a saved calibration or estimator (``None`` when absent or null)."""
    return None if data.get("fingerprint") is None else NetworkFingerprint.from_dict(data["fingerprint"])
