"""The report's section on the attribution methods compared: what ``benchmarks/bench_attribution.py --output-dir
RUN_DIR/attribution`` writes (``attribution_metrics.csv``, ``attribution_maps.png``)."""

from __future__ import annotations

import math
import os

from ..io import read_csv
from ..sections import Block, Paragraph, PNGImage, RunFiles, Section, Table, number_cell
from .faithfulness import COLUMNS

__all__ = ["read_attribution_metrics", "attribution_section"]


def read_attribution_metrics(path: str | os.PathLike) -> list[dict[str, str | bool | int | float]]:
    """Read ``attribution_metrics.csv`` as ``benchmarks/bench_attribution.py --output-dir`` writes it: one row per
    task and method, with ``task``, ``method``, ``reference`` (a reference map, not a method), ``cases``, the means of
    the four faithfulness columns of :class:`~monai_protoseg.AttributionHandler` and ``seconds_per_case``.

    Raises:
        FileNotFoundError: no such file. ValueError: not that kind of CSV, cut short, or a value out of range (the
            four faithfulness columns in [0, 1] or ``nan``, ``cases`` a count, ``seconds_per_case`` >= 0, ``reference``
            ``True`` or ``False``); the message names the file, and the line and column.
    """
    table = read_csv(path, ["task", "method", "reference", "cases", *COLUMNS, "seconds_per_case"])
    reference, cases = table.booleans("reference"), table.integers("cases")
    values = {column: table.floats(column) for column in COLUMNS}
    seconds = table.floats("seconds_per_case", 0, math.inf)
    return [{"task": row["task"], "method": row["method"], "reference": bool(reference[i]), "cases": int(cases[i]),
             **{column: float(values[column][i]) for column in COLUMNS},
             "seconds_per_case": float(seconds[i])}
            for i, row in enumerate(table.rows)]


def attribution_section(run: RunFiles) -> Section | None:
    """The attribution methods compared, from ``attribution/``: the table of ``attribution_metrics.csv`` and the
    figure ``attribution_maps.png`` as saved, each when present."""
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
        cells = [[row["task"], row["method"], *(number_cell(row[column]) for column in COLUMNS),
                  f"{row['seconds_per_case']:.3g}"] for row in rows]
        header = ["task", "method", "PP", "IP", "deletion AUC", "insertion AUC", "s/case"]
        blocks.append(Table(header, cells, right=[False, False, True, True, True, True, True]))
    if figure.is_file():
        blocks.append(PNGImage("attribution_maps.png", "attribution maps", figure.read_bytes()))
    return Section("Attribution methods compared", summary=summary, blocks=blocks)
