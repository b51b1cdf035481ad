"""Influence scores: `τ(q, j) = ⟨(F̂ + λI)⁻¹ ∇m(x_q), ∇L(x_j)⟩` (`method.md` §5).

Positive `τ` means that removing training example `j` is predicted to increase the query's
measurement. Scores carry no 1/N. The query side is preconditioned once; the training side is
streamed, so no training gradient is ever stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature.inverse import precondition
from .data import dataset_length, iter_example_batches
from .factors import InfluenceFactors
from .gradients import LayerGradients, per_example_gradients
from .measurements import Loss, Measurement, get_measurement
from .task import DiffusionTask

DEFAULT_DAMPING = 1e-8
DEFAULT_NUM_DRAWS = 250  # K = K' = 250, as the paper's CIFAR runs


def factor_layers(task: DiffusionTask, factors: InfluenceFactors) -> dict[str, nn.Module]:
    modules = dict(task.denoiser.named_modules())
    return {name: modules[name] for name in factors.modules}


def query_gradients(
    task: DiffusionTask,
    layers: dict[str, nn.Module],
    queries: Any,
    measurement: str | Measurement = "loss",
    num_draws: int = DEFAULT_NUM_DRAWS,
    seed: int = 0,
    batch_size: int = 64,
) -> LayerGradients:
    """Gradients of the measurement of each query (no augmentation; query `i` has id `i`)."""
    measurement = get_measurement(measurement)
    samples = task.preprocess(queries)
    return per_example_gradients(
        task,
        layers,
        samples,
        list(range(len(samples))),
        measurement,
        num_draws,
        seed,
        "query",
        batch_size,
        augment=False,
        timestep=measurement.timestep,
    )


def precondition_gradients(factors: InfluenceFactors, gradients: LayerGradients, damping: float) -> LayerGradients:
    """Apply `(F̂ + λI)⁻¹` layer by layer."""
    return {
        name: precondition(factors.layer(name), weight, bias, damping) for name, (weight, bias) in gradients.items()
    }


def dot_scores(left: LayerGradients, right: LayerGradients) -> torch.Tensor:
    """`[len(left), len(right)]` inner products of two sets of layer gradients."""
    scores = None
    for name, (left_weight, left_bias) in left.items():
        right_weight, right_bias = right[name]
        part = left_weight.flatten(1) @ right_weight.flatten(1).to(left_weight.dtype).T
        if left_bias is not None:
            part = part + left_bias @ right_bias.to(left_bias.dtype).T
        scores = part if scores is None else scores + part
    return scores


def pairwise_scores(
    task: DiffusionTask,
    factors: InfluenceFactors,
    queries: Any,
    train_dataset: Iterable[dict[str, Any]],
    measurement: str | Measurement = "loss",
    damping: float = DEFAULT_DAMPING,
    num_query_draws: int = DEFAULT_NUM_DRAWS,
    num_train_draws: int = DEFAULT_NUM_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    id_column: str = "id",
    force: bool = False,
) -> torch.Tensor:
    """Influence scores `[num_queries, num_train]` of every training example on every query.

    `queries` are generated samples (PIL images, arrays or `(B, C, H, W)` tensors in [-1, 1]).
    Training gradients average `num_train_draws` draws of the training loss per example (with the
    task's augmentation); query gradients average `num_query_draws` draws of `measurement`.
    Columns follow the order of `train_dataset`.
    """
    factors.check_compatible(task, force=force)
    layers = factor_layers(task, factors)
    was_training = task.denoiser.training
    task.denoiser.eval()
    try:
        grads = query_gradients(task, layers, queries, measurement, num_query_draws, seed, batch_size)
        preconditioned = precondition_gradients(factors.to(task.device), grads, damping)
        examples_per_batch = max(1, batch_size // num_train_draws)
        length = dataset_length(train_dataset)
        columns = []
        batches = iter_example_batches(train_dataset, task, examples_per_batch, id_column)
        total = math.ceil(length / examples_per_batch) if length else None
        for batch in tqdm(batches, total=total, desc="Scoring training examples", unit="batch"):
            train = per_example_gradients(
                task,
                layers,
                batch.samples,
                batch.ids,
                Loss(),
                num_train_draws,
                seed,
                "train",
                batch_size,
                augment=True,
            )
            columns.append(dot_scores(preconditioned, train))
    finally:
        task.denoiser.train(was_training)
    return torch.cat(columns, dim=1).to(torch.float32).cpu()
