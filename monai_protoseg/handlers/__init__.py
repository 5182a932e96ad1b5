"""Ignite handlers for MONAI engines: SA during validation, the mean-SA quality estimate at inference."""

from .mean_sa_quality import MeanSAQualityHandler
from .probe import LayerProbeHandler
from .sa_score import SAScoreHandler

__all__ = ["LayerProbeHandler", "MeanSAQualityHandler", "SAScoreHandler"]
