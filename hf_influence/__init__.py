"""hf_influence: K-FAC / EK-FAC influence functions for data attribution in diffusers pipelines."""

__version__ = "0.1.0"

from . import baselines, evaluation
from .attribution import AttributionResult, Attributor, pairwise_scores
from .curvature.layers import LORA_ONLY
from .factors import FactorConfig, InfluenceFactors
from .fitting import fit_factors
from .index import GradientIndex, IndexConfig, build_index
from .measurements import (
    Loss,
    LossAtTime,
    Measurement,
    SimplifiedELBO,
    SquareNorm,
    WeightedLoss,
    get_measurement,
)
from .planning import Plan, plan
from .provenance import DatasetSource
from .task import DiffusionTask
from .training import TrainConfig, train_ddpm

__all__ = [
    "LORA_ONLY",
    "AttributionResult",
    "Attributor",
    "DatasetSource",
    "DiffusionTask",
    "FactorConfig",
    "GradientIndex",
    "IndexConfig",
    "InfluenceFactors",
    "Loss",
    "LossAtTime",
    "Measurement",
    "Plan",
    "SimplifiedELBO",
    "SquareNorm",
    "TrainConfig",
    "WeightedLoss",
    "__version__",
    "baselines",
    "build_index",
    "evaluation",
    "fit_factors",
    "get_measurement",
    "pairwise_scores",
    "plan",
    "train_ddpm",
]
