"""The report's section on segmentation from image-level labels: what the ``coin_weak_protoseg`` bundle's evaluation
(:mod:`monai_protoseg.weak.workflow`) writes under ``weak/``."""

from __future__ import annotations

import math

import numpy as np

from ..io import read_csv
from ..sections import Block, Paragraph, PNGImage, RunFiles, Section, Table, number_cell
from .evaluation import FAITHFULNESS_COLUMNS, METHOD_TITLES, SUMMARY_COLUMNS

__all__ = ["weak_section"]


def weak_section(run: RunFiles) -> Section | None:
    """Segmentation from image-level labels, from ``weak/``: the table of ``weak_segmentation.csv``, the
    faithfulness check of ``faithfulness.csv`` and the figures ``weak_masks.png`` and ``weak_maps.png``, each when
    present."""
    folder = run.run_dir / "weak"
    scores, faithfulness = folder / "weak_segmentation.csv", folder / "faithfulness.csv"
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
    cells = [[title, *(number_cell(values[column][i]) for column in numbers[:3]),
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
    for name, alt in (("weak_masks.png", "weak supervision masks"), ("weak_maps.png", "weak supervision maps")):
        if (folder / name).is_file():
            blocks.append(PNGImage(name, alt, (folder / name).read_bytes()))
    return Section("Segmentation from image-level labels", summary=summary, blocks=blocks)
