"""Curvature strategies: what each one fits and stores, what it costs, how it is checked, how it preconditions.

A strategy is a registered object (`get_strategy("ekfac")`) over typed per-layer factors (`LayerFactors`):

* `identity` — no curvature, `P = I`: influence becomes the gradient dot product `⟨∇m, ∇L⟩` (nothing fitted).
* `kfac` — `F ≈ G ⊗ A` (`method.md` §3.2), eigenvalues `λ^G_i λ^A_j` in the Kronecker eigenbasis.
* `ekfac` — the K-FAC eigenbasis with eigenvalues re-estimated on independent draws (§3.4): a second pass.

K-FAC and EK-FAC also cover truncated large layers (`large_layers.py`): the activation basis keeps `k < d_in`
eigenvectors and the complement shares one eigenvalue per gradient direction.

The damped inverse is applied in the eigenbasis (`method.md` §3.5): for a weight gradient `V` (d_out × d_in)
and eigenvalues `Λ`, `P V = Q_G [(Q_Gᵀ V Q_A) ⊘ (Λ + λ)] Q_Aᵀ`; the bias block uses `Q_G [(Q_Gᵀ v) ⊘ (λ^b + λ)]`.
Damping is absolute: added to every eigenvalue. A truncated layer is represented in the eigenbasis by
`[Q_Gᵀ V Q_k | Q_Gᵀ V (I − Q_k Q_kᵀ)]` (d_out × (k + d_in)): the kept directions, then the complement in the
parameter basis, divided by its one eigenvalue per gradient direction.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import ClassVar

import torch

from .eigen import Eigenpairs
from .large_layers import complement
from .layer_factors import LayerFactors

Gradients = tuple[torch.Tensor, torch.Tensor | None]  # batched weight (Q, d_out, d_in) and bias (Q, d_out) gradients


STORED_KINDS = ("activation_covariance", "gradient_covariance", "activation_eigenvectors", "gradient_eigenvectors")


class CurvatureStrategy:
    """The interface every strategy implements, and what they share (checks, the order of preconditioning)."""

    name: ClassVar[str]
    fits_covariances: ClassVar[bool] = True  # whether fitting runs the covariance pass
    corrects_eigenvalues: ClassVar[bool] = False  # whether fitting runs the eigenvalue-correction pass

    # ------------------------------------------------------------------ fitting

    def layer_factors(
        self,
        activation: torch.Tensor,
        gradient: torch.Tensor,
        activation_pairs: Eigenpairs,
        gradient_pairs: Eigenpairs,
        has_bias: bool,
    ) -> LayerFactors:
        """A layer's factors from its normalised covariances and their eigendecompositions."""
        raise NotImplementedError

    def corrected(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> LayerFactors:
        """A layer's factors with the corrected eigenvalues (normalised second moments in the eigenbasis)."""
        raise NotImplementedError(f"The {self.name} strategy does not correct eigenvalues.")

    # ------------------------------------------------------------------ storage

    def required_kinds(self, truncated: bool) -> tuple[str, ...]:
        """The tensor kinds scoring needs for every layer (what a loaded factors file must hold; a layer with a
        bias also needs `bias_eigenvalues`)."""
        raise NotImplementedError

    def layer_bytes(
        self, d_out: int, d_in: int, rank: int, has_bias: bool, value_size: int, vector_size: int, covariances: bool
    ) -> dict[str, int]:
        """Stored bytes by kind (`STORED_KINDS` and "eigenvalues"): values in `value_size` bytes each,
        eigenvectors in `vector_size`; covariances only when kept."""
        raise NotImplementedError

    def correction_bytes(self, d_out: int, rank: int, value_size: int) -> int:
        """Bytes of a layer's eigenvalue-correction sums during a fit (none unless the strategy corrects)."""
        return 0

    def check(self, name: str, layer: LayerFactors, shape: tuple[int, int], rank: int) -> None:
        """Refuse a layer's loaded factors that are incomplete, of the wrong shape or not finite (whether the
        layer has a bias is the model's business: a bias block is checked where there is one)."""
        d_out, d_in = shape
        missing = [kind for kind in self.required_kinds(rank < d_in) if getattr(layer, kind) is None]
        if missing:
            raise ValueError(f"The factors file lacks {missing} for layer {name!r}: it is incomplete.")
        expected = {
            "gradient_eigenvectors": (d_out, d_out),
            "activation_eigenvectors": (d_in, rank),
            "bias_eigenvalues": (d_out,),
        }
        for kind, wanted in expected.items():
            value = getattr(layer, kind)
            if value is not None and tuple(value.shape) != wanted:
                raise ValueError(
                    f"The {kind} of layer {name!r} have shape {tuple(value.shape)}, its config records {wanted}."
                )
        if not all(torch.isfinite(value).all() for value in layer.tensors().values()):
            raise ValueError(f"The factors of layer {name!r} contain NaN or infinite values: the file is corrupt.")

    # ------------------------------------------------------------------ preconditioning

    def to_eigenbasis(self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None) -> Gradients:
        """Rotate batched gradients into the eigenbasis (queries are cached there: a new damping is cheap)."""
        raise NotImplementedError

    def precondition_in_eigenbasis(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
    ) -> Gradients:
        """`(F̂ + λI)⁻¹` of gradients already in the eigenbasis, returned in the parameter basis."""
        raise NotImplementedError

    def precondition(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
    ) -> Gradients:
        """`(F̂ + λI)⁻¹` applied to batched weight (and bias) gradients of one layer."""
        return self.precondition_in_eigenbasis(layer, *self.to_eigenbasis(layer, weight, bias), damping)


class Identity(CurvatureStrategy):
    """No curvature: `P = I`, so scores are gradient dot products (damping does not apply). Nothing is fitted."""

    name = "identity"
    fits_covariances = False

    def layer_factors(
        self,
        activation: torch.Tensor,
        gradient: torch.Tensor,
        activation_pairs: Eigenpairs,
        gradient_pairs: Eigenpairs,
        has_bias: bool,
    ) -> LayerFactors:
        return LayerFactors()

    def required_kinds(self, truncated: bool) -> tuple[str, ...]:
        return ()

    def layer_bytes(
        self, d_out: int, d_in: int, rank: int, has_bias: bool, value_size: int, vector_size: int, covariances: bool
    ) -> dict[str, int]:
        return dict.fromkeys((*STORED_KINDS, "eigenvalues"), 0)

    def to_eigenbasis(self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None) -> Gradients:
        return weight, bias

    def precondition_in_eigenbasis(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
    ) -> Gradients:
        return weight, bias


class KFAC(CurvatureStrategy):
    """K-FAC: the eigenvalues of `G ⊗ A` are the products `λ^G_i λ^A_j`."""

    name = "kfac"

    def layer_factors(
        self,
        activation: torch.Tensor,
        gradient: torch.Tensor,
        activation_pairs: Eigenpairs,
        gradient_pairs: Eigenpairs,
        has_bias: bool,
    ) -> LayerFactors:
        return LayerFactors(
            activation_covariance=activation,
            gradient_covariance=gradient,
            activation_eigenvectors=activation_pairs.vectors,
            gradient_eigenvectors=gradient_pairs.vectors,
            **self._fitted_eigenvalues(activation_pairs, gradient_pairs, has_bias),
        )

    def _fitted_eigenvalues(self, activation_pairs: Eigenpairs, gradient_pairs: Eigenpairs, has_bias: bool) -> dict:
        """The eigenvalues the covariance pass gives: each factor's, the bias block's and a truncated complement's."""
        values = {"activation_eigenvalues": activation_pairs.values, "gradient_eigenvalues": gradient_pairs.values}
        if activation_pairs.residual is not None:
            values["activation_residual_eigenvalue"] = activation_pairs.residual
        if has_bias:
            values["bias_eigenvalues"] = gradient_pairs.values.clone()  # own memory, for safetensors
        return values

    def required_kinds(self, truncated: bool) -> tuple[str, ...]:
        kinds = ("activation_eigenvectors", "gradient_eigenvectors", "activation_eigenvalues", "gradient_eigenvalues")
        return kinds + ("activation_residual_eigenvalue",) * truncated

    def _eigenvalue_count(self, d_out: int, rank: int, has_bias: bool, truncated: bool) -> int:
        return rank + d_out * (1 + has_bias) + truncated

    def layer_bytes(
        self, d_out: int, d_in: int, rank: int, has_bias: bool, value_size: int, vector_size: int, covariances: bool
    ) -> dict[str, int]:
        return {
            "activation_covariance": d_in * d_in * value_size * covariances,
            "gradient_covariance": d_out * d_out * value_size * covariances,
            "activation_eigenvectors": d_in * rank * vector_size,
            "gradient_eigenvectors": d_out * d_out * vector_size,
            "eigenvalues": self._eigenvalue_count(d_out, rank, has_bias, rank < d_in) * value_size,
        }

    def weight_eigenvalues(self, layer: LayerFactors) -> torch.Tensor:
        """The weight block's eigenvalues, d_out × k."""
        return torch.outer(layer.gradient_eigenvalues, layer.activation_eigenvalues)

    def residual_eigenvalues(self, layer: LayerFactors) -> torch.Tensor:
        """A truncated layer's eigenvalue (d_out,) shared by the activation complement, per gradient direction."""
        return layer.gradient_eigenvalues * layer.activation_residual_eigenvalue

    def to_eigenbasis(self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None) -> Gradients:
        q_a, q_g = layer.activation_eigenvectors, layer.gradient_eigenvectors
        rotated = q_g.T @ weight.to(q_g.dtype)
        kept = rotated @ q_a
        if layer.truncated:
            kept = torch.cat([kept, complement(rotated, q_a, kept)], dim=-1)
        return kept, None if bias is None else bias.to(q_g.dtype) @ q_g

    def precondition_in_eigenbasis(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, damping: float
    ) -> Gradients:
        if not math.isfinite(damping) or damping < 0:
            raise ValueError(f"damping must be a finite number ≥ 0, got {damping}.")
        eigenvalues = self.weight_eigenvalues(layer)
        rank = eigenvalues.shape[-1]
        if layer.truncated:
            residual = self.residual_eigenvalues(layer)[:, None]
            weight = torch.cat(
                [weight[..., :rank] / (eigenvalues + damping), weight[..., rank:] / (residual + damping)], dim=-1
            )
        else:
            weight = weight / (eigenvalues + damping)
        if bias is not None:
            if layer.bias_eigenvalues is None:
                raise ValueError("The layer has a bias but its factors have no bias block: factors of another model?")
            bias = bias / (layer.bias_eigenvalues + damping)
        return self._from_eigenbasis(layer, weight, bias)

    @staticmethod
    def _from_eigenbasis(layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None) -> Gradients:
        q_a, q_g = layer.activation_eigenvectors, layer.gradient_eigenvectors
        rotated = weight[..., : q_a.shape[1]] @ q_a.T
        if layer.truncated:
            rotated = rotated + weight[..., q_a.shape[1] :]
        return q_g @ rotated, None if bias is None else bias @ q_g.T


class EKFAC(KFAC):
    """EK-FAC: the K-FAC eigenbasis with corrected eigenvalues `Λ_ij = E[(Q_Gᵀ ∇W Q_A)_ij²]` (one per parameter)."""

    name = "ekfac"
    corrects_eigenvalues = True

    def _fitted_eigenvalues(self, activation_pairs: Eigenpairs, gradient_pairs: Eigenpairs, has_bias: bool) -> dict:
        """None: EK-FAC's eigenvalues come from the correction pass (`corrected`)."""
        return {}

    def corrected(
        self, layer: LayerFactors, weight: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None
    ) -> LayerFactors:
        return replace(layer, eigenvalues=weight, bias_eigenvalues=bias, residual_eigenvalues=residual)

    def required_kinds(self, truncated: bool) -> tuple[str, ...]:
        kinds = ("activation_eigenvectors", "gradient_eigenvectors", "eigenvalues")
        return kinds + ("residual_eigenvalues",) * truncated

    def _eigenvalue_count(self, d_out: int, rank: int, has_bias: bool, truncated: bool) -> int:
        return d_out * rank + d_out * (has_bias + truncated)

    def correction_bytes(self, d_out: int, rank: int, value_size: int) -> int:
        """The kept columns, and the bias and complement sums (one value per gradient direction each)."""
        return (d_out * rank + 2 * d_out) * value_size

    def weight_eigenvalues(self, layer: LayerFactors) -> torch.Tensor:
        return layer.eigenvalues

    def residual_eigenvalues(self, layer: LayerFactors) -> torch.Tensor:
        return layer.residual_eigenvalues


STRATEGIES: dict[str, CurvatureStrategy] = {strategy.name: strategy for strategy in (Identity(), KFAC(), EKFAC())}


def get_strategy(name: str) -> CurvatureStrategy:
    """The registered strategy called `name` ("identity", "kfac" or "ekfac")."""
    if name not in STRATEGIES:
        raise ValueError(f"Unknown curvature strategy {name!r}; choose one of {sorted(STRATEGIES)}.")
    return STRATEGIES[name]
