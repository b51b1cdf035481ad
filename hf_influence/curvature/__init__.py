"""The K-FAC engine: layer capture, Kronecker statistics, eigendecompositions, and the curvature strategies
(identity, K-FAC, EK-FAC) that store the factors and precondition gradients."""

from .capture import LayerCapture
from .eigen import Eigenpairs, decompose, eigendecompose
from .layer_factors import LayerFactors
from .layers import LORA_ONLY, find_layers, layer_kind
from .probes import backpropagated_values
from .statistics import CovarianceAccumulator, EigenvalueCorrectionAccumulator
from .strategies import STRATEGIES, CurvatureStrategy, get_strategy

__all__ = [
    "LORA_ONLY",
    "STRATEGIES",
    "CovarianceAccumulator",
    "CurvatureStrategy",
    "Eigenpairs",
    "EigenvalueCorrectionAccumulator",
    "LayerCapture",
    "LayerFactors",
    "backpropagated_values",
    "decompose",
    "eigendecompose",
    "find_layers",
    "get_strategy",
    "layer_kind",
]
