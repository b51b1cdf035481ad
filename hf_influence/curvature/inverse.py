"""The damped inverse `(F̂ + λI)⁻¹` applied in the Kronecker eigenbasis (`method.md` §3.5).

For a weight-gradient matrix `V` (d_out × d_in) and eigenvalues `Λ` (EK-FAC: corrected,
K-FAC: `λ^G_i λ^A_j`), `P V = Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`; the bias block uses
`Q_G [(Q_Gᵀ v) ⊘ (λ^b + λ)]`. Damping is absolute: added to every eigenvalue.

A layer whose activation basis is truncated to `k` eigenvectors (`large_layers.py`) is represented in the
eigenbasis by `[Q_Gᵀ V Q_k | Q_Gᵀ V (I − Q_k Q_kᵀ)]` (d_out × (k + d_in)): the kept directions, then the
complement in the parameter basis, divided by its one eigenvalue per gradient direction.
"""

from __future__ import annotations

import torch

from .large_layers import complement, is_truncated, residual_eigenvalues

Layer = dict[str, torch.Tensor]


def eigenvalues(layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The weight block's eigenvalues (d_out × d_in) and the bias block's (d_out), if the layer has a bias.

    EK-FAC stores corrected `eigenvalues`; K-FAC's are the products `λ^G_i λ^A_j`.
    """
    if "eigenvalues" in layer:
        weight = layer["eigenvalues"]
    else:
        weight = torch.outer(layer["gradient_eigenvalues"], layer["activation_eigenvalues"])
    return weight, layer.get("bias_eigenvalues")


def to_eigenbasis(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rotate batched gradients `(Q, d_out, d_in)` and `(Q, d_out)` into the K-FAC eigenbasis."""
    q_a, q_g = layer["activation_eigenvectors"], layer["gradient_eigenvectors"]
    rotated = q_g.T @ weight.to(q_g.dtype)
    weight = rotated @ q_a
    if is_truncated(layer):
        weight = torch.cat([weight, complement(rotated, q_a, weight)], dim=-1)
    return weight, None if bias is None else bias.to(q_g.dtype) @ q_g


def from_eigenbasis(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    q_a, q_g = layer["activation_eigenvectors"], layer["gradient_eigenvectors"]
    rank = q_a.shape[1]
    rotated = weight[..., :rank] @ q_a.T
    if is_truncated(layer):
        rotated = rotated + weight[..., rank:]
    return q_g @ rotated, None if bias is None else bias @ q_g.T


def precondition(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(F̂ + λI)⁻¹` applied to batched weight (and bias) gradients of one layer."""
    return precondition_in_eigenbasis(layer, *to_eigenbasis(layer, weight, bias), damping)


def precondition_in_eigenbasis(
    layer: Layer, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`(F̂ + λI)⁻¹` for gradients already rotated into the eigenbasis, returned in the parameter basis.

    Keeping query gradients in the eigenbasis makes a change of damping cost one division."""
    if damping < 0:
        raise ValueError(f"damping must be non-negative, got {damping}.")
    weight_eigenvalues, bias_eigenvalues = eigenvalues(layer)
    rank = weight_eigenvalues.shape[-1]
    if is_truncated(layer):
        residual = residual_eigenvalues(layer)[:, None]
        weight = torch.cat(
            [weight[..., :rank] / (weight_eigenvalues + damping), weight[..., rank:] / (residual + damping)], -1
        )
    else:
        weight = weight / (weight_eigenvalues + damping)
    if bias is not None:
        bias = bias / (bias_eigenvalues + damping)
    return from_eigenbasis(layer, weight, bias)
