"""Eigendecompositions of the Kronecker factors, in fp64, full or truncated to the leading eigenpairs."""

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


def decompose(covariance: torch.Tensor, rank: int) -> Eigenpairs:
    """All eigenpairs of `covariance` when `rank` is its size, else the `rank` leading ones and the residual."""
    values, vectors = eigendecompose(covariance)
    if rank >= len(covariance):
        return Eigenpairs(values, vectors)
    return Eigenpairs(*truncate(values, vectors, rank))
