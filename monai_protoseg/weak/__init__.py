"""Segmentation from image-level labels: classifier heatmaps (seed 003) and COIN counterfactual inpainting (seed 004).

A weakly labelled dataset (:mod:`.data`), the masks' tensor math (:mod:`.masks`), classifier heatmaps from the
attribution methods (:mod:`.heatmaps`), COIN's generator, losses and trainer (:mod:`.coin`), scores (:mod:`.evaluation`)
and the evaluation that writes the results (:mod:`.workflow`).
"""

from .coin import CoinGenerator, CoinLoss, CoinTrainer, counterfactual_mask, latest_checkpoint, total_variation
from .data import ANATOMIES, make_weak_case, write_weak_dataset
from .evaluation import (
    CASE_COLUMNS,
    FAITHFULNESS_COLUMNS,
    METHOD_TITLES,
    SUMMARY_COLUMNS,
    classify,
    maps_to_masks,
    method_maps,
    per_case_scores,
    segmentation_scores,
)
from .heatmaps import HEATMAP_METHODS, ClassScoreMap, classifier_heatmaps, heatmap_filtered
from .masks import clean_mask, closing, largest_connected_component, opening, otsu_threshold, threshold_maps
from .workflow import (
    evaluate_weak_segmentation,
    faithfulness_check,
    format_faithfulness_table,
    format_weak_table,
    read_weak_dataset,
    train_classifier,
)

__all__ = [
    "ANATOMIES",
    "make_weak_case",
    "write_weak_dataset",
    "otsu_threshold",
    "threshold_maps",
    "opening",
    "closing",
    "largest_connected_component",
    "clean_mask",
    "HEATMAP_METHODS",
    "ClassScoreMap",
    "classifier_heatmaps",
    "heatmap_filtered",
    "CoinGenerator",
    "CoinLoss",
    "CoinTrainer",
    "counterfactual_mask",
    "latest_checkpoint",
    "total_variation",
    "METHOD_TITLES",
    "SUMMARY_COLUMNS",
    "CASE_COLUMNS",
    "FAITHFULNESS_COLUMNS",
    "classify",
    "method_maps",
    "maps_to_masks",
    "per_case_scores",
    "segmentation_scores",
    "read_weak_dataset",
    "evaluate_weak_segmentation",
    "format_weak_table",
    "format_faithfulness_table",
    "train_classifier",
    "faithfulness_check",
]
