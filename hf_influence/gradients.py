"""Per-example gradients averaged over `K` draws, from layer hooks, many examples per backward pass.

An example's `K` draws are rows of one batch; a single backward pass of `Σ_rows value / K` gives every row's
output gradient `g`, and the example's weight gradient is `Σ_{rows, r} g aᵀ`, one batched matmul per layer
(`LayerKind.summed_gradients`). No per-example Python loop and no per-sample autograd. Query gradients (a
measurement of generated samples) and training gradients (the training loss) are the same computation under
different `DrawPlan`s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .curvature.capture import LayerCapture
from .curvature.layers import LayerKind
from .engine import DrawPlan, run_draws
from .estimators import PLAIN, Estimator
from .examples import Examples
from .measurements import Measurement, get_measurement
from .task import DiffusionTask

# Per layer: weight gradients (B, d_out, d_in) and bias gradients (B, d_out) or None.
LayerGradients = dict[str, tuple[torch.Tensor, torch.Tensor | None]]
# Receives (layer name, examples of the current pass, their partial weight and bias gradients).
GradientConsumer = Callable[[str, slice, torch.Tensor, torch.Tensor | None], None]
# A linear map of one layer's gradients, applied as they arrive (a projection): (name, weight, bias) → the same.
LayerTransform = Callable[[str, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor | None]]

DEFAULT_DRAWS = 250  # K = K' = 250 draws per gradient, as the paper's CIFAR runs


def gradient_dtype(task: DiffusionTask) -> torch.dtype:
    """fp64 for an fp64 model, else fp32: gradients are never accumulated in half precision."""
    return torch.float64 if task.dtype == torch.float64 else torch.float32


def for_each_example_gradient(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    examples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: DrawPlan,
    consume: GradientConsumer,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Hand `consume` each layer's per-example gradients of `plan.measurement`, pass by pass.

    `examples` are `Examples` (from `task.examples`, or a training batch, with their conditioning) or, for an
    unconditional pipeline, a tensor of clean samples in the denoiser's space. When an example's draws do not
    fit in one pass, `consume` receives its gradient in parts that sum to the whole.
    """
    current = slice(0, 0)  # the examples of the pass being backpropagated

    def on_backward(name: str, module: nn.Module, kind: type[LayerKind], inputs: torch.Tensor, grad: torch.Tensor):
        count = current.stop - current.start
        weight = kind.summed_gradients(module, inputs.to(dtype), grad.to(dtype), count)
        bias = kind.output_gradients(module, grad).to(dtype).reshape(count, -1, weight.shape[1]).sum(dim=1)
        consume(name, current, weight, bias if module.bias is not None else None)

    with LayerCapture(layers, on_backward=on_backward) as capture:

        def backward(rows: slice, output: Any, draws: Any) -> None:
            nonlocal current
            current = rows
            capture.backward(plan.values(task, output, ids[rows]).sum() / plan.draws_per_example)

        run_draws(task, examples, ids, plan, backward)


def per_example_gradients(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    examples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: DrawPlan,
    dtype: torch.dtype | None = None,
    transform: LayerTransform | None = None,
) -> LayerGradients:
    """Each example's gradient under `plan`, for every layer in `layers`, accumulated in `dtype` (default
    `gradient_dtype`); `transform` (a linear map, e.g. a projection) is applied to each part as it arrives."""
    dtype = dtype or gradient_dtype(task)
    weights: dict[str, torch.Tensor] = {}
    biases: dict[str, torch.Tensor] = {}

    def accumulate(name: str, rows: slice, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        if transform is not None:
            weight, bias = transform(name, weight, bias)
        if name not in weights:
            weights[name] = weight.new_zeros(len(ids), *weight.shape[1:])
            if bias is not None:
                biases[name] = bias.new_zeros(len(ids), bias.shape[1])
        weights[name][rows] += weight
        if bias is not None:
            biases[name][rows] += bias

    for_each_example_gradient(task, layers, examples, ids, plan, accumulate, dtype)
    return {name: (weights[name], biases.get(name)) for name in layers}


def per_example_scores(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    examples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: DrawPlan,
    queries: LayerGradients,
) -> torch.Tensor:
    """`[Q, len(ids)]` inner products of `queries` with each example's gradient under `plan`, layer by
    layer as the gradients arrive: no example's full gradient is ever held in memory."""
    num_queries = len(next(iter(queries.values()))[0])
    scores = torch.zeros(num_queries, len(ids), dtype=gradient_dtype(task), device=task.device)

    def score(name: str, rows: slice, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        query_weight, query_bias = queries[name]
        part = query_weight.flatten(1) @ weight.flatten(1).to(query_weight.dtype).T
        if bias is not None:
            part += query_bias @ bias.to(query_bias.dtype).T
        scores[:, rows] += part

    for_each_example_gradient(task, layers, examples, ids, plan, score, scores.dtype)
    return scores


def query_gradients(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    queries: Any,
    measurement: str | Measurement = "loss",
    draws_per_query: int = DEFAULT_DRAWS,
    seed: int = 0,
    batch_size: int = 64,
    labels: Sequence[Any] | None = None,
    prompts: Sequence[str] | None = None,
    estimator: Estimator = PLAIN,
) -> LayerGradients:
    """Gradients of the measurement of each query (no augmentation; query `i` has id `i`). `queries` are images
    (conditioned on their class `labels` or `prompts` as they were generated) or `Examples` already encoded;
    `estimator` chooses the draws (the training side's, for common random numbers)."""
    measurement = get_measurement(measurement)
    examples = queries if isinstance(queries, Examples) else task.examples(queries, labels=labels, prompts=prompts)
    plan = DrawPlan.query(measurement, draws_per_query, seed, batch_size, estimator)
    return per_example_gradients(task, layers, examples, list(range(len(examples))), plan)
