"""Every per-layer byte-count rule of a plan, in one place: what a fitted layer stores (`stored_bytes`), what
its fit holds on the device (`fitting_bytes`) and what one example's index entry takes (`index_bytes`).

They depend only on the layer's shape (d_out, d_in, the activation rank kept, whether it has a bias) and the
policies; the curvature strategy says what its factors take (`CurvatureStrategy.layer_bytes`,
`correction_bytes`) and the index's compressor what an entry takes (`Compressor.layout`). `Plan` only sums.
"""

from __future__ import annotations

import torch

from ..compression import Compressor
from ..curvature.strategies import CurvatureStrategy

# The stored kinds, in the order of `stored_bytes`, `Plan.totals()` and the plan's table.
BYTE_KINDS = (
    "activation_covariance",
    "gradient_covariance",
    "activation_eigenvectors",
    "gradient_eigenvectors",
    "eigenvalues",
    "index_per_example",
)
EIGH_WORKSPACE = 3  # an fp64 eigendecomposition of a d × d factor holds about 3 d² fp64 numbers


def stored_bytes(
    name: str,
    d_out: int,
    d_in: int,
    activation_rank: int,
    bias: bool,
    *,
    strategy: CurvatureStrategy,
    dtype: str,
    eigenvector_dtype: str,
    keep_covariances: bool,
    compressor: Compressor,
) -> dict[str, int]:
    """Bytes by kind (`BYTE_KINDS`) of one layer's stored factors (as its strategy stores them: covariances and
    eigenvalues in `dtype`, eigenvectors in `eigenvector_dtype`) and index entry (the compressor's layout)."""
    factors = strategy.layer_bytes(
        d_out, d_in, activation_rank, bias, itemsize(dtype), itemsize(eigenvector_dtype), keep_covariances
    )
    return {**factors, "index_per_example": sum(compressor.layout(name, d_out, d_in, bias).values())}


def fitting_bytes(
    d_out: int, d_in: int, activation_rank: int, *, strategy: CurvatureStrategy, dtype: str
) -> dict[str, int]:
    """Device bytes of one layer during a fit, accumulated in `dtype`: its two covariances, its eigenvectors,
    the strategy's correction sums (EK-FAC's) and the fp64 workspace of eigendecomposing its larger factor;
    nothing for a strategy that fits nothing."""
    accumulate = itemsize(dtype)
    fitted = strategy.fits_covariances
    return {
        "covariances": (d_in**2 + d_out**2) * accumulate * fitted,
        "eigenvectors": (d_in * activation_rank + d_out**2) * accumulate * fitted,
        "corrections": strategy.correction_bytes(d_out, activation_rank, accumulate),
        "eigh_workspace": EIGH_WORKSPACE * max(d_in, d_out) ** 2 * 8 * fitted,
    }


def itemsize(dtype: str) -> int:
    """Bytes per number of a dtype named as in the configs ("float32", "bfloat16", ...)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()
