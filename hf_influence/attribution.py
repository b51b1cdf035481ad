"""Influence scores: `τ(q, j) = ⟨(F̂ + λI)⁻¹ ∇m(x_q), ∇L(x_j)⟩` (`method.md` §5).

Positive `τ` means that removing training example `j` is predicted to increase the query's
measurement. Scores carry no 1/N. The query side is preconditioned once; the training side is
streamed (`pairwise_scores`) or read from a gradient index (`Attributor`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .data import check_dataset
from .deprecation import renamed_argument
from .engine import DrawPlan, dataset_batches
from .estimators import DEFAULT_ESTIMATOR, Estimator
from .factors import InfluenceFactors
from .gradients import DEFAULT_DRAWS, LayerGradients, per_example_scores, query_gradients
from .index import GradientIndex
from .measurements import Measurement, get_measurement
from .row_digests import check_rows
from .task import DiffusionTask
from .validation import check_float, check_int, check_type

DEFAULT_DAMPING = 1e-8
DEFAULT_CANDIDATES = 1024  # examples rescored exactly per query and side after a search-sketch pass


def modules_of(task: DiffusionTask, names: Sequence[str]) -> dict[str, nn.Module]:
    """The denoiser's layers called `names`, in that order."""
    modules = dict(task.denoiser.named_modules())
    return {name: modules[name] for name in names}


def precondition_gradients(factors: InfluenceFactors, gradients: LayerGradients, damping: float) -> LayerGradients:
    """Apply `(F̂ + λI)⁻¹` layer by layer."""
    return {name: factors.precondition(name, weight, bias, damping) for name, (weight, bias) in gradients.items()}


def pairwise_scores(
    task: DiffusionTask,
    factors: InfluenceFactors,
    queries: Any,
    train_dataset: Iterable[dict[str, Any]],
    measurement: str | Measurement = "loss",
    damping: float = DEFAULT_DAMPING,
    draws_per_query: int = DEFAULT_DRAWS,
    draws_per_example: int = DEFAULT_DRAWS,
    batch_size: int = 64,
    seed: int = 0,
    id_column: str = "id",
    force: bool = False,
    labels: Sequence[Any] | None = None,
    prompts: Sequence[str] | None = None,
    num_query_draws: int | None = None,
    num_train_draws: int | None = None,
    estimator: str = DEFAULT_ESTIMATOR,
) -> torch.Tensor:
    """Influence scores `[num_queries, num_train]` of every training example on every query, no index needed.

    `queries` are generated samples (PIL images, arrays or `(B, C, H, W)` tensors in [-1, 1]), with the class
    `labels` or `prompts` they were generated from for a conditional pipeline (training rows bring theirs).
    Training gradients average `draws_per_example` draws of the training loss per example (with the
    task's augmentation); query gradients average `draws_per_query` draws of `measurement`. With factors of the
    identity strategy (`InfluenceFactors.identity`) these are gradient dot products. Columns follow the order of
    `train_dataset`. Scores are fp32 (fp64 for an fp64 model). `num_query_draws` / `num_train_draws` are the
    deprecated names of the draw counts.
    """
    draws_per_query = renamed_argument("num_query_draws", num_query_draws, "draws_per_query", draws_per_query)
    draws_per_example = renamed_argument("num_train_draws", num_train_draws, "draws_per_example", draws_per_example)
    call = "pairwise_scores(task, factors, queries, train_dataset, ...)"
    check_type("task", task, DiffusionTask, call)
    check_type("factors", factors, InfluenceFactors, call)
    check_dataset(train_dataset, "train_dataset")
    damping = check_float("damping", damping, minimum=0)
    for name, value in (("draws_per_query", draws_per_query), ("draws_per_example", draws_per_example)):
        check_int(name, value, minimum=1)
    factors.check_compatible(task, force=force)
    layers = modules_of(task, factors.modules)
    chosen = Estimator.named(estimator)
    grads = query_gradients(
        task, layers, queries, measurement, draws_per_query, seed, batch_size, labels, prompts, chosen
    )
    preconditioned = precondition_gradients(factors.to(task.device), grads, damping)
    plan = DrawPlan.training(draws_per_example, seed, batch_size, estimator=chosen)
    batches = dataset_batches(train_dataset, task, plan.examples_per_pass, id_column, "Scoring training examples")
    columns = [per_example_scores(task, layers, batch.examples, batch.ids, plan, preconditioned) for batch in batches]
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
    digests: torch.Tensor | None = None  # (N,) the indexed rows' digests (`row_digests.py`), to check `rows`
    digest_columns: tuple[str, ...] = ()  # the columns the digests cover
    exact: torch.Tensor | None = None  # (N,) the columns scored exactly (else estimated by a search sketch)

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
        query = check_int("query", query, minimum=0, maximum=len(self.scores) - 1)
        positions = (self.proponents if which == "proponents" else self.opponents)[query]
        wanted = self.ids[positions].tolist()
        rows = rows_by_id(dataset, wanted, id_column)
        if self.digests is not None:
            check_rows(rows, wanted, self.digests[positions].tolist(), self.digest_columns)
        return rows


def rows_by_id(dataset: Any, ids: list[int], id_column: str = "id") -> list[dict]:
    """Fetch rows by their id: for map-style datasets by position where the ids are row positions (the usual
    case: no pass over the data), else through one pass over the id column; one pass for streams."""
    wanted = set(ids)
    if hasattr(dataset, "select") and hasattr(dataset, "column_names"):
        has_ids = id_column in dataset.column_names
        found = {}
        for example_id in wanted:
            if isinstance(example_id, int) and 0 <= example_id < len(dataset):
                row = dataset[example_id]
                if not has_ids or row[id_column] == example_id:
                    found[example_id] = row
        if len(found) < len(wanted) and has_ids:  # ids that are not row positions: look them up in the column
            rest = wanted - set(found)
            positions = {example_id: p for p, example_id in enumerate(dataset[id_column]) if example_id in rest}
            found |= {example_id: dataset[position] for example_id, position in positions.items()}
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

    Query gradients are cached in the strategy's eigenbasis, so a new damping costs one division; the cache is
    keyed by the images, their conditioning, the measurement's `cache_key()`, the draws and the model's
    fingerprint (a measurement without a key is never cached).
    """

    def __init__(
        self,
        task: DiffusionTask,
        factors: InfluenceFactors,
        index: GradientIndex,
        damping: float = DEFAULT_DAMPING,
        force: bool = False,
    ) -> None:
        call = "Attributor(task, factors, index)"
        check_type("task", task, DiffusionTask, call)
        check_type("factors", factors, InfluenceFactors, call)
        check_type("index", index, GradientIndex, call)
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
        self.damping = check_float("damping", damping, minimum=0)
        self.force = force
        self.layers = modules_of(task, factors.modules)
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
        draws_per_query: int | None = None,
        seed: int = 0,
        batch_size: int = 64,
        labels: Sequence[Any] | None = None,
        prompts: Sequence[str] | None = None,
        num_draws: int | None = None,
        candidates: int | None = None,
    ) -> AttributionResult:
        """Score `images` (with the class `labels` or `prompts` they were generated from, for a conditional
        pipeline) against every indexed example; `draws_per_query` defaults to the index's draws per example
        (`num_draws` is its deprecated name). With an index that stores a search sketch (`IndexConfig.search_dim`),
        each query's `candidates` (default 1024, at least `top_k`) best and worst examples by the sketch's estimate
        are rescored exactly, and the proponents and opponents are chosen among them (`AttributionResult.exact`)."""
        draws_per_query = renamed_argument("num_draws", num_draws, "draws_per_query", draws_per_query)
        damping = self.damping if damping is None else check_float("damping", damping, minimum=0)
        top_k = check_int("top_k", top_k, minimum=1)
        candidates = max(DEFAULT_CANDIDATES, top_k) if candidates is None else candidates
        candidates = check_int("candidates", candidates, minimum=top_k)
        if draws_per_query is None:
            draws_per_query = self.index.config.draws_per_example
        draws_per_query = check_int("draws_per_query", draws_per_query, minimum=1)
        self.factors.check_compatible(self.task, force=self.force)  # the weights may have changed since
        measurement = get_measurement(measurement)
        rotated = self._rotated_query_gradients(images, labels, prompts, measurement, draws_per_query, seed, batch_size)
        queries = {}
        for name, (weight, bias) in rotated.items():
            weight, bias = self.factors.precondition_in_eigenbasis(name, weight, bias, damping)
            queries[name] = self.index.compressor.query(name, weight.cpu(), None if bias is None else bias.cpu())
        scores, ids, exact = self.index.search(queries, candidates)
        k = min(top_k, scores.shape[1])
        infinity = torch.tensor(float("inf"))
        return AttributionResult(
            scores=scores,
            ids=ids,
            proponents=scores.where(exact, -infinity).topk(k, dim=1).indices,
            opponents=scores.where(exact, infinity).topk(k, dim=1, largest=False).indices,
            digests=self.index.row_digests(),
            digest_columns=self.index.metadata.digest_columns,
            exact=exact,
        )

    def _rotated_query_gradients(
        self,
        images: Any,
        labels: Sequence[Any] | None,
        prompts: Sequence[str] | None,
        measurement: Measurement,
        draws_per_query: int,
        seed: int,
        batch_size: int,
    ) -> LayerGradients:
        """The queries' measurement gradients in the eigenbasis, from the cache when the same request was the
        last one. Images are preprocessed once, for the cache key and the gradients alike."""
        pixels = self.task.preprocess(images)
        conditions = self.task.query_conditions(labels, prompts, len(pixels))
        key = None
        if measurement.cache_key() is not None:
            image_hash = hashlib.blake2b(pixels.numpy().tobytes()).hexdigest()
            key = (
                image_hash,
                repr(conditions),
                measurement.cache_key(),
                draws_per_query,
                seed,
                self.task.fingerprint(),
            )
        if key is None or self._cache is None or self._cache[0] != key:
            examples = self.task.encode(pixels, conditions)
            estimator = Estimator.named(self.index.config.estimator)  # the index's: common draws must be shared
            grads = query_gradients(
                self.task, self.layers, examples, measurement, draws_per_query, seed, batch_size, estimator=estimator
            )
            rotated = {name: self.factors.to_eigenbasis(name, *grad) for name, grad in grads.items()}
            self._cache = None if key is None else (key, rotated)
            return rotated
        return self._cache[1]
