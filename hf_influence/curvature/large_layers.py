"""Large layers: the activation factor truncated to its top-k eigenpairs, the rest a scaled identity.

A UNet's widest convolutions have activation factors of 11 520² or 23 040² (SD-1.5): 0.5–2 GB each in
fp32, for the covariance and again for its eigenvectors. For a layer whose `d_in` exceeds
`FactorConfig.max_factor_size`, fitting keeps only the `k = large_layer_rank` leading eigenpairs of `A`
and replaces the remainder by the mean of the discarded eigenvalues `σ` on the orthogonal complement:

    A ≈ Q_k diag(λ_1 … λ_k) Q_kᵀ + σ (I − Q_k Q_kᵀ),   σ = (tr A − Σ_{i≤k} λ_i) / (d_in − k),

which keeps the trace of `A`, is exact when `k = d_in`, and stores `d_in·k` numbers instead of `d_in²`
(every transform costs `d_out·d_in·k` instead of `d_out·d_in²`). Activation spectra of these layers
decay fast, so the leading directions, where the curvature is, are kept exactly; the damped inverse in
the complement becomes one value per gradient direction.

The weight-space eigenbasis is `Q_G ⊗ [Q_k, complement]`, the complement handled as one block: every
direction in it has the same eigenvalue, so no basis of it is needed. EK-FAC corrects the eigenvalues
in this basis: the top `k` columns as usual, `Λ_ij = E[(Q_Gᵀ ∇W Q_k)_ij²]`, and one value per gradient
direction for the complement, the mean energy there,
`ρ_i = E[‖(Q_Gᵀ ∇W (I − Q_k Q_kᵀ))_i‖²] / (d_in − k)` (stored as `residual_eigenvalues`). K-FAC uses
`λ^G_i σ` (σ stored as `activation_residual_eigenvalue`).

Only the activation side is truncated: gradient factors are at most `d_out²` (10 240² in SD-1.5's
GEGLU projections) and stay exact.
"""

from __future__ import annotations

import torch


def activation_rank(d_in: int, max_factor_size: int | None, rank: int) -> int:
    """The number of activation eigenvectors kept for a layer: all of them, unless `d_in > max_factor_size`."""
    if max_factor_size is None or d_in <= max_factor_size:
        return d_in
    return min(rank, d_in)


def truncate(values: torch.Tensor, vectors: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a full eigendecomposition (ascending, as `eigendecompose` returns it): the `rank` leading
    eigenvalues and eigenvectors (d × rank), in decreasing order, and the mean `σ` of the others (shape
    (1,)), which stands for every direction outside the kept ones."""
    size = len(values)
    if not 0 < rank <= size:
        raise ValueError(f"The rank must be between 1 and the factor size {size}, got {rank}.")
    discarded = values[: size - rank]
    residual = discarded.double().mean() if len(discarded) else values.new_zeros((), dtype=torch.float64)
    return values[size - rank :].flip(0), vectors[:, size - rank :].flip(1), residual.reshape(1).to(values.dtype)


def complement(rotated: torch.Tensor, q_a: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """`X (I − Q_k Q_kᵀ)` for `X` (…, d_out, d_in) with `top = X Q_k` already computed."""
    return rotated - top @ q_a.T
