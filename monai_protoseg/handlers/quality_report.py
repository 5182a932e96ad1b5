"""The report's sections on what :class:`~monai_protoseg.MeanSAQualityHandler` writes: the quality estimate on the
validation cases (mean SA against true Dice with the calibration line, estimated against true Dice with its interval,
the estimator's cross-validation table ``quality_cv.csv``) and at inference (estimated Dice without ground truth,
checked against the true Dice where the held-out cases have labels).

Reading, plotting and building are separate functions: :func:`read_quality` returns plain data, ``plot_*`` a
matplotlib ``Figure`` (made without pyplot), ``*_section`` a :class:`~monai_protoseg.sections.Section`.
"""

from __future__ import annotations

import math
import os
import pathlib
from dataclasses import dataclass

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..estimator import aliased_feature
from ..figures import figure_png
from ..io import read_csv
from ..layer_names import LAYER_NAMES_FILE, read_layer_names
from ..quality import QualityCalibration
from ..sections import Block, Paragraph, PNGImage, RunFiles, Section, Table, number_cell
from .mean_sa_quality import CV_FILENAME

__all__ = [
    "QualityRows",
    "read_quality",
    "plot_quality",
    "plot_estimates",
    "quality_section",
    "inference_section",
]


@dataclass(frozen=True)
class QualityRows:
    """The per-case rows of a ``MeanSAQualityHandler`` CSV.

    Attributes:
        cases: the case of each row.
        classes: the class of each row.
        mean_sa: mean SA of each row.
        true_dice: true Dice of each row, or ``None`` when the file has none (inference).
        estimated_dice: estimated Dice of each row (NaN without calibration or estimator).
        review: the review flag of each row.
        estimate_low: lower end of each estimate's interval, or ``None`` when the file has none.
        estimate_high: upper end of each estimate's interval, or ``None`` when the file has none.
    """

    cases: list[str]
    classes: list[str]
    mean_sa: np.ndarray
    true_dice: np.ndarray | None
    estimated_dice: np.ndarray
    review: np.ndarray
    estimate_low: np.ndarray | None = None
    estimate_high: np.ndarray | None = None


def read_quality(path: str | os.PathLike) -> QualityRows:
    """Read a ``MeanSAQualityHandler`` CSV (``true_dice`` only when it was written on cases with labels;
    ``estimate_low`` and ``estimate_high`` only when the estimate came with an interval).

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV, cut short, or a value out of range (see
            :func:`~monai_protoseg.io.read_csv`; the message names the file, and the line and column); ``review``
            must be ``True`` or ``False``.
    """
    table = read_csv(path, ["case", "class", "mean_sa", "estimated_dice", "review"])

    def optional(column: str) -> np.ndarray | None:
        return table.floats(column, -math.inf, math.inf) if column in table.columns else None

    return QualityRows(
        cases=[row["case"] for row in table.rows],
        classes=[row["class"] for row in table.rows],
        mean_sa=table.floats("mean_sa"),
        true_dice=table.floats("true_dice") if "true_dice" in table.columns else None,
        estimated_dice=table.floats("estimated_dice"),
        review=table.booleans("review"),
        estimate_low=optional("estimate_low"),
        estimate_high=optional("estimate_high"),
    )


def plot_quality(quality: QualityRows, calibration: QualityCalibration | None = None) -> Figure:
    """Mean SA (against the network's own prediction) against true Dice, with the calibration line and Pearson r.

    Args:
        quality: rows with ``true_dice`` (a validation CSV).
        calibration: the fitted calibration, drawn as a line when given.

    Returns:
        the figure.

    Raises:
        ValueError: the rows have no true Dice.
    """
    if quality.true_dice is None:
        raise ValueError("plot_quality needs true Dice: use the quality CSV written during validation.")
    figure = Figure(figsize=(5.2, 4.6), layout="constrained")
    axis = figure.subplots()
    valid = ~(np.isnan(quality.mean_sa) | np.isnan(quality.true_dice))
    classes = np.array(quality.classes)
    for name in dict.fromkeys(quality.classes):
        chosen = valid & (classes == name)
        axis.scatter(quality.mean_sa[chosen], quality.true_dice[chosen], s=18, alpha=0.8, label=name)
    title = f"Mean SA vs true Dice ({int(valid.sum())} case-class pairs)"
    if calibration is not None:
        x = np.linspace(0, 1, 101)
        axis.plot(x, calibration.predict(x), color="black", linewidth=1,
                  label=f"calibration: Dice ≈ {calibration.slope:.2f}·SA {calibration.intercept:+.2f}")
        title += f"\nPearson r {calibration.pearson_r:.2f}, leave-one-out MAE {calibration.loo_mae:.3f}"
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    _finish_unit_axes(axis, "mean SA of the last layers (vs own prediction)", "true Dice", title)
    return figure


def plot_estimates(quality: QualityRows, title: str) -> Figure:
    """Estimated against true Dice, one point per case and class, with each estimate's interval as an error bar
    when the rows have one; the identity line is a perfect estimate.

    Args:
        quality: rows with ``true_dice`` and a defined ``estimated_dice``.
        title: the first line of the title (which rows these are); the second gives the mean absolute error and,
            with intervals, how many true Dice they hold.

    Returns:
        the figure.

    Raises:
        ValueError: the rows have no true Dice.
    """
    if quality.true_dice is None:
        raise ValueError("plot_estimates needs true Dice: use a quality CSV written on cases with labels.")
    figure = Figure(figsize=(5.2, 4.6), layout="constrained")
    axis = figure.subplots()
    valid = ~(np.isnan(quality.estimated_dice) | np.isnan(quality.true_dice))
    intervals = quality.estimate_low is not None and quality.estimate_high is not None
    classes = np.array(quality.classes)
    for name in dict.fromkeys(quality.classes):
        chosen = valid & (classes == name)
        true, estimate = quality.true_dice[chosen], quality.estimated_dice[chosen]
        if intervals:
            below = np.clip(estimate - quality.estimate_low[chosen], 0, None)
            above = np.clip(quality.estimate_high[chosen] - estimate, 0, None)
            axis.errorbar(true, estimate, yerr=np.nan_to_num(np.stack([below, above])), fmt="o", markersize=4,
                          elinewidth=1, capsize=2, alpha=0.8, label=name)
        else:
            axis.scatter(true, estimate, s=18, alpha=0.8, label=name)
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="perfect estimate")
    error = np.abs(quality.estimated_dice[valid] - quality.true_dice[valid])
    details = f"MAE {error.mean():.3f}" if valid.any() else "no defined estimate"
    if intervals and valid.any():
        inside = (quality.estimate_low[valid] <= quality.true_dice[valid]) & (
            quality.true_dice[valid] <= quality.estimate_high[valid])
        details += f", interval holds the true Dice in {int(inside.sum())} of {int(valid.sum())}"
    _finish_unit_axes(axis, "true Dice", "estimated Dice" + (" (bar: interval)" if intervals else ""),
                      f"{title} ({int(valid.sum())} case-class pairs)\n{details}")
    return figure


def _finish_unit_axes(axis: Axes, xlabel: str, ylabel: str, title: str) -> None:
    """Both axes on [0, 1.02] (scores and Dice), labelled, titled, with a grid and the legend of the classes."""
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel(xlabel)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)


def _refit(quality: QualityRows) -> QualityCalibration | None:
    """The calibration ``MeanSAQualityHandler`` fitted on these validation rows; ``None`` where it could not."""
    if quality.true_dice is None:
        return None
    try:
        return QualityCalibration.fit(quality.mean_sa, quality.true_dice)
    except ValueError:
        return None


def _checkable(quality: QualityRows) -> bool:
    """Whether some row has both an estimated and a true Dice."""
    return quality.true_dice is not None and bool(
        (~(np.isnan(quality.estimated_dice) | np.isnan(quality.true_dice))).any())


def _cv_table(path: pathlib.Path) -> Table:
    """``quality_cv.csv`` with whatever columns it has: whole numbers as they are, other numbers with 3 decimals, and
    the ``sa_{layer}`` and ``spread_{layer}`` features named by the layers' aliases where ``layer_names.csv`` beside it
    gives them."""
    table = read_csv(path)
    names = path.with_name(LAYER_NAMES_FILE)
    aliases = {layer: alias for alias, layer in read_layer_names(names).items()} if names.is_file() else {}

    def cell(text: str) -> tuple[str, bool]:
        """The cell's text, and whether it is a number."""
        try:
            value = float(text)
        except ValueError:
            words = [aliased_feature(word, aliases) for word in text.split()]
            return ", ".join(words) if len(words) > 1 else text, False
        return (text if value.is_integer() and text.lstrip("-").isdigit() else number_cell(value)), True

    cells = [[cell(row[column]) for column in table.columns] for row in table.rows]
    right = [bool(cells) and all(row[i][1] for row in cells) for i in range(len(table.columns))]
    return Table(list(table.columns), [[text for text, _ in row] for row in cells], right)


def quality_section(run: RunFiles) -> Section | None:
    """The quality estimate on the validation cases: mean SA against true Dice (Pearson r, the calibration and its
    errors), estimated against true Dice with its interval, and the estimator's cross-validation table."""
    path, cv = run.run_dir / run.validation_quality, run.run_dir / CV_FILENAME
    if not path.is_file() and not cv.is_file():
        return None
    summary: list[str] = []
    blocks: list[Block] = []
    if path.is_file():
        quality = read_quality(path)
        if quality.true_dice is None:
            blocks.append(Paragraph(f"`{path.name}` has no true Dice."))
        else:
            summary, blocks = _validation_blocks(quality)
    if cv.is_file():
        blocks += [Paragraph(f"The quality estimator's cross-validation (`{cv.name}`): each feature set's error on "
                             f"cases left out of its fit."), _cv_table(cv)]
    return Section("Quality estimate (validation, against the ground truth)", summary, blocks)


def _validation_blocks(quality: QualityRows) -> tuple[list[str], list[Block]]:
    """The summary and blocks of validation rows with true Dice."""
    calibration = _refit(quality)
    valid = ~(np.isnan(quality.mean_sa) | np.isnan(quality.true_dice))
    summary = f"Mean SA against true Dice on {int(valid.sum())} validation case-class pairs"
    if valid.sum() >= 2 and np.std(quality.mean_sa[valid]) > 0 and np.std(quality.true_dice[valid]) > 0:
        summary += f": Pearson r {np.corrcoef(quality.mean_sa[valid], quality.true_dice[valid])[0, 1]:.3f}"
    blocks: list[Block] = []
    if calibration is None:
        summary += "; no calibration could be fitted."
    else:
        summary += f"; calibration MAE {calibration.mae:.3f} in-sample, {calibration.loo_mae:.3f} leave-one-out."
        blocks.append(Paragraph(f"Calibration fitted on {calibration.n_cases} case-class pairs: Dice ≈ "
                                f"{calibration.slope:.3f} · mean SA {calibration.intercept:+.3f}."))
    blocks.append(PNGImage("quality.png", "mean SA vs true Dice", figure_png(plot_quality(quality, calibration))))
    if _checkable(quality):
        blocks += [Paragraph("The estimated Dice of the same cases (by the method the CSV's `note` column names) "
                             "against their true Dice" + (", with each estimate's interval."
                                                          if quality.estimate_low is not None else ".")),
                   PNGImage("quality_estimate.png", "estimated vs true Dice, validation",
                            figure_png(plot_estimates(quality, "Validation: estimated vs true Dice")))]
    return [summary], blocks


def inference_section(run: RunFiles) -> Section | None:
    """The inference rows: mean estimated Dice, the cases flagged for review, and, where the held-out cases have
    labels, the estimate against the true Dice (with its interval)."""
    path = run.run_dir / run.inference_quality
    if not path.is_file():
        return None
    quality = read_quality(path)
    flagged = [f"{case} ({name})" for case, name, flag in zip(quality.cases, quality.classes, quality.review) if flag]
    calibrated = not np.isnan(quality.estimated_dice).all()
    defined = ~np.isnan(quality.mean_sa)
    findings = ((f"mean SA {quality.mean_sa[defined].mean():.3f}, " if defined.any()
                 else "mean SA undefined in every row (empty predictions), ")
                + (f"mean estimated Dice {np.nanmean(quality.estimated_dice):.3f}" if calibrated
                   else "no calibration (mean SA only)")
                + f"; {len(flagged)} flagged for review")
    summary = f"Inference on {len(quality.cases)} case-class rows: {findings}"
    blocks: list[Block] = [Paragraph(f"{len(quality.cases)} case-class rows in `{path.name}`: {findings}"
                                     + (f": {', '.join(flagged)}." if flagged else "."))]
    if calibrated and _checkable(quality):
        valid = ~(np.isnan(quality.estimated_dice) | np.isnan(quality.true_dice))
        error = np.abs(quality.estimated_dice[valid] - quality.true_dice[valid])
        summary += f"; against their true Dice, off by {error.mean():.3f} on average (max {error.max():.3f})"
        blocks += [Paragraph(
            f"These held-out cases have ground truth, so the estimate can be checked: over {int(valid.sum())} rows, "
            f"mean absolute error of the estimated Dice {error.mean():.3f} (max {error.max():.3f}); true Dice ranges "
            f"{np.nanmin(quality.true_dice):.3f}-{np.nanmax(quality.true_dice):.3f}."),
            PNGImage("inference_estimate.png", "estimated vs true Dice, held-out cases",
                     figure_png(plot_estimates(quality, "Held-out cases: estimated vs true Dice")))]
    return Section("Inference: estimated quality without ground truth", summary=[summary + "."], blocks=blocks)
