"""Figures and a Markdown report from the CSV files a run writes (``sa_layers.csv``, ``sa_units.csv``, quality CSVs).

Reading, plotting and writing are separate functions: ``read_*`` return plain data, ``plot_*`` return a matplotlib
``Figure`` (made without pyplot, so no backend or global state is touched), :func:`write_report` saves the figures
and ``report.md`` atomically.
"""

from __future__ import annotations

import csv
import io
import math
import os
import pathlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from .io import atomic_write_bytes, atomic_write_text
from .quality import QualityCalibration

__all__ = [
    "LayerScores",
    "QualityRows",
    "read_layer_scores",
    "read_unit_scores",
    "read_quality",
    "plot_layer_sa",
    "plot_unit_sa",
    "plot_quality",
    "layer_table",
    "write_report",
    "save_figure",
]


@dataclass(frozen=True)
class LayerScores:
    """Per-case layer-wise SA, as ``SAScoreHandler(output_dir=...)`` writes it to ``sa_layers.csv``.

    Attributes:
        layers: layer names, encoder to decoder (the column order of the file).
        cases: the case of each row.
        classes: the class of each row.
        values: ``(rows, layers)`` SA, NaN where undefined.
    """

    layers: list[str]
    cases: list[str]
    classes: list[str]
    values: np.ndarray

    def class_names(self) -> list[str]:
        """The classes, in order of first appearance."""
        return list(dict.fromkeys(self.classes))

    def of_class(self, name: str) -> np.ndarray:
        """``(cases, layers)`` SA of one class."""
        return self.values[[c == name for c in self.classes]]


@dataclass(frozen=True)
class QualityRows:
    """The per-case rows of a ``MeanSAQualityHandler`` CSV.

    Attributes:
        cases: the case of each row.
        classes: the class of each row.
        mean_sa: mean SA of each row.
        true_dice: true Dice of each row, or ``None`` when the file has none (inference).
        estimated_dice: estimated Dice of each row (NaN without calibration).
        review: the review flag of each row.
    """

    cases: list[str]
    classes: list[str]
    mean_sa: np.ndarray
    true_dice: np.ndarray | None
    estimated_dice: np.ndarray
    review: np.ndarray


def _read_rows(path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    """The rows of a CSV file as dicts; ValueError naming the file and the missing columns otherwise."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    with open(path, newline="", encoding="utf-8") as stream:
        reader = csv.DictReader(stream)
        missing = [column for column in required if column not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path} is not the expected CSV: it has no column(s) {', '.join(missing)}.")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{path} has no rows.")
    return rows


def _floats(rows: list[dict[str, str]], column: str, path: str | os.PathLike) -> np.ndarray:
    try:
        return np.array([float(row[column]) for row in rows], dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: column {column!r} holds a value that is not a number ({error}).") from error


def read_layer_scores(path: str | os.PathLike) -> LayerScores:
    """Read ``sa_layers.csv`` (columns ``case``, ``class``, then one per layer).

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV (the message names the file).
    """
    rows = _read_rows(path, ["case", "class"])
    layers = [column for column in rows[0] if column not in ("case", "class")]
    if not layers:
        raise ValueError(f"{path} has no layer columns.")
    values = np.stack([_floats(rows, layer, path) for layer in layers], axis=1)
    return LayerScores(layers, [row["case"] for row in rows], [row["class"] for row in rows], values)


def read_unit_scores(path: str | os.PathLike) -> dict[tuple[str, str], np.ndarray]:
    """Read ``sa_units.csv`` (columns ``layer``, ``class``, ``unit``, ``sa``) as ``{(layer, class): unit SA}``."""
    rows = _read_rows(path, ["layer", "class", "unit", "sa"])
    scores = _floats(rows, "sa", path)
    units: dict[tuple[str, str], list[float]] = {}
    for row, score in zip(rows, scores):
        units.setdefault((row["layer"], row["class"]), []).append(score)
    return {key: np.array(values) for key, values in units.items()}


def read_quality(path: str | os.PathLike) -> QualityRows:
    """Read a ``MeanSAQualityHandler`` CSV (``true_dice`` only when it was written during validation)."""
    rows = _read_rows(path, ["case", "class", "mean_sa", "estimated_dice", "review"])
    return QualityRows(
        cases=[row["case"] for row in rows],
        classes=[row["class"] for row in rows],
        mean_sa=_floats(rows, "mean_sa", path),
        true_dice=_floats(rows, "true_dice", path) if "true_dice" in rows[0] else None,
        estimated_dice=_floats(rows, "estimated_dice", path),
        review=np.array([row["review"] == "True" for row in rows]),
    )


def _short(layer: str) -> str:
    """A layer name short enough for an axis tick."""
    return layer if len(layer) <= 24 else "…" + layer[-23:]


def plot_layer_sa(scores: LayerScores) -> Figure:
    """Layer-wise SA along the network (encoder to decoder): per class, the mean over cases and the 25-75% band.

    Args:
        scores: per-case layer-wise SA.

    Returns:
        the figure.
    """
    figure = Figure(figsize=(max(6.0, 0.7 * len(scores.layers) + 2), 4.2), layout="constrained")
    axis = figure.subplots()
    positions = np.arange(len(scores.layers))
    for name in scores.class_names():
        values = scores.of_class(name)
        defined = ~np.isnan(values).all(axis=0)
        mean = np.full(len(scores.layers), np.nan)
        low, high = mean.copy(), mean.copy()
        mean[defined] = np.nanmean(values[:, defined], axis=0)
        low[defined], high[defined] = np.nanpercentile(values[:, defined], [25, 75], axis=0)
        line, = axis.plot(positions, mean, marker="o", label=f"{name} (mean)")
        axis.fill_between(positions, low, high, color=line.get_color(), alpha=0.2, label=f"{name} (25-75%)")
    axis.set_xticks(positions, [_short(layer) for layer in scores.layers], rotation=40, ha="right", fontsize=8)
    axis.set_ylim(0, 1.02)
    axis.set_ylabel("SA (Dice of the prototype map)")
    axis.set_xlabel("layer (encoder → decoder)")
    axis.set_title(f"Layer-wise segmentation ability over {len(set(scores.cases))} cases")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def plot_unit_sa(units: dict[tuple[str, str], np.ndarray], threshold: float = 0.5) -> Figure:
    """Unit-wise SA per layer: each layer's units sorted by SA, with the fraction of active units (SA > threshold).

    Args:
        units: ``{(layer, class): SA of each unit}`` (see :func:`read_unit_scores`).
        threshold: SA above which a unit counts as active.

    Returns:
        the figure: one panel per class.
    """
    classes = list(dict.fromkeys(name for _, name in units))
    figure = Figure(figsize=(6.5 * len(classes), 4.2), layout="constrained")
    axes = figure.subplots(1, len(classes), squeeze=False)
    for axis, name in zip(axes[0], classes):
        for (layer, class_name), values in units.items():
            if class_name != name:
                continue
            ordered = np.sort(values[~np.isnan(values)])[::-1]
            active = float((values > threshold).mean()) if values.size else math.nan
            rank = np.linspace(0, 1, ordered.size) if ordered.size > 1 else np.zeros(ordered.size)
            axis.plot(rank, ordered, label=f"{_short(layer)}: {active:.0%} active ({values.size} units)")
        axis.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("units, sorted by SA (fraction of the layer)")
        axis.set_ylabel("unit SA")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"Unit-wise SA, class {name} (active: SA > {threshold:g})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return figure


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
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("mean SA of the last layers (vs own prediction)")
    axis.set_ylabel("true Dice")
    axis.set_title(title, fontsize=10)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    return figure


def layer_table(scores: LayerScores) -> str:
    """A Markdown table: per layer and class, mean, median and 25-75% range of SA over cases, and undefined cases."""
    lines = ["| layer | class | mean SA | median | 25-75% | undefined |", "|---|---|---:|---:|---|---:|"]
    for i, layer in enumerate(scores.layers):
        for name in scores.class_names():
            values = scores.of_class(name)[:, i]
            defined = values[~np.isnan(values)]
            if defined.size:
                low, high = np.percentile(defined, [25, 75])
                cells = f"{defined.mean():.3f} | {np.median(defined):.3f} | {low:.3f}-{high:.3f}"
            else:
                cells = "nan | nan | -"
            lines.append(f"| `{layer}` | {name} | {cells} | {values.size - defined.size} |")
    return "\n".join(lines)


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> pathlib.Path:
    """Save ``figure`` as PNG atomically.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return atomic_write_bytes(path, buffer.getvalue())


def write_report(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    validation_quality: str = "quality_validation.csv",
    inference_quality: str = "quality.csv",
    active_threshold: float = 0.5,
) -> pathlib.Path:
    """Write the figures and ``report.md`` for the CSV files found in ``run_dir``.

    Reads ``sa_layers.csv`` (required), and when present ``sa_units.csv``, the validation quality CSV (with true
    Dice; the calibration line is refitted from its rows, which is the fit ``MeanSAQualityHandler`` made) and the
    inference quality CSV (with true Dice too when the held-out cases had labels, to show the estimate's error).

    Args:
        run_dir: the folder a run wrote its CSV files to.
        output_dir: where the report goes; default ``run_dir/report``.
        validation_quality: file name of the quality CSV written during validation.
        inference_quality: file name of the quality CSV written at inference.
        active_threshold: unit SA above which a unit counts as active.

    Returns:
        the path of ``report.md``.

    Raises:
        FileNotFoundError: ``run_dir`` or its ``sa_layers.csv`` does not exist.
    """
    run_dir = pathlib.Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run_dir}")
    output_dir = run_dir / "report" if output_dir is None else pathlib.Path(output_dir)
    scores = read_layer_scores(run_dir / "sa_layers.csv")
    sections = [
        "# ProtoSeg report",
        f"Run folder: `{run_dir}`",
        "## Layer-wise segmentation ability (validation, against the ground truth)",
        _best_layers(scores),
        layer_table(scores),
        f"![layer-wise SA]({save_figure(plot_layer_sa(scores), output_dir / 'layer_sa.png').name})",
    ]
    if (run_dir / "sa_units.csv").is_file():
        units = read_unit_scores(run_dir / "sa_units.csv")
        sections += ["## Unit-wise segmentation ability", _active_units(units, active_threshold),
                     f"![unit-wise SA]({save_figure(plot_unit_sa(units, active_threshold), output_dir / 'unit_sa.png').name})"]
    if (run_dir / validation_quality).is_file():
        quality = read_quality(run_dir / validation_quality)
        fitted = _refit(quality)
        sections += ["## Quality estimate: mean SA against true Dice (validation)", _quality_summary(quality, fitted)]
        if quality.true_dice is not None:
            figure = save_figure(plot_quality(quality, fitted), output_dir / "quality.png")
            sections.append(f"![mean SA vs true Dice]({figure.name})")
    if (run_dir / inference_quality).is_file():
        sections += ["## Inference: estimated quality without ground truth",
                     _inference_summary(read_quality(run_dir / inference_quality), inference_quality)]
    return atomic_write_text(output_dir / "report.md", "\n\n".join(sections) + "\n")


def _best_layers(scores: LayerScores) -> str:
    lines = []
    for name in scores.class_names():
        means = scores.of_class(name)
        defined = ~np.isnan(means).all(axis=0)
        if not defined.any():
            lines.append(f"- class {name}: SA undefined in every layer.")
            continue
        mean = np.full(len(scores.layers), -np.inf)
        mean[defined] = np.nanmean(means[:, defined], axis=0)
        best = int(np.argmax(mean))
        lines.append(f"- class {name}: best layer `{scores.layers[best]}` (mean SA {mean[best]:.3f}); "
                     f"worst `{scores.layers[int(np.argmin(np.where(defined, mean, np.inf)))]}`.")
    return "\n".join(lines)


def _active_units(units: dict[tuple[str, str], np.ndarray], threshold: float) -> str:
    lines = [f"Units with SA > {threshold:g} (active), per layer and class:", ""]
    for (layer, name), values in units.items():
        lines.append(f"- `{layer}`, {name}: {int((values > threshold).sum())} of {values.size} "
                     f"({(values > threshold).mean():.0%})")
    return "\n".join(lines)


def _refit(quality: QualityRows) -> QualityCalibration | None:
    """The calibration ``MeanSAQualityHandler`` fitted on these validation rows; ``None`` where it could not."""
    if quality.true_dice is None:
        return None
    try:
        return QualityCalibration.fit(quality.mean_sa, quality.true_dice)
    except ValueError:
        return None


def _inference_summary(quality: QualityRows, filename: str) -> str:
    flagged = [f"{case} ({name})" for case, name, flag in zip(quality.cases, quality.classes, quality.review) if flag]
    calibrated = not np.isnan(quality.estimated_dice).all()
    text = f"{len(quality.cases)} case-class rows in `{filename}`; mean SA {np.nanmean(quality.mean_sa):.3f}"
    text += f", mean estimated Dice {np.nanmean(quality.estimated_dice):.3f}" if calibrated else " (no calibration: mean SA only)"
    text += f"; {len(flagged)} flagged for review" + (f": {', '.join(flagged)}." if flagged else ".")
    if quality.true_dice is not None and calibrated and not np.isnan(quality.true_dice).all():
        valid = ~(np.isnan(quality.estimated_dice) | np.isnan(quality.true_dice))
        error = np.abs(quality.estimated_dice[valid] - quality.true_dice[valid])
        text += (f"\n\nThese held-out cases have ground truth, so the estimate can be checked: over {int(valid.sum())} "
                 f"rows, mean absolute error of the estimated Dice {error.mean():.3f} (max {error.max():.3f}); true "
                 f"Dice ranges {np.nanmin(quality.true_dice):.3f}-{np.nanmax(quality.true_dice):.3f}.")
    return text


def _quality_summary(quality: QualityRows, calibration: QualityCalibration | None) -> str:
    if quality.true_dice is None:
        return "The validation quality CSV has no true Dice."
    valid = ~(np.isnan(quality.mean_sa) | np.isnan(quality.true_dice))
    text = f"{int(valid.sum())} case-class pairs with defined mean SA and true Dice"
    if valid.sum() >= 2 and np.std(quality.mean_sa[valid]) > 0 and np.std(quality.true_dice[valid]) > 0:
        text += f"; Pearson r {np.corrcoef(quality.mean_sa[valid], quality.true_dice[valid])[0, 1]:.3f}"
    if calibration is not None:
        text += (f". Calibration: Dice ≈ {calibration.slope:.3f} · mean SA {calibration.intercept:+.3f}, "
                 f"in-sample MAE {calibration.mae:.3f}, leave-one-out MAE {calibration.loo_mae:.3f}")
    return text + "."
