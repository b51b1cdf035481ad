"""Per-example gradients averaged over `K` draws, from layer hooks, many examples per backward pass.

An example's `K` draws are rows of one batch; a single backward pass of `Σ_rows value / K` gives
every row's output gradient `g`, and the example's weight gradient is `Σ_{rows, r} g aᵀ`, one
batched matmul per layer. No per-example Python loop and no per-sample autograd.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .curvature.capture import LayerCapture
from .curvature.layers import LayerKind
from .data import draw_chunks
from .measurements import Loss, Measurement
from .task import DenoiserOutput, DiffusionTask, Examples

Objective = Callable[[DiffusionTask, DenoiserOutput], torch.Tensor]
# Per layer: weight gradients (B, d_out, d_in) and bias gradients (B, d_out) or None.
LayerGradients = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


# Per layer: (P_out (d_out, k_out), P_in (d_in, k_in)) for Kronecker-structured projections.
Projections = dict[str, tuple[torch.Tensor, torch.Tensor]]
# Receives (layer name, examples of the current pass, their partial weight and bias gradients).
GradientConsumer = Callable[[str, slice, torch.Tensor, torch.Tensor | None], None]


@dataclass(frozen=True)
class GradientPlan:
    """What an example's gradient averages: `1/K Σ_k objective(draw_k)` over `num_draws` draws, seeded by
    (seed, stream, example id) and run `batch_size` draws per pass, so nothing depends on batch_size.

    `augment` applies the task's training augmentation; `timestep` fixes t instead of drawing it."""

    objective: Objective
    num_draws: int
    seed: int
    stream: str
    batch_size: int
    augment: bool = False
    timestep: int | None = None

    @classmethod
    def training(cls, num_draws: int, seed: int, batch_size: int) -> GradientPlan:
        """The training loss with the training augmentation: the side stored in indices."""
        return cls(Loss(), num_draws, seed, "train", batch_size, augment=True)

    @classmethod
    def query(cls, measurement: Measurement, num_draws: int, seed: int, batch_size: int) -> GradientPlan:
        """A measurement of a generated sample, never augmented."""
        return cls(measurement, num_draws, seed, "query", batch_size, timestep=measurement.timestep)


def for_each_example_gradient(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    samples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: GradientPlan,
    consume: GradientConsumer,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Hand `consume` each layer's per-example gradients under `plan`, pass by pass.

    `samples` are `Examples` (from `task.examples`, or a training batch, with their conditioning) or, for an
    unconditional pipeline, a tensor of clean samples in the denoiser's space. When an example's draws do not
    fit in one pass, `consume` receives its gradient in parts that sum to the whole. The denoiser runs in eval
    mode (see `DiffusionTask.eval_mode`).
    """
    examples = slice(0, 0)

    def on_backward(name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor):
        count = examples.stop - examples.start
        weight = kind.summed_gradients(module, inputs.to(dtype), grad.to(dtype), count)
        bias = kind.output_gradients(module, grad).to(dtype).reshape(count, -1, weight.shape[1]).sum(dim=1)
        consume(name, examples, weight, bias if module.bias is not None else None)

    with task.eval_mode(), torch.enable_grad(), LayerCapture(layers, on_backward=on_backward) as capture:
        for examples, draw_rows in draw_chunks(len(ids), plan.num_draws, plan.batch_size):
            output, _ = task.run(
                samples[examples],
                ids[examples],
                plan.num_draws,
                draw_rows,
                plan.seed,
                plan.stream,
                plan.augment,
                plan.timestep,
            )
            values = plan.objective(task, output)
            if not torch.isfinite(values).all():
                raise FloatingPointError(f"The objective is NaN or infinite for examples {list(ids[examples])}.")
            capture.backward(values.sum() / plan.num_draws)


def per_example_gradients(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    samples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: GradientPlan,
    dtype: torch.dtype | None = None,
    projections: Projections | None = None,
) -> LayerGradients:
    """Each example's gradient under `plan`, for every layer in `layers` (projected as
    `P_outᵀ ∇W P_in`, bias as `P_outᵀ ∇b`, for the layers in `projections`).

    Gradients are accumulated in `dtype` (default: fp64 for an fp64 model, else fp32).
    """
    dtype = dtype or _gradient_dtype(task)
    projections = {
        name: (out.to(task.device, dtype), inp.to(task.device, dtype))
        for name, (out, inp) in (projections or {}).items()
    }
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}

    def accumulate(name: str, examples: slice, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if name in projections:
            project_out, project_in = projections[name]
            weight = project_out.T @ weight @ project_in
            bias = None if bias is None else bias @ project_out
        if name not in weights:
            weights[name] = weight.new_zeros(len(ids), *weight.shape[1:])
            if bias is not None:
                biases[name] = bias.new_zeros(len(ids), bias.shape[1])
        weights[name][examples] += weight
        if bias is not None:
            biases[name][examples] += bias

    for_each_example_gradient(task, layers, samples, ids, plan, accumulate, dtype)
    return {name: (weights[name], biases.get(name)) for name in layers}


def per_example_scores(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    samples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: GradientPlan,
    queries: LayerGradients,
) -> torch.Tensor:
    """`[Q, len(ids)]` inner products of `queries` with each example's gradient under `plan`, layer by
    layer as the gradients arrive: no example's full gradient is ever held in memory."""
    num_queries = len(next(iter(queries.values()))[0])
    scores = torch.zeros(num_queries, len(ids), dtype=_gradient_dtype(task), device=task.device)

    def score(name: str, examples: slice, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        query_weight, query_bias = queries[name]
        part = query_weight.flatten(1) @ weight.flatten(1).to(query_weight.dtype).T
        if bias is not None:
            part += query_bias @ bias.to(query_bias.dtype).T
        scores[:, examples] += part

    for_each_example_gradient(task, layers, samples, ids, plan, score, scores.dtype)
    return scores


def _gradient_dtype(task: DiffusionTask) -> torch.dtype:
    return torch.float64 if task.dtype == torch.float64 else torch.float32
