"""`fit_factors`: stream the training data through the denoiser and fit (E)K-FAC factors.

Pass 1 accumulates the Kronecker factors `A` and `G` over `draws_per_example` draws per example,
then eigendecomposes them; for EK-FAC, pass 2 estimates the corrected eigenvalues on independent
draws (another seed stream). Every draw is seeded by the example's id, so the factors do not depend
on the batch size or on the order of the data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from typing import Any

import torch
from tqdm.auto import tqdm

from . import __version__
from .curvature.capture import LayerCapture
from .curvature.kfac import CovarianceAccumulator, EigenvalueCorrectionAccumulator, eigendecompose
from .curvature.layers import find_layers, layer_kind
from .data import dataset_length, draw_chunks, iter_example_batches
from .distributed import Ranks
from .factors import FORMAT, FORMAT_VERSION, FactorConfig, InfluenceFactors
from .task import DenoiserOutput, DiffusionTask


def fit_factors(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    config: FactorConfig | None = None,
    accelerator: Any = None,
) -> InfluenceFactors:
    """Fit the curvature of `task`'s denoiser on `dataset` (a `datasets` Dataset, IterableDataset or
    any iterable of rows with the task's image column).

    With an `accelerate.Accelerator` of several processes, each rank takes its part of the data,
    the statistics are summed over ranks and the eigendecompositions are shared out round-robin;
    every rank returns the same factors as a single process would (up to float rounding).
    """
    config = config or FactorConfig()
    ranks = Ranks(accelerator)
    part = ranks.split(dataset)
    layers = find_layers(task.denoiser, config.module_filter)
    dtype = config.torch_dtype
    with task.eval_mode():
        covariances = CovarianceAccumulator(layers, config.approx, dtype)
        num_draws = _run_pass(task, part, config, layers, "fit", covariances, ranks, "Fitting covariances")
        tensors: dict[str, torch.Tensor] = {}
        activation_vectors, gradient_vectors = {}, {}
        for position, name in enumerate(
            tqdm(layers, desc="Eigendecomposition", leave=False, disable=not ranks.is_main)
        ):
            activation = ranks.sum(covariances.activation.pop(name)) / num_draws
            gradient = ranks.sum(covariances.gradient.pop(name)) / num_draws
            owner = ranks.owner(position)
            (activation_values, activation_vectors[name]), (gradient_values, gradient_vectors[name]) = (
                _shared_eigendecomposition(ranks, matrix, owner) for matrix in (activation, gradient)
            )
            tensors.update(
                {
                    f"{name}.activation_covariance": activation,
                    f"{name}.gradient_covariance": gradient,
                    f"{name}.activation_eigenvectors": activation_vectors[name],
                    f"{name}.gradient_eigenvectors": gradient_vectors[name],
                }
            )
            if config.strategy == "kfac":
                tensors[f"{name}.activation_eigenvalues"] = activation_values
                tensors[f"{name}.gradient_eigenvalues"] = gradient_values
                if layers[name].bias is not None:
                    tensors[f"{name}.bias_eigenvalues"] = gradient_values.clone()  # own memory for safetensors
        if config.strategy == "ekfac":
            correction = EigenvalueCorrectionAccumulator(layers, activation_vectors, gradient_vectors, dtype)
            correction_draws = _run_pass(
                task, part, config, layers, "correction", correction, ranks, "Eigenvalue correction"
            )
            for name in layers:
                tensors[f"{name}.eigenvalues"] = ranks.sum(correction.weight[name]) / correction_draws
                if name in correction.bias:
                    tensors[f"{name}.bias_eigenvalues"] = ranks.sum(correction.bias[name]) / correction_draws

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        **asdict(config),
        "num_draws": num_draws,
        "modules": list(layers),
        "shapes": {name: list(layer_kind(module).weight_shape(module)) for name, module in layers.items()},
        "model": {"fingerprint": task.fingerprint(), "denoiser": type(task.denoiser).__name__},
    }
    return InfluenceFactors(metadata, {name: value.to("cpu") for name, value in tensors.items()})


def _shared_eigendecomposition(ranks: Ranks, matrix: torch.Tensor, owner: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors computed by the `owner` rank only, then sent to every rank."""
    if ranks.rank == owner:
        values, vectors = eigendecompose(matrix)
    else:
        values, vectors = matrix.new_empty(len(matrix)), torch.empty_like(matrix)
    return ranks.broadcast(values, owner), ranks.broadcast(vectors, owner)


def _run_pass(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    config: FactorConfig,
    layers: dict,
    stream: str,
    accumulator: Any,
    ranks: Ranks,
    description: str,
) -> int:
    """One sweep over this rank's data with `draws_per_example` draws per example; returns the number of
    draws of all ranks together."""
    draws_per_example = config.draws_per_example
    examples_per_batch = max(1, config.batch_size // draws_per_example)
    length = dataset_length(dataset)
    total_batches = math.ceil(length / examples_per_batch) if length else None
    num_draws = 0
    on_forward = getattr(accumulator, "on_forward", None)
    with (
        torch.enable_grad(),
        LayerCapture(layers, on_forward=on_forward, on_backward=accumulator.on_backward) as capture,
    ):
        batches = iter_example_batches(dataset, task, examples_per_batch, config.id_column, rank_part=ranks.world > 1)
        for batch in tqdm(batches, total=total_batches, desc=description, unit="batch", disable=not ranks.is_main):
            for examples, draw_rows in draw_chunks(len(batch.ids), draws_per_example, config.batch_size):
                output, draws = task.run(
                    batch.samples[examples],
                    batch.ids[examples],
                    draws_per_example,
                    draw_rows,
                    config.seed,
                    stream,
                    augment=True,
                )
                for value, last in _backpropagated_values(task, output, draws.probe, config):
                    capture.backward(value, retain_graph=not last)
                num_draws += len(draws)
    num_draws = int(ranks.sum(torch.tensor(num_draws, device=task.device)).item())
    if num_draws == 0:
        raise ValueError("The dataset is empty: there are no training examples to attribute to.")
    return num_draws


def _backpropagated_values(
    task: DiffusionTask, output: DenoiserOutput, probe: torch.Tensor, config: FactorConfig
) -> Iterator[tuple[torch.Tensor, bool]]:
    """The scalars whose gradients give each draw's output-gradient vectors `s` (and whether each is the last).

    GGN^model: `s = sqrt(2/D) ξ`, so E[s sᵀ] = 2/D I, the loss's curvature in the denoiser output;
    with output_curvature="exact", `s = sqrt(2/D) e_k` for every output element k instead.
    GGN^loss: `s = ∂ℓ/∂f`, the per-draw loss gradient with the true target.
    """
    prediction = output.prediction
    scale = math.sqrt(2.0 / task.sample_numel)
    if config.ggn == "loss":
        loss = output.loss_per_draw()
        if not torch.isfinite(loss).all():
            raise FloatingPointError("The training loss is NaN or infinite: check the model weights and the data.")
        yield loss.sum(), True
    elif config.output_curvature == "mc":
        yield (prediction * probe.to(prediction.device, prediction.dtype)).sum() * scale, True
    else:
        flat = prediction.flatten(1)
        for k in range(flat.shape[1]):
            yield flat[:, k].sum() * scale, k == flat.shape[1] - 1
