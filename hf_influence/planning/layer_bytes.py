"""Every per-layer byte-count rule of a plan, in one place: what a fitted layer stores (`stored_bytes`), what
its fit holds on the device (`fitting_bytes`) and what one example's index entry takes (`index_bytes`).

They depend only on the layer's shape (d_out, d_in, the activation rank kept, whether it has a bias) and the
policies, so that the curvature strategies can later own them (EK-FAC and K-FAC differ only in
`eigenvalues` and `corrections`); `Plan` only sums them.
"""

from __future__ import annotations

import torch

from ..index import IndexConfig

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
    d_out: int,
    d_in: int,
    activation_rank: int,
    bias: bool,
    *,
    strategy: str,
    dtype: str,
    eigenvector_dtype: str,
    keep_covariances: bool,
    index_config: IndexConfig,
) -> dict[str, int]:
    """Bytes by kind (`BYTE_KINDS`) of one layer's stored factors and index entry.

    Covariances and eigenvalues are in `dtype` (FactorConfig.dtype; covariances zero without
    `keep_covariances`), eigenvectors in `eigenvector_dtype`. EK-FAC stores a corrected eigenvalue per kept
    weight direction, `d_out` for the bias and `d_out` complement values when the activation factor is
    truncated; K-FAC stores each factor's eigenvalues, the bias block's and one complement value."""
    value, vector = itemsize(dtype), itemsize(eigenvector_dtype)
    truncated = activation_rank < d_in
    if strategy == "ekfac":
        eigenvalues = d_out * activation_rank + d_out * (bias + truncated)
    else:
        eigenvalues = activation_rank + d_out * (1 + bias) + truncated
    return {
        "activation_covariance": d_in * d_in * value * keep_covariances,
        "gradient_covariance": d_out * d_out * value * keep_covariances,
        "activation_eigenvectors": d_in * activation_rank * vector,
        "gradient_eigenvectors": d_out * d_out * vector,
        "eigenvalues": eigenvalues * value,
        "index_per_example": index_bytes(index_config, d_out, d_in, bias),
    }


def fitting_bytes(d_out: int, d_in: int, activation_rank: int, *, strategy: str, dtype: str) -> dict[str, int]:
    """Device bytes of one layer during a fit, accumulated in `dtype`: its two covariances, its eigenvectors,
    EK-FAC's correction sums (kept columns and two values per gradient direction; none for K-FAC) and the
    fp64 workspace of eigendecomposing its larger factor."""
    accumulate = itemsize(dtype)
    corrections = (d_out * activation_rank + 2 * d_out) * accumulate if strategy == "ekfac" else 0
    return {
        "covariances": (d_in**2 + d_out**2) * accumulate,
        "eigenvectors": (d_in * activation_rank + d_out**2) * accumulate,
        "corrections": corrections,
        "eigh_workspace": EIGH_WORKSPACE * max(d_in, d_out) ** 2 * 8,
    }


def index_bytes(config: IndexConfig, d_out: int, d_in: int, bias: bool) -> int:
    """Bytes of one example's entry for a layer, as `compression.py` stores it."""
    if config.compression == "svd" and min(d_out, d_in) > config.rank:
        tensors = [config.rank * d_out, config.rank * d_in]
    elif config.compression == "projection":
        tensors = [min(d_out, config.projection_dim) * min(d_in, config.projection_dim)]
    else:
        tensors = [d_out * d_in]
    if bias:
        tensors.append(min(d_out, config.projection_dim) if config.compression == "projection" else d_out)
    if config.quantize_bits is not None:  # one byte per value, and an fp32 scale and minimum per tensor
        return sum(tensors) + 8 * len(tensors)
    return 4 * sum(tensors)


def itemsize(dtype: str) -> int:
    """Bytes per number of a dtype named as in the configs ("float32", "bfloat16", ...)."""
    return torch.empty((), dtype=getattr(torch, dtype)).element_size()
