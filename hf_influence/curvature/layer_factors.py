"""`LayerFactors`: one layer's fitted curvature, typed.

Which fields are set depends on the strategy (`strategies.py`) and on whether the layer's activation basis is
truncated (`large_layers.py`). Saved, each field is the tensor `"{module}.{field}"` of the factors file
(`design.md`'s kinds), so `from_tensors` / `tensors` are the whole on-disk mapping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace

import torch

HALF_PRECISION = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LayerFactors:
    """The curvature of one layer's weight block `G ⊗ A` (and its bias block `G`).

    Attributes:
        activation_covariance: A (d_in × d_in), kept for inspection; scoring does not need it.
        gradient_covariance: G (d_out × d_out), likewise.
        activation_eigenvectors: Q_A (d_in × k); k < d_in for a truncated large layer.
        gradient_eigenvectors: Q_G (d_out × d_out).
        activation_eigenvalues: K-FAC's λ^A (k).
        gradient_eigenvalues: K-FAC's λ^G (d_out).
        eigenvalues: EK-FAC's corrected eigenvalues of the weight block (d_out × k).
        bias_eigenvalues: the bias block's eigenvalues in the basis Q_G (d_out).
        residual_eigenvalues: EK-FAC, truncated layer: the one corrected eigenvalue of the activation complement
            per gradient direction (d_out).
        activation_residual_eigenvalue: K-FAC, truncated layer: the mean discarded eigenvalue σ of A (1).
    """

    activation_covariance: torch.Tensor | None = None
    gradient_covariance: torch.Tensor | None = None
    activation_eigenvectors: torch.Tensor | None = None
    gradient_eigenvectors: torch.Tensor | None = None
    activation_eigenvalues: torch.Tensor | None = None
    gradient_eigenvalues: torch.Tensor | None = None
    eigenvalues: torch.Tensor | None = None
    bias_eigenvalues: torch.Tensor | None = None
    residual_eigenvalues: torch.Tensor | None = None
    activation_residual_eigenvalue: torch.Tensor | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> LayerFactors:
        """From tensors keyed by kind; an unknown kind is refused by name."""
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ValueError(f"Unknown factor kinds {unknown}; known kinds are {sorted(known)}.")
        return cls(**tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that are set, keyed by kind."""
        return {item.name: getattr(self, item.name) for item in fields(self) if getattr(self, item.name) is not None}

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> LayerFactors:
        """The same factors with `function` applied to every tensor."""
        return replace(self, **{kind: function(value) for kind, value in self.tensors().items()})

    def to(self, device: torch.device | str) -> LayerFactors:
        return self.map(lambda value: value.to(device))

    def for_maths(self) -> LayerFactors:
        """Half-precision storage (bf16/fp16 eigenvectors) upcast to fp32: the maths always runs in fp32 or fp64."""
        return self.map(lambda value: value.float() if value.dtype in HALF_PRECISION else value)

    @property
    def rank(self) -> int:
        """The number of activation eigenvectors kept."""
        return self.activation_eigenvectors.shape[1]

    @property
    def truncated(self) -> bool:
        """Whether the activation basis keeps fewer eigenvectors than `d_in` (a large layer)."""
        vectors = self.activation_eigenvectors
        return vectors is not None and vectors.shape[1] < vectors.shape[0]


def flatten_layers(layers: Mapping[str, LayerFactors]) -> dict[str, torch.Tensor]:
    """Every layer's tensors by their saved name `"{module}.{kind}"`."""
    return {f"{name}.{kind}": value for name, layer in layers.items() for kind, value in layer.tensors().items()}


def unflatten_layers(tensors: Mapping[str, torch.Tensor], modules: Iterable[str]) -> dict[str, LayerFactors]:
    """The inverse of `flatten_layers` for the layers `modules` (kinds have no dots; module names do)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    for name, value in tensors.items():
        module, kind = name.rsplit(".", 1)
        if module in grouped:
            grouped[module][kind] = value
    return {name: LayerFactors.from_tensors(kinds) for name, kinds in grouped.items()}
