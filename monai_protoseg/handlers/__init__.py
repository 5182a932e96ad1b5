"""Ignite handlers for MONAI engines: SA during validation, prototype-map snapshots, the mean-SA quality estimate at
inference, and attribution maps with their faithfulness."""

from .attribution import AttributionHandler
from .mean_sa_quality import MeanSAQualityHandler
from .probe import LayerProbeHandler
from .prototype_maps import PrototypeMapHandler
from .sa_score import SAScoreHandler

__all__ = ["AttributionHandler", "LayerProbeHandler", "MeanSAQualityHandler", "PrototypeMapHandler", "SAScoreHandler"]
