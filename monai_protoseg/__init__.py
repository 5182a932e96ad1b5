"""monai_protoseg: what every layer of a MONAI segmentation network can segment (ProtoSeg, SA scores)."""

from .checks import CheckedLoadImaged, CheckSpatialShaped
from .estimator import QualityEstimator, quality_features
from .handlers import AttributionHandler, MeanSAQualityHandler, PrototypeMapHandler, PrototypeMapSaver, SAScoreHandler
from .inferers import ProtoSegInferer
from .layer_names import layer_aliases
from .maps import MapSnapshot, plot_prototype_maps, read_snapshot, save_snapshot, take_snapshot, tile_snapshot
from .metrics import SAScoreMetric
from .module import ProtoSeg
from .protoseg import prototype_map, prototypes, sa_score, sa_scores
from .quality import QualityCalibration
from .recorder import FeatureRecorder, candidate_layers, last_decoder_layers, resolve_layers
from .transforms import ForegroundProbability, ForegroundProbabilityd, ProtoSegd

__version__ = "0.1.0"

__all__ = [
    "prototypes",
    "prototype_map",
    "sa_score",
    "sa_scores",
    "ProtoSeg",
    "FeatureRecorder",
    "candidate_layers",
    "resolve_layers",
    "last_decoder_layers",
    "layer_aliases",
    "SAScoreMetric",
    "SAScoreHandler",
    "MeanSAQualityHandler",
    "AttributionHandler",
    "PrototypeMapHandler",
    "PrototypeMapSaver",
    "MapSnapshot",
    "take_snapshot",
    "save_snapshot",
    "read_snapshot",
    "plot_prototype_maps",
    "tile_snapshot",
    "ProtoSegInferer",
    "ForegroundProbability",
    "ForegroundProbabilityd",
    "ProtoSegd",
    "CheckedLoadImaged",
    "CheckSpatialShaped",
    "QualityCalibration",
    "QualityEstimator",
    "quality_features",
]
