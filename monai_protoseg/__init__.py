"""monai_protoseg: what every layer of a MONAI segmentation network can segment (ProtoSeg, SA scores)."""

from .handlers import MeanSAQualityHandler, SAScoreHandler
from .inferers import ProtoSegInferer
from .metrics import SAScoreMetric
from .protoseg import prototype_map, prototypes, sa_score
from .quality import QualityCalibration
from .recorder import FeatureRecorder, candidate_layers, last_decoder_layers, resolve_layers
from .transforms import ForegroundProbability, ForegroundProbabilityd, ProtoSegd

__version__ = "0.1.0"

__all__ = [
    "prototypes",
    "prototype_map",
    "sa_score",
    "FeatureRecorder",
    "candidate_layers",
    "resolve_layers",
    "last_decoder_layers",
    "SAScoreMetric",
    "SAScoreHandler",
    "MeanSAQualityHandler",
    "ProtoSegInferer",
    "ForegroundProbability",
    "ForegroundProbabilityd",
    "ProtoSegd",
    "QualityCalibration",
]
