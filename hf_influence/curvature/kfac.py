"""K-FAC and EK-FAC statistics (`method.md` §3.2–3.4).

Per layer and with `S` draws, K-FAC approximates the GGN weight block by `G ⊗ A`:

* expand: `A = 1/S Σ_s 1/R Σ_r a a ᵀ`, `G = 1/S Σ_s Σ_r g gᵀ` (positions act like extra data);
* reduce: `A = 1/S Σ_s ā ā ᵀ` with `ā = 1/R Σ_r a`, `G = 1/S Σ_s ĝ ĝᵀ` with `ĝ = Σ_r g`.

The bias is a block of its own, approximated by `G`. EK-FAC keeps the eigenvectors of `A` and `G`
and replaces the eigenvalues by the second moments of per-draw gradients in that eigenbasis,
`Λ_ij = 1/S Σ_s (Q_Gᵀ ∇W_s Q_A)_ij²`, estimated on independent draws.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import LayerKind

APPROXIMATIONS = ("expand", "reduce")
# Per-draw rotated gradients are formed in chunks of at most this many elements.
_CHUNK_ELEMENTS = 1 << 25


class CovarianceAccumulator:
    """Sums `A` (at the forward pass) and `G` (at the backward pass) over draws for every layer."""

    def __init__(self, layers: dict[str, nn.Module], approx: str, dtype: torch.dtype) -> None:
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}.")
        self.approx = approx
        self.dtype = dtype
        self.activation: dict[str, torch.Tensor] = {}
        self.gradient: dict[str, torch.Tensor] = {}

    def on_forward(self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor) -> None:
        a = kind.activations(module, inputs).to(self.dtype)
        rows = a.reshape(-1, a.shape[-1]) / a.shape[1] ** 0.5 if self.approx == "expand" else a.mean(dim=1)
        _add(self.activation, name, rows.T @ rows)

    def on_backward(
        self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        g = kind.output_gradients(module, grad).to(self.dtype)
        rows = g.reshape(-1, g.shape[-1]) if self.approx == "expand" else g.sum(dim=1)
        _add(self.gradient, name, rows.T @ rows)


class EigenvalueCorrectionAccumulator:
    """Sums the squared per-draw gradients in the K-FAC eigenbasis: EK-FAC's corrected eigenvalues."""

    def __init__(
        self,
        activation_eigenvectors: dict[str, torch.Tensor],
        gradient_eigenvectors: dict[str, torch.Tensor],
        dtype: torch.dtype,
    ) -> None:
        self.activation_eigenvectors = activation_eigenvectors
        self.gradient_eigenvectors = gradient_eigenvectors
        self.dtype = dtype
        self.weight: dict[str, torch.Tensor] = {}
        self.bias: dict[str, torch.Tensor] = {}

    def on_backward(
        self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        q_a = self.activation_eigenvectors[name].to(grad.device, self.dtype)
        q_g = self.gradient_eigenvectors[name].to(grad.device, self.dtype)
        a = kind.activations(module, inputs).to(self.dtype) @ q_a  # (S, R, d_in) rotated
        g = kind.output_gradients(module, grad).to(self.dtype) @ q_g  # (S, R, d_out) rotated
        if a.shape[1] == 1:  # one position: the squared outer product factorises
            squares = g[:, 0].pow(2).T @ a[:, 0].pow(2)
        else:
            chunk = max(1, _CHUNK_ELEMENTS // (g.shape[-1] * a.shape[-1]))
            squares = sum(
                torch.einsum("sro,sri->soi", g[i : i + chunk], a[i : i + chunk]).pow(2).sum(dim=0)
                for i in range(0, len(a), chunk)
            )
        _add(self.weight, name, squares)
        if module.bias is not None:
            _add(self.bias, name, g.sum(dim=1).pow(2).sum(dim=0))


def eigendecompose(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a covariance, in fp64 after symmetrising."""
    matrix = covariance.to(torch.float64)
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return eigenvalues.clamp_min(0).to(covariance.dtype), eigenvectors.to(covariance.dtype)


def _add(store: dict[str, torch.Tensor], name: str, value: torch.Tensor) -> None:
    if name in store:
        store[name] += value
    else:
        store[name] = value.clone()
