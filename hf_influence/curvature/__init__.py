"""The K-FAC engine: layer capture, Kronecker factors, eigenvalue correction, damped inverse."""

from .capture import LayerCapture
from .inverse import precondition
from .kfac import CovarianceAccumulator, EigenvalueCorrectionAccumulator, eigendecompose
from .layers import find_layers, layer_kind

__all__ = [
    "CovarianceAccumulator",
    "EigenvalueCorrectionAccumulator",
    "LayerCapture",
    "eigendecompose",
    "find_layers",
    "layer_kind",
    "precondition",
]
