"""Eigendecompositions of the Kronecker factors, in fp64, full or truncated to the leading eigenpairs (from the
full decomposition, or by randomized subspace iteration for large layers)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .large_layers import truncate


@dataclass(frozen=True)
class Eigenpairs:
    """Eigenvalues and eigenvectors (columns) of a factor; for a truncated one, the `rank` leading pairs in
    decreasing order and `residual`, the mean of the discarded eigenvalues (shape (1,)), else None."""

    values: torch.Tensor
    vectors: torch.Tensor
    residual: torch.Tensor | None = None


def eigendecompose(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (ascending, clamped at 0) and eigenvectors of a covariance, in fp64 after symmetrising."""
    matrix = covariance.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvalues.clamp_min(0).to(covariance.dtype), eigenvectors.to(covariance.dtype)


def decompose(covariance: torch.Tensor, rank: int, solver: str = "eigh") -> Eigenpairs:
    """All eigenpairs of `covariance` when `rank` is its size, else the `rank` leading ones and the residual:
    from the full fp64 eigendecomposition (`solver="eigh"`) or `leading_eigenpairs` ("randomized")."""
    if rank >= len(covariance):
        return Eigenpairs(*eigendecompose(covariance))
    if solver == "randomized":
        return leading_eigenpairs(covariance, rank)
    return Eigenpairs(*truncate(*eigendecompose(covariance), rank))


def leading_eigenpairs(
    covariance: torch.Tensor, rank: int, oversample: int | None = None, iterations: int = 6, seed: int = 0
) -> Eigenpairs:
    """The `rank` leading eigenpairs of a covariance by randomized subspace iteration (Halko, Martinsson and Tropp,
    2011): a seeded Gaussian block of `rank + oversample` columns (default: as many again), `iterations` products
    with the matrix re-orthonormalised in fp64, then the eigenpairs of the small projected matrix. The full
    d × d eigenvector matrix and fp64 eigensolver workspace are never formed: memory d·(rank + oversample) beside
    the covariance, time O(d² · (rank + oversample) · iterations). The residual is the mean of the other
    eigenvalues, `(tr A − Σ kept) / (d − rank)`, which needs none of them."""
    size = len(covariance)
    if not 0 < rank < size:
        raise ValueError(f"The rank must be between 1 and the factor size {size} (exclusive), got {rank}.")
    width = min(size, 2 * rank if oversample is None else rank + oversample)
    generator = torch.Generator(device=covariance.device).manual_seed(seed)
    matrix = (covariance + covariance.T) / 2
    block = torch.randn(size, width, generator=generator, device=covariance.device, dtype=covariance.dtype)
    for _ in range(iterations):
        block = torch.linalg.qr((matrix @ block).to(torch.float64)).Q.to(covariance.dtype)
    basis = block.to(torch.float64)
    projected = basis.T @ (matrix @ block).to(torch.float64)
    values, vectors = torch.linalg.eigh((projected + projected.T) / 2)
    values, vectors = values[-rank:].flip(0).clamp_min(0), (basis @ vectors[:, -rank:]).flip(1)
    trace = torch.diagonal(matrix).to(torch.float64).sum()
    residual = ((trace - values.sum()) / (size - rank)).clamp_min(0).reshape(1)
    return Eigenpairs(values.to(covariance.dtype), vectors.to(covariance.dtype), residual.to(covariance.dtype))
