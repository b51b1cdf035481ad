"""The plain gradient dot product `⟨∇m(x_q), ∇L(x_j)⟩`: influence with the curvature replaced by the
identity (the large-damping limit `λ τ_λ → ⟨∇m, ∇L⟩`, `method.md` §12.5) — pairwise scoring with the
identity strategy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from ..attribution import pairwise_scores
from ..deprecation import renamed_argument
from ..estimators import DEFAULT_ESTIMATOR
from ..factors import InfluenceFactors
from ..gradients import DEFAULT_DRAWS
from ..measurements import Measurement
from ..task import DiffusionTask


def gradient_dot_scores(
    task: DiffusionTask,
    queries: Any,
    train_dataset: Iterable[dict[str, Any]],
    measurement: str | Measurement = "loss",
    draws_per_query: int = DEFAULT_DRAWS,
    draws_per_example: int = DEFAULT_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    id_column: str = "id",
    module_filter: str | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
    num_query_draws: int | None = None,
    num_train_draws: int | None = None,
) -> torch.Tensor:
    """`[Q, N]` dot products of each query's measurement gradient with each training example's loss
    gradient, over the Linear and Conv2d layers (those matching `module_filter`), with the same draws
    as `pairwise_scores` (the same `estimator`). Positive = the gradients agree: a step on the example
    lowers the query's measurement, so removing it is predicted to raise it. (`num_query_draws` / `num_train_draws`: the
    deprecated names of the draw counts.)"""
    draws_per_query = renamed_argument("num_query_draws", num_query_draws, "draws_per_query", draws_per_query)
    draws_per_example = renamed_argument("num_train_draws", num_train_draws, "draws_per_example", draws_per_example)
    return pairwise_scores(
        task,
        InfluenceFactors.identity(task, module_filter),
        queries,
        train_dataset,
        measurement,
        draws_per_query=draws_per_query,
        draws_per_example=draws_per_example,
        batch_size=batch_size,
        seed=seed,
        id_column=id_column,
        estimator=estimator,
    )
