"""Figures and a report (Markdown and self-contained HTML) from the CSV files a run writes (``sa_layers.csv``,
``sa_units.csv``, quality CSVs).

Reading, plotting and writing are separate functions: ``read_*`` return plain data, ``plot_*`` return a matplotlib
``Figure`` (made without pyplot, so no backend or global state is touched). The report is built once as a list of
:class:`Section` (text, tables and PNG figures; one builder per section in :data:`SECTIONS`) and rendered by
:func:`render_markdown` and :func:`render_html`; :func:`write_report` saves the figures, ``report.md`` and
``report.html`` atomically.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import pathlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from .handlers.attribution import COLUMNS as ATTRIBUTION_COLUMNS
from .io import atomic_write_bytes, atomic_write_text, read_csv
from .maps import plot_prototype_maps, read_snapshot
from .quality import QualityCalibration

__all__ = [
    "LayerScores",
    "QualityRows",
    "read_layer_scores",
    "read_unit_scores",
    "read_quality",
    "read_attribution_metrics",
    "plot_layer_sa",
    "plot_unit_sa",
    "plot_quality",
    "layer_table",
    "save_figure",
    "Paragraph",
    "BulletList",
    "Table",
    "PNGImage",
    "Section",
    "RunFiles",
    "SECTIONS",
    "build_sections",
    "render_markdown",
    "render_html",
    "write_report",
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


def read_layer_scores(path: str | os.PathLike) -> LayerScores:
    """Read ``sa_layers.csv`` (columns ``case``, ``class``, then one per layer).

    Every SA must be in [0, 1] or ``nan`` (undefined: an empty reference or no prototype). A file whose every SA is
    ``nan`` is read as it is: the report then says that SA is undefined everywhere.

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV, cut short, or a value that is not an SA
            (see :func:`~monai_protoseg.io.read_csv`; the message names the file, and the line and column).
    """
    table = read_csv(path, ["case", "class"])
    layers = [column for column in table.columns if column not in ("case", "class")]
    if not layers:
        raise ValueError(f"{path} has no layer columns.")
    values = np.stack([table.floats(layer) for layer in layers], axis=1)
    return LayerScores(layers, [row["case"] for row in table.rows], [row["class"] for row in table.rows], values)


def read_unit_scores(path: str | os.PathLike) -> dict[tuple[str, str], np.ndarray]:
    """Read ``sa_units.csv`` (columns ``layer``, ``class``, ``unit``, ``sa``) as ``{(layer, class): unit SA}``.

    Raises:
        FileNotFoundError: no such file. ValueError: as :func:`read_layer_scores`.
    """
    table = read_csv(path, ["layer", "class", "unit", "sa"])
    units: dict[tuple[str, str], list[float]] = {}
    for row, score in zip(table.rows, table.floats("sa")):
        units.setdefault((row["layer"], row["class"]), []).append(score)
    return {key: np.array(values) for key, values in units.items()}


def read_quality(path: str | os.PathLike) -> QualityRows:
    """Read a ``MeanSAQualityHandler`` CSV (``true_dice`` only when it was written during validation).

    Raises:
        FileNotFoundError: no such file. ValueError: as :func:`read_layer_scores`; ``review`` must be ``True`` or
            ``False``.
    """
    table = read_csv(path, ["case", "class", "mean_sa", "estimated_dice", "review"])
    return QualityRows(
        cases=[row["case"] for row in table.rows],
        classes=[row["class"] for row in table.rows],
        mean_sa=table.floats("mean_sa"),
        true_dice=table.floats("true_dice") if "true_dice" in table.columns else None,
        estimated_dice=table.floats("estimated_dice"),
        review=table.booleans("review"),
    )


def _short(layer: str) -> str:
    """A layer name short enough for an axis tick."""
    return layer if len(layer) <= 24 else "…" + layer[-23:]


def plot_layer_sa(scores: LayerScores) -> Figure:
    """Layer-wise SA along the network (encoder to decoder): per class, the mean over cases and the 25-75% band.

    A class whose SA is undefined in every layer has no line; when no class has one, the axes say so.

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
        if not defined.any():
            continue
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
    if axis.lines:
        axis.legend(fontsize=8)
    else:
        axis.text(0.5, 0.5, "SA undefined (NaN) in every case, class and layer", ha="center", va="center",
                  transform=axis.transAxes)
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


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 110) -> pathlib.Path:
    """Save ``figure`` as PNG atomically.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    return atomic_write_bytes(path, _png(figure, dpi))


def _png(figure: Figure, dpi: int = 110) -> bytes:
    """``figure`` as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


# The report is a list of sections built once from the run's files, then rendered to Markdown and to HTML. Text in
# blocks is plain text in which `backticks` mark code (layer names, file names), in both renderings.


@dataclass(frozen=True)
class Paragraph:
    """A paragraph of text."""

    text: str


@dataclass(frozen=True)
class BulletList:
    """A bulleted list, one text per item."""

    items: list[str]


@dataclass(frozen=True)
class Table:
    """A table of text cells; ``right[i]`` aligns column ``i`` right (numbers)."""

    header: list[str]
    rows: list[list[str]]
    right: list[bool]


@dataclass(frozen=True)
class PNGImage:
    """A figure: saved as ``filename`` beside ``report.md``, embedded as a data URI in ``report.html``."""

    filename: str
    alt: str
    png: bytes


Block = Paragraph | BulletList | Table | PNGImage


@dataclass(frozen=True)
class Section:
    """One section of the report.

    Attributes:
        title: its heading.
        summary: its key findings, one sentence each; the report's summary at the top collects them.
        blocks: its content, in order.
    """

    title: str
    summary: list[str]
    blocks: list[Block]


@dataclass(frozen=True)
class RunFiles:
    """What a section builder reads: the run folder and the report options.

    Attributes:
        run_dir: the folder a run wrote its CSV files to.
        validation_quality: file name of the quality CSV written during validation.
        inference_quality: file name of the quality CSV written at inference.
        active_threshold: unit SA above which a unit counts as active.
    """

    run_dir: pathlib.Path
    validation_quality: str = "quality_validation.csv"
    inference_quality: str = "quality.csv"
    active_threshold: float = 0.5


def layer_table(scores: LayerScores) -> str:
    """A Markdown table: per layer and class, mean, median and 25-75% range of SA over cases, and undefined cases."""
    return _markdown_table(_layer_table(scores))


def _layer_table(scores: LayerScores) -> Table:
    rows = []
    for i, layer in enumerate(scores.layers):
        for name in scores.class_names():
            values = scores.of_class(name)[:, i]
            defined = values[~np.isnan(values)]
            if defined.size:
                low, high = np.percentile(defined, [25, 75])
                cells = [f"{defined.mean():.3f}", f"{np.median(defined):.3f}", f"{low:.3f}-{high:.3f}"]
            else:
                cells = ["nan", "nan", "-"]
            rows.append([f"`{layer}`", name, *cells, str(values.size - defined.size)])
    header = ["layer", "class", "mean SA", "median", "25-75%", "undefined"]
    return Table(header, rows, right=[False, False, True, True, False, True])


def _layer_section(run: RunFiles) -> Section | None:
    """Layer-wise SA from ``sa_layers.csv``: best and worst layer per class, the table, the figure."""
    path = run.run_dir / "sa_layers.csv"
    if not path.is_file():
        return None
    scores = read_layer_scores(path)
    summary = _best_layers(scores)
    if np.isnan(scores.values).all():
        summary.insert(0, f"Every SA in `{path.name}` is undefined (NaN): no case has both a non-empty reference and "
                          f"prototypes at any layer; check that the labels hold the scored classes.")
    return Section(
        "Layer-wise segmentation ability (validation, against the ground truth)",
        summary=summary,
        blocks=[_layer_table(scores), PNGImage("layer_sa.png", "layer-wise SA", _png(plot_layer_sa(scores)))],
    )


def _best_layers(scores: LayerScores) -> list[str]:
    """Per class, the layers with the highest and the lowest mean SA over cases."""
    lines = []
    for name in scores.class_names():
        values = scores.of_class(name)
        defined = ~np.isnan(values).all(axis=0)
        if not defined.any():
            lines.append(f"Class {name}: SA undefined in every layer.")
            continue
        mean = np.full(len(scores.layers), np.nan)
        mean[defined] = np.nanmean(values[:, defined], axis=0)
        best, worst = int(np.nanargmax(mean)), int(np.nanargmin(mean))
        lines.append(f"Class {name} segments best at layer `{scores.layers[best]}` (mean SA {mean[best]:.3f}) and "
                     f"worst at `{scores.layers[worst]}` ({mean[worst]:.3f}).")
    return lines


def _unit_section(run: RunFiles) -> Section | None:
    """Unit-wise SA from ``sa_units.csv``: active units per layer and class, the figure."""
    path = run.run_dir / "sa_units.csv"
    if not path.is_file():
        return None
    units = read_unit_scores(path)
    threshold = run.active_threshold
    active = {key: int((values > threshold).sum()) for key, values in units.items()}
    fraction = {key: active[key] / values.size for key, values in units.items()}

    def count(key: tuple[str, str]) -> str:
        return f"`{key[0]}`, {key[1]}: {active[key]} of {units[key].size} ({fraction[key]:.0%})"

    most, fewest = max(fraction, key=fraction.get), min(fraction, key=fraction.get)
    total = sum(values.size for values in units.values())
    summary = (f"Active units (unit SA > {threshold:g}): {sum(active.values())} of {total} in all; most in "
               f"{count(most)}; fewest in {count(fewest)}.")
    return Section(
        "Unit-wise segmentation ability",
        summary=[summary],
        blocks=[
            Paragraph(f"Units with SA > {threshold:g} (active), per layer and class:"),
            BulletList([count(key) for key in units]),
            PNGImage("unit_sa.png", "unit-wise SA", _png(plot_unit_sa(units, threshold))),
        ],
    )


def _refit(quality: QualityRows) -> QualityCalibration | None:
    """The calibration ``MeanSAQualityHandler`` fitted on these validation rows; ``None`` where it could not."""
    if quality.true_dice is None:
        return None
    try:
        return QualityCalibration.fit(quality.mean_sa, quality.true_dice)
    except ValueError:
        return None


def _quality_section(run: RunFiles) -> Section | None:
    """Mean SA against true Dice on the validation cases: Pearson r, the calibration and its errors, the figure."""
    path = run.run_dir / run.validation_quality
    if not path.is_file():
        return None
    title = "Quality estimate: mean SA against true Dice (validation)"
    quality = read_quality(path)
    if quality.true_dice is None:
        return Section(title, summary=[], blocks=[Paragraph(f"`{path.name}` has no true Dice.")])
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
    blocks.append(PNGImage("quality.png", "mean SA vs true Dice", _png(plot_quality(quality, calibration))))
    return Section(title, summary=[summary], blocks=blocks)


def _inference_section(run: RunFiles) -> Section | None:
    """The inference rows: mean estimated Dice, the cases flagged for review, the estimate's error where checkable."""
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
    if quality.true_dice is not None and calibrated and not np.isnan(quality.true_dice).all():
        valid = ~(np.isnan(quality.estimated_dice) | np.isnan(quality.true_dice))
        error = np.abs(quality.estimated_dice[valid] - quality.true_dice[valid])
        summary += f"; against their true Dice, off by {error.mean():.3f} on average (max {error.max():.3f})"
        blocks.append(Paragraph(
            f"These held-out cases have ground truth, so the estimate can be checked: over {int(valid.sum())} rows, "
            f"mean absolute error of the estimated Dice {error.mean():.3f} (max {error.max():.3f}); true Dice ranges "
            f"{np.nanmin(quality.true_dice):.3f}-{np.nanmax(quality.true_dice):.3f}."))
    return Section("Inference: estimated quality without ground truth", summary=[summary + "."], blocks=blocks)


def _prototype_map_section(run: RunFiles) -> Section | None:
    """The prototype maps ``PrototypeMapHandler(output_dir=...)`` saved in ``prototype_maps/``: one figure."""
    paths = sorted((run.run_dir / "prototype_maps").glob("*.npz"))
    if not paths:
        return None
    snapshots = [read_snapshot(path) for path in paths]
    cases = ", ".join(dict.fromkeys(f"`{snapshot.case}`" for snapshot in snapshots))
    return Section(
        "Prototype maps",
        summary=[f"Prototype maps of {len(snapshots[0].layers)} layers are shown for {len(snapshots)} case-class "
                 f"pair(s): {cases}."],
        blocks=[
            Paragraph("Each row: the image, the ground truth, the network's soft prediction, then every probed layer's "
                      "prototype map (soft, with its 0.5 contour: the binary ProtoSeg map) and its SA over the whole "
                      "case. 3D cases show the slice with the most foreground."),
            PNGImage("prototype_maps.png", "prototype maps", _png(plot_prototype_maps(snapshots), dpi=80)),
        ],
    )


def read_attribution_metrics(path: str | os.PathLike) -> list[dict[str, str | bool | int | float]]:
    """Read ``attribution_metrics.csv`` as ``benchmarks/bench_attribution.py --output-dir`` writes it: one row per
    task and method, with ``task``, ``method``, ``reference`` (a reference map, not a method), ``cases``, the means of
    the four faithfulness columns of :class:`~monai_protoseg.AttributionHandler` and ``seconds_per_case``.

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV, cut short, or a value out of range (the
            four faithfulness columns in [0, 1] or ``nan``, ``cases`` a count, ``seconds_per_case`` >= 0, ``reference``
            ``True`` or ``False``); the message names the file, and the line and column.
    """
    table = read_csv(path, ["task", "method", "reference", "cases", *ATTRIBUTION_COLUMNS, "seconds_per_case"])
    reference, cases = table.booleans("reference"), table.integers("cases")
    values = {column: table.floats(column) for column in ATTRIBUTION_COLUMNS}
    seconds = table.floats("seconds_per_case", 0, math.inf)
    return [{"task": row["task"], "method": row["method"], "reference": bool(reference[i]), "cases": int(cases[i]),
             **{column: float(values[column][i]) for column in ATTRIBUTION_COLUMNS},
             "seconds_per_case": float(seconds[i])}
            for i, row in enumerate(table.rows)]


def _attribution_section(run: RunFiles) -> Section | None:
    """The attribution methods compared, from ``attribution/`` (``bench_attribution.py --output-dir
    RUN_DIR/attribution`` writes it): the table of ``attribution_metrics.csv`` and the figure
    ``attribution_maps.png`` as saved, each when present."""
    folder = run.run_dir / "attribution"
    metrics, figure = folder / "attribution_metrics.csv", folder / "attribution_maps.png"
    if not metrics.is_file() and not figure.is_file():
        return None
    summary: list[str] = []
    blocks: list[Block] = [Paragraph(
        "Faithfulness of each method's attribution maps, mean over the cases: Prediction Preserved (PP, higher is "
        "better: how much of the prediction the image multiplied by the map keeps) beside Image Preserved (IP, lower "
        "is better: the map's mean); a map of all ones gets PP = IP = 1. Deletion AUC (lower is better) and insertion "
        "AUC (higher is better): the predicted region's probability as the map's top pixels are removed or alone "
        "revealed. The figure: one row per case (a 3D case at the slice with the most predicted foreground), the "
        "image, the prediction, then each method's map.")]
    if metrics.is_file():
        rows = read_attribution_metrics(metrics)
        for task in dict.fromkeys(row["task"] for row in rows):
            methods = [row for row in rows if row["task"] == task and not row["reference"]
                       and not math.isnan(row["deletion_auc"])]
            if methods:
                best = min(methods, key=lambda row: row["deletion_auc"])
                summary.append(f"Attribution on the {task} task ({best['cases']} cases): the lowest deletion AUC of "
                               f"{len(methods)} methods is {best['method']} ({best['deletion_auc']:.3f}).")
        cells = [[row["task"], row["method"],
                  *("-" if math.isnan(row[column]) else f"{row[column]:.3f}" for column in ATTRIBUTION_COLUMNS),
                  f"{row['seconds_per_case']:.3g}"] for row in rows]
        header = ["task", "method", "PP", "IP", "deletion AUC", "insertion AUC", "s/case"]
        blocks.append(Table(header, cells, right=[False, False, True, True, True, True, True]))
    if figure.is_file():
        blocks.append(PNGImage("attribution_maps.png", "attribution maps", figure.read_bytes()))
    return Section("Attribution methods compared", summary=summary, blocks=blocks)


def _weak_section(run: RunFiles) -> Section | None:
    """Segmentation from image-level labels, from ``weak/`` (the ``coin_weak_protoseg`` bundle's evaluation writes
    it): the table of ``weak_segmentation.csv``, the faithfulness check of ``faithfulness.csv`` and the figure
    ``weak_masks.png``, each when present."""
    # here, not at the top: monai_protoseg.weak writes its figures with this module (weak builds on reporting)
    from .weak.evaluation import FAITHFULNESS_COLUMNS, METHOD_TITLES, SUMMARY_COLUMNS

    folder = run.run_dir / "weak"
    scores, faithfulness, figure = (folder / name for name in
                                    ("weak_segmentation.csv", "faithfulness.csv", "weak_masks.png"))
    if not scores.is_file():
        return None
    numbers = ["iou", "dice", "normal_false_positive", "seconds_per_case"]
    table = read_csv(scores, SUMMARY_COLUMNS)
    values = {column: table.floats(column, 0, math.inf if column == "seconds_per_case" else 1) for column in numbers}
    lesion, normal = table.integers("lesion_cases"), table.integers("normal_cases")
    titles = [f"{METHOD_TITLES.get(row['method'], row['method'])} ({row['threshold']})" for row in table.rows]
    best = int(np.nanargmax(values["iou"])) if not np.isnan(values["iou"]).all() else 0
    summary = [f"Segmentation from image-level labels ({lesion[best]} lesion and {normal[best]} normal held-out "
               f"cases): the highest dataset IoU of {len(titles)} methods is {titles[best]} "
               f"({values['iou'][best]:.3f}, mean Dice {values['dice'][best]:.3f})."]
    cells = [[title, *("-" if math.isnan(values[column][i]) else f"{values[column][i]:.3f}" for column in numbers[:3]),
              f"{values['seconds_per_case'][i]:.3g}"] for i, title in enumerate(titles)]
    blocks: list[Block] = [
        Paragraph("Lesion masks from a classifier trained on image labels alone (abnormal / normal): COIN's "
                  "counterfactual difference `|X - X_cf|` thresholded, opened, closed, largest component kept; each "
                  "heatmap thresholded (Otsu per image, or the fixed threshold in brackets). Only images the "
                  "classifier labels abnormal are segmented. Dataset IoU accumulates intersections and unions over "
                  "all cases; mean Dice is over the lesion cases; normal FP is the fraction of normal cases given a "
                  "mask."),
        Table(["method (threshold)", "dataset IoU", "mean Dice", "normal FP", "s/case"], cells,
              right=[False, True, True, True, True]),
    ]
    if faithfulness.is_file():
        checks = read_csv(faithfulness, FAITHFULNESS_COLUMNS)
        accuracy = checks.floats("accuracy")
        blocks += [Paragraph("Faithfulness (seed 003): a classifier retrained and tested on heatmap-filtered images. "
                             "If the heatmaps hold what the classifier uses, the highlighted images keep the accuracy "
                             "and the rest loses it."),
                   Table(["training and test images", "accuracy"],
                         [[row["training_images"], f"{accuracy[i]:.3f}"] for i, row in enumerate(checks.rows)],
                         right=[False, True])]
        summary += [f"Faithfulness: accuracy {accuracy[0]:.3f} on the original images, "
                    + ", ".join(f"{accuracy[i]:.3f} retrained on {row['training_images']}"
                                for i, row in enumerate(checks.rows) if i) + "."]
    for name, alt in ((figure, "weak supervision masks"), (folder / "weak_maps.png", "weak supervision maps")):
        if name.is_file():
            blocks.append(PNGImage(name.name, alt, name.read_bytes()))
    return Section("Segmentation from image-level labels", summary=summary, blocks=blocks)


SECTIONS: list[Callable[[RunFiles], Section | None]] = [_layer_section, _unit_section, _prototype_map_section,
                                                        _quality_section, _inference_section, _attribution_section,
                                                        _weak_section]
"""The report's section builders, in report order. Each returns its section, or ``None`` when its files are absent;
a new section is one more builder in this list."""


def build_sections(run: RunFiles) -> list[Section]:
    """The report's sections for ``run``, a summary of their findings first.

    Args:
        run: the run folder and the report options.

    Returns:
        the sections, in report order.

    Raises:
        FileNotFoundError: ``run.run_dir`` does not exist, or holds neither ``sa_layers.csv`` nor
            ``weak/weak_segmentation.csv``. ValueError: a CSV file is not the expected one, was cut short, or
            holds a value out of range (see :func:`~monai_protoseg.io.read_csv`; the message names the file, and the
            line and column).
    """
    if not run.run_dir.is_dir():
        raise FileNotFoundError(f"no run folder {run.run_dir}")
    if not (run.run_dir / "sa_layers.csv").is_file() and not (run.run_dir / "weak" / "weak_segmentation.csv").is_file():
        raise FileNotFoundError(
            f"no SA results in {run.run_dir}: sa_layers.csv is missing (SAScoreHandler(output_dir=...) writes it), "
            f"and so is weak/weak_segmentation.csv (the coin_weak_protoseg bundle's evaluation writes it)."
        )
    sections = [section for build in SECTIONS if (section := build(run)) is not None]
    findings = [line for section in sections for line in section.summary]
    return [Section("Summary", summary=[], blocks=[BulletList(findings)]), *sections]


def render_markdown(sections: Sequence[Section], run_dir: str | os.PathLike) -> str:
    """The report as Markdown; figures are linked by file name (saved beside it by :func:`write_report`)."""
    parts = ["# ProtoSeg report", f"Run folder: `{run_dir}`"]
    for section in sections:
        parts.append(f"## {section.title}")
        parts += [_markdown_block(block) for block in section.blocks]
    return "\n\n".join(parts) + "\n"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return block.text
    if isinstance(block, BulletList):
        return "\n".join(f"- {item}" for item in block.items)
    if isinstance(block, Table):
        return _markdown_table(block)
    return f"![{block.alt}]({block.filename})"


def _markdown_table(table: Table) -> str:
    lines = ["| " + " | ".join(table.header) + " |", "|" + "|".join("---:" if r else "---" for r in table.right) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in table.rows])


_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:64rem;margin:2rem auto;padding:0 1rem;line-height:1.45}"
    "table{border-collapse:collapse;font-size:.9rem}th,td{border:1px solid #ccc;padding:.2rem .5rem}"
    "th{background:#f3f3f3}td.number{text-align:right}code{background:#f3f3f3;padding:0 .2rem}"
    "img{max-width:100%;height:auto}figure{margin:1rem 0}"
)


def render_html(sections: Sequence[Section], run_dir: str | os.PathLike) -> str:
    """The report as one self-contained HTML5 page: figures embedded as base64 PNG data URIs, the style inline."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ProtoSeg report: {html.escape(pathlib.Path(run_dir).name)}</title>",
        f"<style>{_STYLE}</style>",
        "</head>",
        "<body>",
        "<h1>ProtoSeg report</h1>",
        f"<p>Run folder: <code>{html.escape(str(run_dir))}</code></p>",
    ]
    for section in sections:
        parts += ["<section>", f"<h2>{_inline_html(section.title)}</h2>"]
        parts += [_html_block(block) for block in section.blocks]
        parts.append("</section>")
    parts += ["</body>", "</html>"]
    return "\n".join(parts) + "\n"


def _inline_html(text: str) -> str:
    """``text`` escaped, with `backtick` spans as ``<code>``."""
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html.escape(text))


def _html_block(block: Block) -> str:
    if isinstance(block, Paragraph):
        return f"<p>{_inline_html(block.text)}</p>"
    if isinstance(block, BulletList):
        return "<ul>\n" + "\n".join(f"<li>{_inline_html(item)}</li>" for item in block.items) + "\n</ul>"
    if isinstance(block, Table):
        return _html_table(block)
    data = base64.b64encode(block.png).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(block.alt)}"></figure>'


def _html_table(table: Table) -> str:
    header = "".join(f"<th>{_inline_html(text)}</th>" for text in table.header)
    rows = []
    for row in table.rows:
        cells = (f'<td class="number">{_inline_html(text)}</td>' if right else f"<td>{_inline_html(text)}</td>"
                 for text, right in zip(row, table.right))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return "\n".join(["<table>", f"<thead><tr>{header}</tr></thead>", "<tbody>", *rows, "</tbody>", "</table>"])


def write_report(
    run_dir: str | os.PathLike,
    output_dir: str | os.PathLike | None = None,
    *,
    validation_quality: str = "quality_validation.csv",
    inference_quality: str = "quality.csv",
    active_threshold: float = 0.5,
) -> pathlib.Path:
    """Write the figures, ``report.md`` and the self-contained ``report.html`` for the CSV files found in ``run_dir``.

    Reads ``sa_layers.csv`` (this or the weak-supervision results must exist), and when present ``sa_units.csv``, the
    validation quality CSV (with true Dice; the calibration line is refitted from its rows, which is the fit
    ``MeanSAQualityHandler`` made), the inference quality CSV (with true Dice too when the held-out cases had labels, to
    show the estimate's error) and the weak-supervision results under ``weak/``. The sections are those of
    :data:`SECTIONS`.

    Args:
        run_dir: the folder a run wrote its CSV files to.
        output_dir: where the report goes; default ``run_dir/report``.
        validation_quality: file name of the quality CSV written during validation.
        inference_quality: file name of the quality CSV written at inference.
        active_threshold: unit SA above which a unit counts as active.

    Returns:
        the path of ``report.md``; ``report.html`` is beside it.

    Raises:
        FileNotFoundError: ``run_dir`` does not exist, or holds neither ``sa_layers.csv`` nor
            ``weak/weak_segmentation.csv``. ValueError: a CSV file is not the expected one, was cut short, or
            holds a value out of range (see :func:`~monai_protoseg.io.read_csv`; the message names the file, and the
            line and column). A file whose every SA is ``nan`` (undefined) is no error: the report says so.
    """
    run = RunFiles(pathlib.Path(run_dir), validation_quality, inference_quality, active_threshold)
    output_dir = run.run_dir / "report" if output_dir is None else pathlib.Path(output_dir)
    sections = build_sections(run)
    for section in sections:
        for block in section.blocks:
            if isinstance(block, PNGImage):
                atomic_write_bytes(output_dir / block.filename, block.png)
    atomic_write_text(output_dir / "report.html", render_html(sections, run.run_dir))
    return atomic_write_text(output_dir / "report.md", render_markdown(sections, run.run_dir))
