"""Influence scores: `τ(q, j) = ⟨(F̂ + λI)⁻¹ ∇m(x_q), ∇L(x_j)⟩` (`method.md` §5).

Positive `τ` means that removing training example `j` is predicted to increase the query's
measurement. Scores carry no 1/N. The query side is preconditioned once; the training side is
streamed, so no training gradient is ever stored.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .curvature.inverse import precondition, precondition_in_eigenbasis, to_eigenbasis
from .data import dataset_length, iter_example_batches
from .factors import InfluenceFactors
from .gradients import GradientPlan, LayerGradients, per_example_gradients, per_example_scores
from .index import GradientIndex
from .measurements import Measurement, get_measurement
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
    labels: Sequence[Any] | None = None,
    prompts: Sequence[str] | None = None,
) -> LayerGradients:
    """Gradients of the measurement of each query (no augmentation; query `i` has id `i`), conditioned on
    its class `labels` (class-conditional pipelines) or `prompts` (text-to-image) as it was generated."""
    measurement = get_measurement(measurement)
    samples = task.examples(queries, labels=labels, prompts=prompts)
    plan = GradientPlan.query(measurement, num_draws, seed, batch_size)
    return per_example_gradients(task, layers, samples, list(range(len(samples))), plan)


def precondition_gradients(factors: InfluenceFactors, gradients: LayerGradients, damping: float) -> LayerGradients:
    """Apply `(F̂ + λI)⁻¹` layer by layer."""
    return {
        name: precondition(factors.layer(name), weight, bias, damping) for name, (weight, bias) in gradients.items()
    }


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
    labels: Sequence[Any] | None = None,
    prompts: Sequence[str] | None = None,
) -> torch.Tensor:
    """Influence scores `[num_queries, num_train]` of every training example on every query.

    `queries` are generated samples (PIL images, arrays or `(B, C, H, W)` tensors in [-1, 1]), with the class
    `labels` or `prompts` they were generated from for a conditional pipeline (training rows bring theirs).
    Training gradients average `num_train_draws` draws of the training loss per example (with the
    task's augmentation); query gradients average `num_query_draws` draws of `measurement`.
    Columns follow the order of `train_dataset`. Scores are fp32 (fp64 for an fp64 model).
    """
    factors.check_compatible(task, force=force)
    layers = factor_layers(task, factors)
    grads = query_gradients(
        task, layers, queries, measurement, num_query_draws, seed, batch_size, labels=labels, prompts=prompts
    )
    preconditioned = precondition_gradients(factors.to(task.device), grads, damping)
    examples_per_batch = max(1, batch_size // num_train_draws)
    length = dataset_length(train_dataset)
    plan = GradientPlan.training(num_train_draws, seed, batch_size)
    columns = []
    batches = iter_example_batches(train_dataset, task, examples_per_batch, id_column)
    total = math.ceil(length / examples_per_batch) if length else None
    for batch in tqdm(batches, total=total, desc="Scoring training examples", unit="batch"):
        columns.append(per_example_scores(task, layers, batch.samples, batch.ids, plan, preconditioned))
    return torch.cat(columns, dim=1).cpu()


@dataclass
class AttributionResult:
    """Scores of queries against an index, with each query's top proponents and opponents.

    Proponents have the largest scores (removing them is predicted to increase the measurement the
    most: for the loss, the examples that made the sample likely); opponents the smallest.
    """

    scores: torch.Tensor  # (Q, N), columns in the order of `ids`
    ids: torch.Tensor  # (N,) the training examples' dataset ids
    proponents: torch.Tensor  # (Q, k) column positions, by descending score
    opponents: torch.Tensor  # (Q, k) column positions, by ascending score

    @property
    def proponent_ids(self) -> torch.Tensor:
        return self.ids[self.proponents]

    @property
    def opponent_ids(self) -> torch.Tensor:
        return self.ids[self.opponents]

    @property
    def proponent_scores(self) -> torch.Tensor:
        return self.scores.gather(1, self.proponents)

    @property
    def opponent_scores(self) -> torch.Tensor:
        return self.scores.gather(1, self.opponents)

    def rows(self, dataset: Any, query: int = 0, which: str = "proponents", id_column: str = "id") -> list[dict]:
        """The dataset rows (image, label, ...) of one query's proponents or opponents, in rank order."""
        if which not in ("proponents", "opponents"):
            raise ValueError(f"which must be 'proponents' or 'opponents', got {which!r}.")
        wanted = (self.proponent_ids if which == "proponents" else self.opponent_ids)[query].tolist()
        return rows_by_id(dataset, wanted, id_column)


def rows_by_id(dataset: Any, ids: list[int], id_column: str = "id") -> list[dict]:
    """Fetch rows by their id (a direct lookup for map-style datasets, one pass for streams)."""
    wanted = set(ids)
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        column = dataset[id_column] if id_column in dataset.column_names else list(range(len(dataset)))
        positions = {example_id: position for position, example_id in enumerate(column) if example_id in wanted}
        found = {example_id: dataset[position] for example_id, position in positions.items()}
    else:
        found = {}
        for position, row in enumerate(dataset):
            example_id = row.get(id_column, position)
            if example_id in wanted:
                found[example_id] = row
            if len(found) == len(wanted):
                break
    missing = [example_id for example_id in ids if example_id not in found]
    if missing:
        raise KeyError(f"Ids {missing[:5]} are not in the dataset's {id_column!r} column: is it the indexed dataset?")
    return [found[example_id] for example_id in ids]


class Attributor:
    """Answers "which training examples made this image?" from fitted factors and a gradient index.

    Query gradients are cached in the Kronecker eigenbasis, so a new damping costs one division.
    """

    def __init__(
        self,
        task: DiffusionTask,
        factors: InfluenceFactors,
        index: GradientIndex,
        damping: float = DEFAULT_DAMPING,
        force: bool = False,
    ) -> None:
        factors.check_compatible(task, force=force)
        index.check_compatible(task, force=force)
        if index.modules != factors.modules:
            raise ValueError(
                "The index and the factors cover different layers (module_filter differs): "
                f"{len(index.modules)} indexed vs {len(factors.modules)} fitted."
            )
        self.task = task
        self.factors = factors.to(task.device)
        self.index = index
        self.damping = damping
        self.layers = factor_layers(task, factors)
        self._cache: tuple[tuple, dict] | None = None

    @classmethod
    def from_pretrained(
        cls,
        pipeline: str | DiffusionTask,
        factors: str | InfluenceFactors,
        index: str | GradientIndex,
        damping: float = DEFAULT_DAMPING,
        force: bool = False,
        pipeline_revision: str | None = None,
        factors_revision: str | None = None,
        index_revision: str | None = None,
        token: str | bool | None = None,
        **task_kwargs: Any,
    ) -> Attributor:
        """All three parts from Hub ids or local folders (or already loaded objects): the pipeline as a
        `DiffusionTask` (`task_kwargs` such as image_column go to it), the factors and the index, each at
        its revision; a mismatch between them is refused unless `force`."""
        if not isinstance(pipeline, DiffusionTask):
            pipeline = DiffusionTask.from_pretrained(pipeline, revision=pipeline_revision, **task_kwargs)
        if not isinstance(factors, InfluenceFactors):
            factors = InfluenceFactors.from_pretrained(factors, revision=factors_revision, token=token)
        if not isinstance(index, GradientIndex):
            index = GradientIndex.from_pretrained(index, revision=index_revision, token=token)
        return cls(pipeline, factors, index, damping=damping, force=force)

    def attribute(
        self,
        images: Any,
        measurement: str | Measurement = "loss",
        top_k: int = 10,
        damping: float | None = None,
        num_draws: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        labels: Sequence[Any] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> AttributionResult:
        """Score `images` (with the class `labels` or `prompts` they were generated from, for a conditional
        pipeline) against every indexed example; `num_draws` defaults to the index's K."""
        damping = self.damping if damping is None else damping
        samples = self.task.preprocess(images)
        num_draws = num_draws or self.index.config["num_draws"]
        conditions = {"labels": labels, "prompts": prompts}
        rotated = self._rotated_query_gradients(
            samples, conditions, get_measurement(measurement), num_draws, seed, batch_size
        )
        queries = {}
        for name, (weight, bias) in rotated.items():
            weight, bias = precondition_in_eigenbasis(self.factors.layer(name), weight, bias, damping)
            queries[name] = self.index.compressor.query(name, weight.cpu(), None if bias is None else bias.cpu())
        scores, ids = self.index.scores(queries)
        k = min(top_k, scores.shape[1])
        return AttributionResult(
            scores=scores,
            ids=ids,
            proponents=scores.topk(k, dim=1).indices,
            opponents=scores.topk(k, dim=1, largest=False).indices,
        )

    def _rotated_query_gradients(
        self,
        samples: torch.Tensor,
        conditions: dict[str, Any],
        measurement: Measurement,
        num_draws: int,
        seed: int,
        batch_size: int,
    ) -> dict:
        image_hash = hashlib.blake2b(samples.numpy().tobytes()).hexdigest()
        key = (image_hash, repr(conditions), repr(measurement), num_draws, seed)
        if self._cache is None or self._cache[0] != key:
            grads = query_gradients(
                self.task, self.layers, samples, measurement, num_draws, seed, batch_size, **conditions
            )
            rotated = {name: to_eigenbasis(self.factors.layer(name), *grad) for name, grad in grads.items()}
            self._cache = (key, rotated)
        return self._cache[1]
