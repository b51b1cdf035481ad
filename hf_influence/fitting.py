"""`fit_factors`: stream the training data through the denoiser and fit the curvature strategy's factors.

Pass 1 accumulates the Kronecker factors `A` and `G` over `draws_per_example` draws per example, then
eigendecomposes them; for EK-FAC, pass 2 estimates the corrected eigenvalues on independent draws (another
seed stream). Every draw is seeded by the example's id, so the factors do not depend on the batch size or on
the order of the data. The maths is in `curvature/`; this module runs the passes over the data, over the
processes of an `accelerate` job, and through checkpoints.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from .checkpoints import FitCheckpoint, PassState, PassTotals
from .curvature.capture import LayerCapture
from .curvature.eigen import Eigenpairs, decompose
from .curvature.large_layers import activation_rank
from .curvature.layer_factors import LayerFactors, flatten_layers, unflatten_layers
from .curvature.layers import find_layers, layer_kind
from .curvature.partitions import balanced_groups
from .curvature.probes import backpropagated_values
from .curvature.statistics import CovarianceAccumulator, EigenvalueCorrectionAccumulator
from .data import check_dataset
from .distributed import Ranks
from .engine import DrawPlan, dataset_batches, run_draws
from .factors import FactorConfig, FactorsMetadata, InfluenceFactors
from .provenance import DatasetSource, dataset_provenance
from .row_digests import combine, describe, row_digest
from .task import DiffusionTask
from .validation import check_type


def fit_factors(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    config: FactorConfig | None = None,
    accelerator: Any = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = False,
    dataset_source: DatasetSource | None = None,
) -> InfluenceFactors:
    """Fit the curvature of `task`'s denoiser on `dataset` (a `datasets` Dataset, IterableDataset or
    any iterable of rows with the task's image column).

    With an `accelerate.Accelerator` of several processes, each rank takes its part of the data,
    the statistics are summed over ranks and the eigendecompositions are shared out round-robin;
    every rank returns the same factors as a single process would (up to float rounding).
    With `checkpoint_dir`, each rank saves its running sums every `checkpoint_every` batches;
    `resume=True` continues an interrupted fit from there, with the same result.
    `dataset_source` records where the data came from (repo id, commit, split) in the factors' config;
    without it, what `datasets` records about the dataset (name, split) is used.
    """
    config = config or FactorConfig()
    check_type("task", task, DiffusionTask, "fit_factors(task, dataset, config)")
    check_dataset(dataset)
    check_type("config", config, FactorConfig, "fit_factors(task, dataset, config)")
    if not config.curvature.fits_covariances:
        source = dataset_provenance(dataset, config.id_column, dataset_source)
        return InfluenceFactors.identity(task, config.module_filter, source)
    ranks = Ranks(accelerator)
    layers = find_layers(task.denoiser, config.module_filter)
    identity = {"config": config, "fingerprint": task.fingerprint(), "num_processes": ranks.world}
    factors: dict[str, LayerFactors] = {}
    partitions = partition_layers(layers, config.module_partitions)
    for position, group in enumerate(partitions):
        checkpoint = None
        if checkpoint_dir is not None:  # one folder per partition, so a crash resumes inside its partition
            directory = Path(checkpoint_dir) / (f"partition-{position}" if len(partitions) > 1 else "")
            checkpoint = FitCheckpoint(directory, ranks.rank, identity, checkpoint_every)
        part, totals = _fit_layers(_Fit(task, ranks.split(dataset), config, group, ranks, checkpoint), resume)
        factors.update({name: layer.to("cpu") for name, layer in part.items()})  # finished groups leave the device
    factors = {name: factors[name] for name in layers}
    metadata = FactorsMetadata(
        config=config,
        total_draws=totals.draws,
        modules=tuple(layers),
        shapes={name: tuple(layer_kind(module).weight_shape(module)) for name, module in layers.items()},
        model=task.provenance(),
        dataset=dataset_provenance(dataset, config.id_column, dataset_source, describe(totals.examples, totals.digest)),
    )
    return InfluenceFactors(metadata, factors)


def partition_layers(layers: dict[str, nn.Module], count: int) -> list[dict[str, nn.Module]]:
    """`layers` in `count` groups of about equal factor bytes (`balanced_groups`), each in the model's order."""
    groups = balanced_groups({name: layer_kind(module).weight_shape(module) for name, module in layers.items()}, count)
    return [{name: layers[name] for name in group} for group in groups]


def _fit_layers(fit: _Fit, resume: bool) -> tuple[dict[str, LayerFactors], PassTotals]:
    """One group's factors: the covariance pass and eigendecompositions, then the correction pass (EK-FAC),
    each resumed from the group's checkpoint when there is one."""
    state = fit.checkpoint.load(resume) if fit.checkpoint is not None else None
    if state is not None and state.stage == "finished":  # a partition fitted before the crash
        return unflatten_layers(state.finished, fit.layers), state.fit
    if state is None or state.stage == "fit":
        factors, totals = fit.covariance_stage(state)
        state = None
    else:
        factors, totals = unflatten_layers(state.finished, fit.layers), state.fit
    if fit.config.curvature.corrects_eigenvalues:
        factors = fit.correction_stage(factors, totals, state)
    if fit.checkpoint is not None and fit.config.module_partitions > 1:  # the next partitions may yet crash
        fit.checkpoint.save(PassState("finished", fit=totals, finished=flatten_layers(factors)))
    return factors, totals


class _Fit:
    """The passes of one fit over this rank's `dataset`, with their checkpoints."""

    def __init__(
        self,
        task: DiffusionTask,
        dataset: Iterable[dict[str, Any]],
        config: FactorConfig,
        layers: dict[str, nn.Module],
        ranks: Ranks,
        checkpoint: FitCheckpoint | None,
    ) -> None:
        self.task, self.dataset, self.config, self.layers = task, dataset, config, layers
        self.ranks, self.checkpoint = ranks, checkpoint

    def covariance_stage(self, state: PassState | None) -> tuple[dict[str, LayerFactors], PassTotals]:
        """Pass 1 and the eigendecompositions: each layer's factors, and what all ranks read."""
        covariances = CovarianceAccumulator(self.layers, self.config.approx, self.config.torch_dtype)
        totals = self.run_pass("fit", covariances, "Fitting covariances", state)
        factors = self.decompose(covariances, totals.draws)
        if self.checkpoint is not None:
            self.checkpoint.save(PassState("correction", fit=totals, finished=flatten_layers(factors)))
        return factors, totals

    def correction_stage(
        self, factors: dict[str, LayerFactors], fit: PassTotals, state: PassState | None
    ) -> dict[str, LayerFactors]:
        """Pass 2: the eigenvalues re-estimated in the eigenbasis of pass 1, on the same rows."""
        correction = EigenvalueCorrectionAccumulator(self.layers, factors, self.config.torch_dtype)
        totals = self.run_pass("correction", correction, "Eigenvalue correction", state, flatten_layers(factors), fit)
        if (totals.examples, totals.digest) != (fit.examples, fit.digest):
            raise ValueError(
                f"The data changed between the two passes of the fit ({fit.examples} rows, then {totals.examples} "
                "with other contents): fit on a dataset that stays the same."
            )
        strategy = self.config.curvature
        return {
            name: strategy.corrected(layer, *correction.normalised(name, totals.draws, self.ranks.sum))
            for name, layer in factors.items()
        }

    def decompose(self, covariances: CovarianceAccumulator, total_draws: int) -> dict[str, LayerFactors]:
        """Normalised covariances summed over ranks, and their eigendecompositions shared out round-robin."""
        config, strategy, factors = self.config, self.config.curvature, {}
        progress = tqdm(self.layers, desc="Eigendecomposition", leave=False, disable=not self.ranks.is_main)
        for position, name in enumerate(progress):
            activation, gradient = covariances.pop_normalised(name, total_draws, self.ranks.sum)
            owner = self.ranks.owner(position)
            rank = activation_rank(len(activation), config.max_factor_size, config.large_layer_rank)
            activation_pairs = self._shared_decomposition(activation, owner, rank)
            gradient_pairs = self._shared_decomposition(gradient, owner, len(gradient))
            # Scoring never needs the covariances on the device: free it for the correction pass.
            factors[name] = strategy.layer_factors(
                activation.cpu(), gradient.cpu(), activation_pairs, gradient_pairs, self.layers[name].bias is not None
            )
        return factors

    def _shared_decomposition(self, matrix: torch.Tensor, owner: int, rank: int) -> Eigenpairs:
        """The `rank` leading eigenpairs of `matrix`, computed by the `owner` rank only, then sent to every rank."""
        ranks, size = self.ranks, len(matrix)
        if ranks.rank == owner:
            pairs = decompose(matrix, rank, self.config.large_layer_solver)
        else:
            residual = matrix.new_empty(1) if rank < size else None
            pairs = Eigenpairs(matrix.new_empty(rank), matrix.new_empty(size, rank), residual)
        return Eigenpairs(
            ranks.broadcast(pairs.values, owner),
            ranks.broadcast(pairs.vectors, owner),
            None if pairs.residual is None else ranks.broadcast(pairs.residual, owner),
        )

    def run_pass(
        self,
        stream: str,
        accumulator: Any,
        description: str,
        state: PassState | None,
        finished: dict[str, torch.Tensor] | None = None,
        fit: PassTotals | None = None,
    ) -> PassTotals:
        """One sweep over this rank's data with `draws_per_example` draws per example; returns what all ranks read
        together. Resumes from `state` (this pass's sums so far, once the rows it read are checked to be the same)
        and saves the running sums (with the `finished` factors and the totals `fit` of the covariance pass) to the
        checkpoint as it goes."""
        config, task = self.config, self.task
        plan = DrawPlan.training(config.draws_per_example, config.seed, config.batch_size, stream=stream)
        done = state.done if state is not None else PassTotals()
        dataset = self.dataset
        if done.examples > 0:
            self._check_consumed(done)
            accumulator.load_state_dict(state.sums)
            dataset = (
                dataset.skip(done.examples)
                if hasattr(dataset, "skip")
                else itertools.islice(dataset, done.examples, None)
            )
        on_forward = getattr(accumulator, "on_forward", None)
        draws_done = done.draws
        with LayerCapture(self.layers, on_forward=on_forward, on_backward=accumulator.on_backward) as capture:

            def backward(rows: slice, output: Any, draws: Any) -> None:
                nonlocal draws_done
                values = backpropagated_values(
                    output.prediction,
                    output.loss_per_draw(),
                    draws.probe,
                    config.ggn,
                    config.output_curvature,
                    output.weights,
                )
                for value, last in values:
                    capture.backward(value, retain_graph=not last)
                draws_done += len(draws)

            batches = dataset_batches(
                dataset,
                task,
                plan.examples_per_pass,
                config.id_column,
                description,
                start=done.examples,
                rank_part=self.ranks.world > 1,
                show_progress=self.ranks.is_main,
            )
            for number, batch in enumerate(batches, start=1):
                run_draws(task, batch.examples, batch.ids, plan, backward)
                done = PassTotals(draws_done, done.examples + len(batch.ids), combine([done.digest, *batch.digests]))
                if self.checkpoint is not None and number % self.checkpoint.every == 0:
                    sums = accumulator.state_dict()
                    self.checkpoint.save(PassState(stream, done, fit or PassTotals(), sums, finished or {}))
        counts = self.ranks.sum(torch.tensor([done.draws, done.examples], device=task.device)).tolist()
        if counts[0] == 0:
            raise ValueError("The dataset is empty: there are no training examples to attribute to.")
        return PassTotals(int(counts[0]), int(counts[1]), self.ranks.sum_digest(done.digest, task.device))

    def _check_consumed(self, done: PassTotals) -> None:
        """Refuse to resume on other data: the rows the checkpoint read must have the digest it recorded."""
        id_column, columns = self.config.id_column, self.task.columns
        rows = itertools.islice(self.dataset, done.examples)
        digest = combine(row_digest(row, row.get(id_column, position), columns) for position, row in enumerate(rows))
        if digest != done.digest:
            raise ValueError(
                f"The checkpoint was written by a fit on other data: the first {done.examples} rows this process "
                "reads now are not those it had read. Resume with the same dataset, or start a new fit."
            )
