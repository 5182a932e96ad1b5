"""Ignite handlers for MONAI engines: SA during validation, prototype-map snapshots, whole-volume prototype maps as
NIfTI, the mean-SA quality estimate at inference, and attribution maps with their faithfulness."""

from .attribution import AttributionHandler
from .mean_sa_quality import MeanSAQualityHandler
from .probe import LayerProbeHandler
from .prototype_map_saver import PrototypeMapSaver, map_postfix
from .prototype_maps import PrototypeMapHandler
from .sa_score import SAScoreHandler

__all__ = [
    "AttributionHandler",
    "LayerProbeHandler",
    "MeanSAQualityHandler",
    "PrototypeMapHandler",
    "PrototypeMapSaver",
    "SAScoreHandler",
    "map_postfix",
]
