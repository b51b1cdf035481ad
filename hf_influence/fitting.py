"""`fit_factors`: stream the training data through the denoiser and fit (E)K-FAC factors.

Pass 1 accumulates the Kronecker factors `A` and `G` over `draws_per_example` draws per example,
then eigendecomposes them; for EK-FAC, pass 2 estimates the corrected eigenvalues on independent
draws (another seed stream). Every draw is seeded by the example's id, so the factors do not depend
on the batch size or on the order of the data.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from . import __version__
from .curvature.capture import LayerCapture
from .curvature.kfac import CovarianceAccumulator, EigenvalueCorrectionAccumulator, eigendecompose
from .curvature.large_layers import activation_rank, truncate
from .curvature.layers import find_layers, layer_kind
from .data import dataset_length, draw_chunks, iter_example_batches
from .distributed import Ranks
from .factors import FORMAT, FORMAT_VERSION, FactorConfig, InfluenceFactors
from .files import atomic_write, atomic_write_text
from .provenance import DatasetSource, dataset_provenance, model_provenance
from .task import DenoiserOutput, DiffusionTask


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
    ranks = Ranks(accelerator)
    part = ranks.split(dataset)
    layers = find_layers(task.denoiser, config.module_filter)
    dtype = config.torch_dtype
    checkpoint = None
    if checkpoint_dir is not None:
        checkpoint = FitCheckpoint(Path(checkpoint_dir), ranks, config, task.fingerprint(), checkpoint_every)
    state = checkpoint.load(resume) if checkpoint is not None else None
    with task.eval_mode():
        if state is None or state.stage == "fit":
            covariances = CovarianceAccumulator(layers, config.approx, dtype)
            num_draws = _run_pass(
                task, part, config, layers, "fit", covariances, ranks, "Fitting covariances", checkpoint, state
            )
            tensors = _eigendecompositions(covariances, num_draws, layers, config, ranks)
            if checkpoint is not None:
                checkpoint.save(PassState("correction", fit_draws=num_draws, finished=tensors))
            state = None
        else:
            tensors, num_draws = dict(state.finished), state.fit_draws
        if config.strategy == "ekfac":
            correction = EigenvalueCorrectionAccumulator(
                layers,
                {name: tensors[f"{name}.activation_eigenvectors"] for name in layers},
                {name: tensors[f"{name}.gradient_eigenvectors"] for name in layers},
                dtype,
            )
            correction_draws = _run_pass(
                task,
                part,
                config,
                layers,
                "correction",
                correction,
                ranks,
                "Eigenvalue correction",
                checkpoint,
                state,
                finished=tensors,
                fit_draws=num_draws,
            )
            for name in layers:
                tensors[f"{name}.eigenvalues"] = ranks.sum(correction.weight[name]) / correction_draws
                if name in correction.bias:
                    tensors[f"{name}.bias_eigenvalues"] = ranks.sum(correction.bias[name]) / correction_draws
                if name in correction.residual:
                    tensors[f"{name}.residual_eigenvalues"] = ranks.sum(correction.residual[name]) / correction_draws

    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        **asdict(config),
        "num_draws": num_draws,
        "modules": list(layers),
        "shapes": {name: list(layer_kind(module).weight_shape(module)) for name, module in layers.items()},
        "model": model_provenance(task),
        "dataset": dataset_provenance(dataset, config.id_column, dataset_source),
    }
    return InfluenceFactors(metadata, {name: value.to("cpu") for name, value in tensors.items()})


def _eigendecompositions(
    covariances: CovarianceAccumulator, num_draws: int, layers: dict, config: FactorConfig, ranks: Ranks
) -> dict[str, torch.Tensor]:
    """Normalised covariances summed over ranks, and their eigendecompositions shared out round-robin."""
    tensors: dict[str, torch.Tensor] = {}
    progress = tqdm(layers, desc="Eigendecomposition", leave=False, disable=not ranks.is_main)
    for position, name in enumerate(progress):
        activation = ranks.sum(covariances.activation.pop(name)) / num_draws
        gradient = ranks.sum(covariances.gradient.pop(name)) / num_draws
        owner = ranks.owner(position)
        rank = activation_rank(len(activation), config.max_factor_size, config.large_layer_rank)
        activation_values, activation_vectors, residual = _shared_eigendecomposition(ranks, activation, owner, rank)
        gradient_values, gradient_vectors, _ = _shared_eigendecomposition(ranks, gradient, owner, len(gradient))
        # Scoring never needs the covariances on the device: free it for the correction pass.
        tensors.update(
            {
                f"{name}.activation_covariance": activation.cpu(),
                f"{name}.gradient_covariance": gradient.cpu(),
                f"{name}.activation_eigenvectors": activation_vectors,
                f"{name}.gradient_eigenvectors": gradient_vectors,
            }
        )
        if config.strategy == "kfac":
            tensors[f"{name}.activation_eigenvalues"] = activation_values
            tensors[f"{name}.gradient_eigenvalues"] = gradient_values
            if residual is not None:
                tensors[f"{name}.activation_residual_eigenvalue"] = residual
            if layers[name].bias is not None:
                tensors[f"{name}.bias_eigenvalues"] = gradient_values.clone()  # own memory for safetensors
    return tensors


def _shared_eigendecomposition(
    ranks: Ranks, matrix: torch.Tensor, owner: int, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The `rank` leading eigenpairs (all of them when `rank` is the size, else truncated, with the mean of
    the other eigenvalues as a third result) computed by the `owner` rank only, then sent to every rank."""
    size = len(matrix)
    if ranks.rank == owner:
        values, vectors = eigendecompose(matrix)
        residual = None
        if rank < size:
            values, vectors, residual = truncate(values, vectors, rank)
    else:
        values, vectors = matrix.new_empty(rank), matrix.new_empty(size, rank)
        residual = matrix.new_empty(1) if rank < size else None
    values, vectors = ranks.broadcast(values, owner), ranks.broadcast(vectors, owner)
    return values, vectors, None if residual is None else ranks.broadcast(residual, owner)


def _run_pass(
    task: DiffusionTask,
    dataset: Iterable[dict[str, Any]],
    config: FactorConfig,
    layers: dict,
    stream: str,
    accumulator: Any,
    ranks: Ranks,
    description: str,
    checkpoint: FitCheckpoint | None = None,
    state: PassState | None = None,
    finished: dict[str, torch.Tensor] | None = None,
    fit_draws: int = 0,
) -> int:
    """One sweep over this rank's data with `draws_per_example` draws per example; returns the number of
    draws of all ranks together. Resumes from `state` (this pass's sums so far) and saves the running
    sums (with the `finished` tensors and `fit_draws` of the covariance pass) to `checkpoint` as it goes."""
    draws_per_example = config.draws_per_example
    examples_per_batch = max(1, config.batch_size // draws_per_example)
    examples, num_draws = (state.examples, state.draws) if state is not None else (0, 0)
    if state is not None and examples > 0:
        accumulator.load_state_dict(state.sums)
        dataset = dataset.skip(examples) if hasattr(dataset, "skip") else itertools.islice(dataset, examples, None)
    length = dataset_length(dataset)
    total_batches = math.ceil(length / examples_per_batch) if length else None
    on_forward = getattr(accumulator, "on_forward", None)
    with (
        torch.enable_grad(),
        LayerCapture(layers, on_forward=on_forward, on_backward=accumulator.on_backward) as capture,
    ):
        batches = iter_example_batches(
            dataset, task, examples_per_batch, config.id_column, start=examples, rank_part=ranks.world > 1
        )
        progress = tqdm(batches, total=total_batches, desc=description, unit="batch", disable=not ranks.is_main)
        for number, batch in enumerate(progress, start=1):
            for rows, draw_rows in draw_chunks(len(batch.ids), draws_per_example, config.batch_size):
                output, draws = task.run(
                    batch.samples[rows],
                    batch.ids[rows],
                    draws_per_example,
                    draw_rows,
                    config.seed,
                    stream,
                    augment=True,
                )
                for value, last in _backpropagated_values(task, output, draws.probe, config):
                    capture.backward(value, retain_graph=not last)
                num_draws += len(draws)
            examples += len(batch.ids)
            if checkpoint is not None and number % checkpoint.every == 0:
                position = PassState(stream, examples, num_draws, fit_draws, accumulator.state_dict(), finished or {})
                checkpoint.save(position)
    num_draws = int(ranks.sum(torch.tensor(num_draws, device=task.device)).item())
    if num_draws == 0:
        raise ValueError("The dataset is empty: there are no training examples to attribute to.")
    return num_draws


@dataclass
class PassState:
    """Where a fit stands: the pass, this rank's examples and draws done in it, the pass's running
    `sums`, and (for the correction pass) the draws and `finished` factors of the covariance pass."""

    stage: str
    examples: int = 0
    draws: int = 0
    fit_draws: int = 0
    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    finished: dict[str, torch.Tensor] = field(default_factory=dict)


class FitCheckpoint:
    """One rank's checkpoint of a fit: its running sums (safetensors) and its position (JSON)."""

    def __init__(self, directory: Path, ranks: Ranks, config: FactorConfig, fingerprint: str, every: int) -> None:
        if every < 1:
            raise ValueError(f"checkpoint_every must be at least 1 batch, got {every}.")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.every = every
        self.prefix = f"rank-{ranks.rank:03d}"
        self.state_path = directory / f"{self.prefix}.json"
        self.identity = {"config": asdict(config), "fingerprint": fingerprint, "num_processes": ranks.world}

    def load(self, resume: bool) -> PassState | None:
        if not self.state_path.is_file():
            return None
        if not resume:
            raise FileExistsError(
                f"{self.directory} holds a checkpoint of an earlier fit: pass resume=True to continue it, "
                "or choose another checkpoint_dir."
            )
        saved = json.loads(self.state_path.read_text())
        if saved["identity"] != self.identity:
            raise ValueError(
                f"The checkpoint in {self.directory} is of a fit with other settings, model or number of "
                "processes; resume with the same ones."
            )
        tensors = load_file(self.directory / saved["tensors"])
        parts = {
            part: {key.partition("/")[2]: value for key, value in tensors.items() if key.startswith(f"{part}/")}
            for part in ("sums", "finished")
        }
        return PassState(**saved["position"], **parts)

    def save(self, state: PassState) -> None:
        """Write the tensors to a new file, then the position naming it, then drop the older file: a
        crash at any point leaves a position and the tensors it names."""
        previous = json.loads(self.state_path.read_text())["tensors"] if self.state_path.is_file() else None
        name = f"{self.prefix}-{state.stage}-{state.examples:012d}.safetensors"
        content = {
            f"{part}/{key}": value.detach().cpu().contiguous()
            for part in ("sums", "finished")
            for key, value in getattr(state, part).items()
        }
        atomic_write(self.directory / name, lambda temp: save_file(content, temp))
        position = {key: getattr(state, key) for key in ("stage", "examples", "draws", "fit_draws")}
        text = json.dumps({"identity": self.identity, "position": position, "tensors": name})
        atomic_write_text(self.state_path, text)
        if previous is not None and previous != name:
            (self.directory / previous).unlink(missing_ok=True)


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
