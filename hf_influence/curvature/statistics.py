"""K-FAC and EK-FAC statistics: the sums over draws that fitting accumulates (`method.md` §3.2–3.4).

Per layer and with `S` draws, K-FAC approximates the GGN weight block by `G ⊗ A`:

* expand: `A = 1/S Σ_s 1/R Σ_r a a ᵀ`, `G = 1/S Σ_s Σ_r g gᵀ` (positions act like extra data);
* reduce: `A = 1/S Σ_s ā ā ᵀ` with `ā = 1/R Σ_r a`, `G = 1/S Σ_s ĝ ĝᵀ` with `ĝ = Σ_r g`.

The bias is a block of its own, approximated by `G`. EK-FAC keeps the eigenvectors of `A` and `G`
and replaces the eigenvalues by the second moments of per-draw gradients in that eigenbasis,
`Λ_ij = 1/S Σ_s (Q_Gᵀ ∇W_s Q_A)_ij²`, estimated on independent draws.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from .large_layers import complement
from .layer_factors import LayerFactors
from .layers import LayerKind, layer_kind

APPROXIMATIONS = ("expand", "reduce")
SumOverRanks = Callable[[torch.Tensor], torch.Tensor]  # a tensor summed over every process of a job
# Per-draw rotated gradients are formed in chunks of at most this many elements.
_CHUNK_ELEMENTS = 1 << 25


def without_autocast(hook: Callable) -> Callable:
    """Run a statistics hook outside `torch.autocast`: the hooks fire inside the model's forward and
    backward, where an autocast matmul would round every covariance product to bf16/fp16."""

    @functools.wraps(hook)
    def wrapper(self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, *rest) -> None:
        with torch.autocast(inputs.device.type, enabled=False):
            hook(self, name, module, kind, inputs, *rest)

    return wrapper


class CovarianceAccumulator:
    """Sums `A` (at the forward pass) and `G` (at the backward pass) over draws for every layer."""

    def __init__(self, layers: dict[str, nn.Module], approx: str, dtype: torch.dtype) -> None:
        if approx not in APPROXIMATIONS:
            raise ValueError(f"approx must be one of {APPROXIMATIONS}, got {approx!r}.")
        self.approx = approx
        self.dtype = dtype
        shapes = _shapes(layers)
        self.activation = {name: _zeros(layers[name], (d_in, d_in), dtype) for name, (_, d_in) in shapes.items()}
        self.gradient = {name: _zeros(layers[name], (d_out, d_out), dtype) for name, (d_out, _) in shapes.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums, for checkpoints."""
        return _prefixed(activation=self.activation, gradient=self.gradient)

    def pop_normalised(self, name: str, total_draws: int, total: SumOverRanks) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer's `(A, G)` per draw — the sums of every process (`total`) over the draws of all of them —
        releasing the layer's running sums."""
        return total(self.activation.pop(name)) / total_draws, total(self.gradient.pop(name)) / total_draws

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _load_prefixed(state, activation=self.activation, gradient=self.gradient)

    @without_autocast
    def on_forward(self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor) -> None:
        a = kind.activations(module, inputs).to(self.dtype)
        if self.approx == "expand":
            rows = a.reshape(-1, a.shape[-1])
            self.activation[name] += (rows.T @ rows).div_(a.shape[1])
        else:
            rows = a.mean(dim=1)
            self.activation[name] += rows.T @ rows

    @without_autocast
    def on_backward(
        self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        g = kind.output_gradients(module, grad).to(self.dtype)
        rows = g.reshape(-1, g.shape[-1]) if self.approx == "expand" else g.sum(dim=1)
        self.gradient[name] += rows.T @ rows


class EigenvalueCorrectionAccumulator:
    """Sums the squared per-draw gradients in the K-FAC eigenbasis: EK-FAC's corrected eigenvalues."""

    def __init__(self, layers: dict[str, nn.Module], factors: dict[str, LayerFactors], dtype: torch.dtype) -> None:
        self.activation_eigenvectors = {name: factors[name].activation_eigenvectors for name in layers}
        self.gradient_eigenvectors = {name: factors[name].gradient_eigenvectors for name in layers}
        self.dtype = dtype
        shapes = _shapes(layers)
        # A truncated activation basis (large_layers.py) keeps k < d_in eigenvectors: k corrected columns,
        # plus one sum per gradient direction for the energy in the complement.
        ranks = {name: factors[name].rank for name in layers}
        self.weight = {name: _zeros(layers[name], (d_out, ranks[name]), dtype) for name, (d_out, _) in shapes.items()}
        self.bias = {
            name: _zeros(layers[name], (d_out,), dtype)
            for name, (d_out, _) in shapes.items()
            if layers[name].bias is not None
        }
        self.residual = {
            name: _zeros(layers[name], (d_out,), dtype) for name, (d_out, d_in) in shapes.items() if ranks[name] < d_in
        }

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The running sums, for checkpoints."""
        return _prefixed(weight=self.weight, bias=self.bias, residual=self.residual)

    def normalised(
        self, name: str, total_draws: int, total: SumOverRanks
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """One layer's corrected eigenvalues per draw (weight block, bias block, truncated complement)."""

        def mean(store: dict[str, torch.Tensor]) -> torch.Tensor | None:
            return total(store[name]) / total_draws if name in store else None

        return mean(self.weight), mean(self.bias), mean(self.residual)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        _load_prefixed(state, weight=self.weight, bias=self.bias, residual=self.residual)

    @without_autocast
    def on_backward(
        self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        q_a = self.activation_eigenvectors[name].to(grad.device, self.dtype)
        q_g = self.gradient_eigenvectors[name].to(grad.device, self.dtype)
        g = kind.output_gradients(module, grad).to(self.dtype)  # (S, R, d_out)
        positions, (d_out, d_in) = g.shape[1], kind.weight_shape(module)
        bias_gradients = g.sum(dim=1)  # (S, d_out)
        truncated = name in self.residual
        # Either rotate a and g and sum their products over positions, or form each draw's ∇W_s
        # (the layer's own weight-gradient kernel) and rotate it: whichever needs fewer multiplications.
        # A truncated basis needs ∇W_s itself, for the energy outside the kept directions.
        # (A grouped convolution's patches are not paired position by position with g: it takes ∇W_s.)
        rotate_first = (
            not truncated
            and getattr(module, "groups", 1) == 1
            and positions * (d_in * d_in + d_out * d_out) < d_out * d_in * (d_in + d_out)
        )
        if rotate_first:
            a, rotated_g = kind.activations(module, inputs).to(self.dtype) @ q_a, g @ q_g
        else:
            inputs, grad = inputs.to(self.dtype), grad.to(self.dtype)
        chunk = max(1, _CHUNK_ELEMENTS // (d_out * d_in))
        squares, residual = 0, 0
        for start in range(0, len(g), chunk):
            rows = slice(start, min(start + chunk, len(g)))
            if rotate_first:
                per_draw = rotated_g[rows].transpose(1, 2) @ a[rows]
            else:
                rotated = q_g.T @ kind.summed_gradients(module, inputs[rows], grad[rows], rows.stop - start)
                per_draw = rotated @ q_a
                if truncated:
                    residual = residual + complement(rotated, q_a, per_draw).pow(2).sum(dim=(0, 2))
            squares = squares + per_draw.pow(2).sum(dim=0)
        self.weight[name] += squares
        if truncated:
            self.residual[name] += residual / (d_in - q_a.shape[1])
        if module.bias is not None:
            self.bias[name] += (bias_gradients @ q_g).pow(2).sum(dim=0)


def _shapes(layers: dict[str, nn.Module]) -> dict[str, tuple[int, int]]:
    return {name: layer_kind(module).weight_shape(module) for name, module in layers.items()}


def _zeros(module: nn.Module, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=module.weight.device)


def _prefixed(**stores: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{kind}/{name}": value for kind, store in stores.items() for name, value in store.items()}


def _load_prefixed(state: dict[str, torch.Tensor], **stores: dict[str, torch.Tensor]) -> None:
    for kind, store in stores.items():
        for name in store:
            store[name].copy_(state[f"{kind}/{name}"])
