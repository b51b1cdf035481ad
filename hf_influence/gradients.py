"""Per-example gradients averaged over `K` draws, from layer hooks, many examples per backward pass.

An example's `K` draws are rows of one batch; a single backward pass of `Σ_rows value / K` gives
every row's output gradient `g`, and the example's weight gradient is `Σ_{rows, r} g aᵀ`, one
batched matmul per layer. No per-example Python loop and no per-sample autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .curvature.capture import LayerCapture
from .curvature.layers import LayerKind, layer_kind
from .data import draw_chunks
from .task import DenoiserOutput, DiffusionTask

Objective = Callable[[DiffusionTask, DenoiserOutput], torch.Tensor]
# Per layer: weight gradients (B, d_out, d_in) and bias gradients (B, d_out) or None.
LayerGradients = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


# Per layer: (P_out (d_out, k_out), P_in (d_in, k_in)) for Kronecker-structured projections.
Projections = dict[str, tuple[torch.Tensor, torch.Tensor]]


class _Collector:
    """Accumulates per-example gradients of the examples in the current forward pass.

    With `projections`, a layer's gradient is projected as `P_outᵀ ∇W P_in` straight from the
    hooked `a` and `g`, never forming the full `d_out × d_in` gradient.
    """

    def __init__(
        self,
        layers: dict[str, nn.Module],
        num_examples: int,
        dtype: torch.dtype,
        device: torch.device,
        projections: Projections,
    ):
        self.projections = {
            name: (out.to(device, dtype), inp.to(device, dtype)) for name, (out, inp) in projections.items()
        }
        shapes = {name: layer_kind(module).weight_shape(module) for name, module in layers.items()}
        shapes |= {name: (out.shape[1], inp.shape[1]) for name, (out, inp) in self.projections.items()}
        self.weights = {
            name: torch.zeros(num_examples, *shape, dtype=dtype, device=device) for name, shape in shapes.items()
        }
        self.biases = {
            name: torch.zeros(num_examples, shapes[name][0], dtype=dtype, device=device)
            for name, module in layers.items()
            if module.bias is not None
        }
        self.examples = slice(0, 0)

    def on_backward(
        self, name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor
    ) -> None:
        count = self.examples.stop - self.examples.start
        dtype = self.weights[name].dtype
        a = kind.activations(module, inputs).to(dtype)
        g = kind.output_gradients(module, grad).to(dtype)
        if name in self.projections:
            project_out, project_in = self.projections[name]
            a, g = a @ project_in, g @ project_out
        a = a.reshape(count, -1, a.shape[-1])  # (examples, draws × positions, d_in)
        g = g.reshape(count, -1, g.shape[-1])
        self.weights[name][self.examples] += g.transpose(1, 2) @ a
        if name in self.biases:
            self.biases[name][self.examples] += g.sum(dim=1)


def per_example_gradients(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    samples: torch.Tensor,
    ids: Sequence[Any],
    objective: Objective,
    num_draws: int,
    seed: int,
    stream: str,
    batch_size: int,
    augment: bool = False,
    timestep: int | None = None,
    dtype: torch.dtype | None = None,
    projections: Projections | None = None,
) -> LayerGradients:
    """Gradients of `1/K Σ_k objective(draw_k)` for each example, for every layer in `layers`
    (projected as `P_outᵀ ∇W P_in`, bias as `P_outᵀ ∇b`, for the layers in `projections`).

    Draws are seeded by (seed, stream, example id), so the result does not depend on batch_size.
    Gradients are accumulated in `dtype` (default: fp64 for an fp64 model, else fp32).
    """
    if dtype is None:
        dtype = torch.float64 if task.dtype == torch.float64 else torch.float32
    collector = _Collector(layers, len(ids), dtype, task.device, projections or {})
    with torch.enable_grad(), LayerCapture(layers, on_backward=collector.on_backward) as capture:
        for examples, draw_rows in draw_chunks(len(ids), num_draws, batch_size):
            collector.examples = examples
            output, _ = task.run(
                samples[examples], ids[examples], num_draws, draw_rows, seed, stream, augment, timestep
            )
            values = objective(task, output)
            if not torch.isfinite(values).all():
                raise FloatingPointError(f"The objective is NaN or infinite for examples {list(ids[examples])}.")
            capture.backward(values.sum() / num_draws)
    return {name: (collector.weights[name], collector.biases.get(name)) for name in layers}


def flatten(gradients: LayerGradients) -> torch.Tensor:
    """Concatenate every layer's weight and bias gradients into `(B, num_parameters)`."""
    parts = []
    for weight, bias in gradients.values():
        parts.append(weight.flatten(1))
        if bias is not None:
            parts.append(bias)
    return torch.cat(parts, dim=1)
