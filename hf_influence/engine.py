"""The draw engine: the one loop that runs the denoiser over examples × draws.

Fitting (covariances, eigenvalue correction), per-example gradients (the index, query gradients, pairwise
scores, baselines) and ground-truth measurements all do the same thing: take a batch of examples, give each
`draws_per_example` draws seeded by its id, run the denoiser on at most `batch_size` draws per forward pass,
and do something with each pass — backpropagate through a layer capture, or average a measurement. `DrawPlan`
says what the draws are; `run_draws` is the loop; `dataset_batches` walks a dataset in example batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from .data import ExampleBatch, dataset_length, iter_example_batches
from .estimators import PLAIN, Estimator
from .measurements import Loss, Measurement
from .validation import check_int, check_type

if TYPE_CHECKING:
    from .draws import Draws
    from .examples import Examples
    from .task import DenoiserOutput, DiffusionTask

PassStep = Callable[[slice, "DenoiserOutput", "Draws"], None]  # (the pass's examples, its output, its draws)


@dataclass(frozen=True)
class DrawPlan:
    """What each example's draws are and what is computed on them: `measurement` per draw (the training loss,
    or a measurement of generated samples), over `draws_per_example` draws seeded by (seed, stream, example
    id), `batch_size` draws per forward pass (so nothing depends on `batch_size`). `augment` applies the task's
    training augmentation (flips, conditioning dropout); `timestep` fixes t instead of drawing it; `estimator`
    chooses the draws (`estimators.py`)."""

    measurement: Measurement
    draws_per_example: int
    seed: int
    stream: str
    batch_size: int
    augment: bool = False
    timestep: int | None = None
    estimator: Estimator = PLAIN

    def __post_init__(self) -> None:
        check_type("measurement", self.measurement, Measurement)
        for name in ("draws_per_example", "batch_size"):
            object.__setattr__(self, name, check_int(name, getattr(self, name), minimum=1))
        object.__setattr__(self, "seed", check_int("seed", self.seed))

    @classmethod
    def training(
        cls, draws_per_example: int, seed: int, batch_size: int, stream: str = "train", estimator: Estimator = PLAIN
    ) -> DrawPlan:
        """The training loss with the training augmentation: fitting passes and indexed training gradients."""
        return cls(Loss(), draws_per_example, seed, stream, batch_size, augment=True, estimator=estimator)

    @classmethod
    def query(
        cls, measurement: Measurement, draws_per_example: int, seed: int, batch_size: int, estimator: Estimator = PLAIN
    ) -> DrawPlan:
        """A measurement of generated samples, never augmented."""
        timestep = measurement.timestep
        return cls(measurement, draws_per_example, seed, "query", batch_size, timestep=timestep, estimator=estimator)

    @property
    def examples_per_pass(self) -> int:
        """Whole examples per forward pass (at least one: an example's draws may also span several passes)."""
        return max(1, self.batch_size // self.draws_per_example)

    def values(self, task: DiffusionTask, output: DenoiserOutput, ids: Sequence[Any]) -> torch.Tensor:
        """The measurement of every draw of a pass, refused by example id when not finite."""
        values = self.measurement(task, output)
        if not torch.isfinite(values).all():
            raise FloatingPointError(f"The {self.measurement.name} is NaN or infinite for examples {list(ids)}.")
        return values


def draw_chunks(num_examples: int, num_draws: int, batch_size: int) -> Iterator[tuple[slice, slice]]:
    """Split `num_examples × num_draws` rows into forward passes of at most `batch_size` rows.

    Yields (examples, draws) slices. Whole examples go together while their draws fit in a batch;
    otherwise one example's draws are spread over several passes.
    """
    if num_draws <= batch_size:
        per_chunk = batch_size // num_draws
        for start in range(0, num_examples, per_chunk):
            yield slice(start, min(start + per_chunk, num_examples)), slice(0, num_draws)
    else:
        for example in range(num_examples):
            for start in range(0, num_draws, batch_size):
                yield slice(example, example + 1), slice(start, min(start + batch_size, num_draws))


def run_draws(
    task: DiffusionTask,
    examples: Examples | torch.Tensor,
    ids: Sequence[Any],
    plan: DrawPlan,
    step: PassStep,
    grad: bool = True,
) -> None:
    """Run the denoiser (in eval mode) on every example's draws under `plan`, pass by pass, and call
    `step(examples of the pass, output, draws)` on each; with `grad=False` no graph is built."""
    if len(ids) != len(examples):
        raise ValueError(f"{len(ids)} ids were given for {len(examples)} examples.")
    with task.eval_mode(), torch.enable_grad() if grad else torch.no_grad():
        for rows, draw_rows in draw_chunks(len(ids), plan.draws_per_example, plan.batch_size):
            output, draws = task.run(
                examples[rows],
                ids[rows],
                plan.draws_per_example,
                draw_rows,
                plan.seed,
                plan.stream,
                plan.augment,
                plan.timestep,
                plan.estimator,
            )
            step(rows, output, draws)


def dataset_batches(
    dataset: Iterable[dict[str, Any]],
    task: DiffusionTask,
    examples_per_batch: int,
    id_column: str = "id",
    description: str | None = None,
    start: int = 0,
    rank_part: bool = False,
    show_progress: bool = True,
) -> Iterator[ExampleBatch]:
    """`iter_example_batches` with a progress bar of `description` over the batches (a total when the dataset
    has a length)."""
    length = dataset_length(dataset)
    total = math.ceil(length / examples_per_batch) if length else None
    batches = iter_example_batches(dataset, task, examples_per_batch, id_column, start=start, rank_part=rank_part)
    with contextlib.closing(
        tqdm(batches, total=total, desc=description, unit="batch", disable=not show_progress or description is None)
    ) as progress:
        yield from progress
