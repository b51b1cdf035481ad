"""Retraining without a query's top-k influences (`method.md` §8.2), against removing k random examples.

A method's top k for query q are the k largest scores of its row (positive = removing the example
is predicted to increase the measurement), so a better method makes the retrained model's
measurement of q rise more. The control removes k examples drawn at random (seeded per query).
Models are stored by the set they remove, so methods that pick the same examples share a model.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..deprecation import renamed_argument
from ..measurements import Measurement, get_measurement
from ..seeding import seeded_generator
from ..training import TrainConfig
from .ground_truth import load_model_task, measure, measure_models
from .retraining import RetrainedModel, train_models

RANDOM = "random"


@dataclass
class TopKRemovalResult:
    """Measurements after retraining without each query's k removed examples.

    `full` (Q,) is each query's measurement on the model trained on all the data, `retrained` (Q, R)
    on the models retrained without the removed examples (one per training seed); `removed` the
    training-set positions removed for each query."""

    method: str
    k: int
    queries: list[int]
    full: torch.Tensor
    retrained: torch.Tensor
    removed: list[list[int]]

    @property
    def increase(self) -> torch.Tensor:
        """(Q,) seed-averaged measurement after removal minus the full model's."""
        return self.retrained.mean(dim=1) - self.full

    def as_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "queries": self.queries,
            "full": self.full.tolist(),
            "retrained": self.retrained.tolist(),
            "increase": self.increase.tolist(),
            "mean_increase": self.increase.mean().item(),
            "removed": self.removed,
        }


def removed_examples(scores: torch.Tensor | None, query: int, k: int, num_examples: int, seed: int = 0) -> list[int]:
    """The k positions with the largest scores of row `query`, or (scores=None) k random positions
    drawn from a generator seeded by (seed, query)."""
    if not 0 < k < num_examples:
        raise ValueError(f"k must be between 1 and {num_examples - 1}, got {k}.")
    if scores is None:
        order = torch.randperm(num_examples, generator=seeded_generator(seed, "random-removal", query))
        return sorted(order[:k].tolist())
    if scores.dim() != 2 or scores.shape[1] != num_examples:
        raise ValueError(f"scores must be (queries, {num_examples}), got {tuple(scores.shape)}.")
    return sorted(scores[query].topk(k).indices.tolist())


def removal_models(
    removed: Sequence[Sequence[int]], num_examples: int, seeds: Sequence[int], output_dir: str | Path
) -> list[list[RetrainedModel]]:
    """One model per removed set and seed, in output_dir/removed-<hash of the set>/seed-<s>."""
    models = []
    for positions in removed:
        digest = hashlib.blake2b(",".join(map(str, sorted(positions))).encode(), digest_size=8).hexdigest()
        dropped = set(positions)
        kept = tuple(position for position in range(num_examples) if position not in dropped)
        folder = Path(output_dir) / f"removed-{digest}"
        models.append([RetrainedModel(folder / f"seed-{seed}", kept, seed) for seed in seeds])
    return models


def top_k_removal(
    dataset: Any,
    config: TrainConfig,
    scores: torch.Tensor | None,
    queries: Any,
    k: int,
    output_dir: str | Path,
    full_model: str | Path,
    query_indices: Sequence[int] | None = None,
    seeds: Sequence[int] = (0,),
    method: str = "scores",
    measurement: str | Measurement = "loss",
    draws_per_query: int = 1000,
    draw_seed: int = 0,
    batch_size: int = 256,
    random_seed: int = 0,
    num_draws: int | None = None,
) -> TopKRemovalResult:
    """Retrain without the top-k examples of `scores` (or k random ones with scores=None) for each query in
    `query_indices` (default: all), then measure each query on its models and on `full_model` (trained on
    all of `dataset` with `config`), with the same common random numbers as the LDS ground truth
    (`num_draws`: the deprecated name of `draws_per_query`)."""
    draws_per_query = renamed_argument("num_draws", num_draws, "draws_per_query", draws_per_query)
    measurement = get_measurement(measurement)
    samples = load_model_task(full_model).preprocess(queries)
    indices = list(range(len(samples))) if query_indices is None else [int(q) for q in query_indices]
    removed = [removed_examples(scores, q, k, len(dataset), random_seed) for q in indices]
    models = removal_models(removed, len(dataset), seeds, output_dir)
    train_models(dataset, config, [model for per_query in models for model in per_query])
    full = measure_models([full_model], samples, measurement, draws_per_query, draw_seed, batch_size)[0]
    retrained = torch.zeros(len(indices), len(seeds), dtype=torch.float64)
    for row, (query, per_query) in enumerate(zip(indices, models, strict=True)):
        for column, model in enumerate(per_query):
            task = load_model_task(model.path)
            retrained[row, column] = measure(
                task, samples[query : query + 1], measurement, draws_per_query, draw_seed, batch_size, query_ids=[query]
            )[0]
    return TopKRemovalResult(
        method=RANDOM if scores is None else method,
        k=k,
        queries=indices,
        full=full[indices],
        retrained=retrained,
        removed=removed,
    )
