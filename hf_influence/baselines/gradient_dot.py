"""The plain gradient dot product `⟨∇m(x_q), ∇L(x_j)⟩`: influence with the curvature replaced by the
identity (the large-damping limit `λ τ_λ → ⟨∇m, ∇L⟩`, `method.md` §12.5)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from tqdm.auto import tqdm

from ..attribution import DEFAULT_NUM_DRAWS, query_gradients
from ..curvature.layers import find_layers
from ..data import dataset_length, iter_example_batches
from ..gradients import GradientPlan, per_example_scores
from ..measurements import Measurement
from ..task import DiffusionTask


def gradient_dot_scores(
    task: DiffusionTask,
    queries: Any,
    train_dataset: Iterable[dict[str, Any]],
    measurement: str | Measurement = "loss",
    num_query_draws: int = DEFAULT_NUM_DRAWS,
    num_train_draws: int = DEFAULT_NUM_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    id_column: str = "id",
    module_filter: str | None = None,
) -> torch.Tensor:
    """`[Q, N]` dot products of each query's measurement gradient with each training example's loss
    gradient, over the Linear and Conv2d layers (those matching `module_filter`), with the same draws
    as `pairwise_scores`. Positive = the gradients agree: a step on the example lowers the query's
    measurement, so removing it is predicted to raise it."""
    layers = find_layers(task.denoiser, module_filter)
    grads = query_gradients(task, layers, queries, measurement, num_query_draws, seed, batch_size)
    examples_per_batch = max(1, batch_size // num_train_draws)
    plan = GradientPlan.training(num_train_draws, seed, batch_size)
    length = dataset_length(train_dataset)
    total = math.ceil(length / examples_per_batch) if length else None
    batches = iter_example_batches(train_dataset, task, examples_per_batch, id_column)
    columns = [
        per_example_scores(task, layers, batch.samples, batch.ids, plan, grads)
        for batch in tqdm(batches, total=total, desc="Gradient dot products", unit="batch")
    ]
    return torch.cat(columns, dim=1).cpu()
