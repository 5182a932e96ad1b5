"""The report's sections on what :class:`~monai_protoseg.SAScoreHandler` writes: layer-wise SA (``sa_layers.csv``)
and unit-wise SA (``sa_units.csv``), named by the layers' aliases, with their qualified names from
``layer_names.csv``.

Reading, plotting and building are separate functions: ``read_*`` return plain data, ``plot_*`` a matplotlib
``Figure`` (made without pyplot), ``*_section`` a :class:`~monai_protoseg.sections.Section`.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
from matplotlib.figure import Figure

from ..figures import figure_png, short_label
from ..io import read_csv
from ..layer_names import LAYER_NAMES_FILE, read_layer_names
from ..sections import Block, BulletList, Paragraph, PNGImage, RunFiles, Section, Table

__all__ = [
    "LayerScores",
    "read_layer_scores",
    "read_unit_scores",
    "plot_layer_sa",
    "plot_unit_sa",
    "layer_sa_table",
    "layer_section",
    "unit_section",
]


@dataclass(frozen=True)
class LayerScores:
    """Per-case layer-wise SA, as ``SAScoreHandler(output_dir=...)`` writes it to ``sa_layers.csv``.

    Attributes:
        layers: layer names (aliases, or the qualified names in files of earlier versions), encoder to decoder (the
            column order of the file).
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
    """Read ``sa_units.csv`` (columns ``layer``, ``class``, ``unit``, ``sa``; ``qualified_name`` too, since layers are
    named by aliases) as ``{(layer, class): unit SA}``.

    Raises:
        FileNotFoundError: no such file. ValueError: as :func:`read_layer_scores`.
    """
    table = read_csv(path, ["layer", "class", "unit", "sa"])
    units: dict[tuple[str, str], list[float]] = {}
    for row, score in zip(table.rows, table.floats("sa")):
        units.setdefault((row["layer"], row["class"]), []).append(score)
    return {key: np.array(values) for key, values in units.items()}


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
    axis.set_xticks(positions, [short_label(layer) for layer in scores.layers], rotation=40, ha="right", fontsize=8)
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
            axis.plot(rank, ordered, label=f"{short_label(layer)}: {active:.0%} active ({values.size} units)")
        axis.axhline(threshold, color="grey", linestyle="--", linewidth=1)
        axis.set_xlabel("units, sorted by SA (fraction of the layer)")
        axis.set_ylabel("unit SA")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"Unit-wise SA, class {name} (active: SA > {threshold:g})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return figure


def layer_sa_table(scores: LayerScores, qualified: dict[str, str] | None = None) -> Table:
    """Per layer and class: mean, median and 25-75% range of SA over cases, and the undefined cases.

    Args:
        scores: per-case layer-wise SA.
        qualified: ``{alias: qualified name}`` (``layer_names.csv``); given, a column shows each layer's qualified
            name.

    Returns:
        the table, one row per layer and class.
    """
    rows = []
    for i, layer in enumerate(scores.layers):
        names = [f"`{layer}`"] + ([f"`{qualified[layer]}`" if layer in qualified else "-"] if qualified else [])
        for name in scores.class_names():
            values = scores.of_class(name)[:, i]
            defined = values[~np.isnan(values)]
            if defined.size:
                low, high = np.percentile(defined, [25, 75])
                cells = [f"{defined.mean():.3f}", f"{np.median(defined):.3f}", f"{low:.3f}-{high:.3f}"]
            else:
                cells = ["nan", "nan", "-"]
            rows.append([*names, name, *cells, str(values.size - defined.size)])
    header = ["layer", *(["qualified name"] if qualified else []), "class", "mean SA", "median", "25-75%", "undefined"]
    right = [False] * (3 if qualified else 2) + [True, True, False, True]
    return Table(header, rows, right)


def layer_section(run: RunFiles) -> Section | None:
    """Layer-wise SA from ``sa_layers.csv``: best and worst layer per class, the table (with the qualified names of
    ``layer_names.csv`` when the run wrote it), the figure."""
    path = run.run_dir / "sa_layers.csv"
    if not path.is_file():
        return None
    scores = read_layer_scores(path)
    names = run.run_dir / LAYER_NAMES_FILE
    qualified = read_layer_names(names) if names.is_file() else None
    summary = _best_layers(scores)
    if np.isnan(scores.values).all():
        summary.insert(0, f"Every SA in `{path.name}` is undefined (NaN): no case has both a non-empty reference and "
                          f"prototypes at any layer; check that the labels hold the scored classes.")
    blocks: list[Block] = [layer_sa_table(scores, qualified),
              PNGImage("layer_sa.png", "layer-wise SA", figure_png(plot_layer_sa(scores)))]
    if qualified:
        blocks.insert(0, Paragraph(
            "Layers are named by their place in the network: `encoder.1` is the first encoder block (nearest the "
            "input), `bottleneck` the deepest block, `decoder.1` the last decoder block and `output` the block that "
            "outputs the logits; the qualified name is the module's name in the network (`network.get_submodule`). "
            f"`{LAYER_NAMES_FILE}` pairs them."))
    return Section("Layer-wise segmentation ability (validation, against the ground truth)", summary, blocks)


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


def unit_section(run: RunFiles) -> Section | None:
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
            PNGImage("unit_sa.png", "unit-wise SA", figure_png(plot_unit_sa(units, threshold))),
        ],
    )
