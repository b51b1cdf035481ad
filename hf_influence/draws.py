"""Draws: everything random about one training step of one example, seeded by the example's id.

A draw is a timestep, a noise sample, a horizontal flip, the GGN^model probe `ξ`, and for the pipeline kinds
that need them the VAE posterior noise `η` and the conditioning-dropout mask. Each example's draws come from a
generator seeded by (seed, stream, example id) alone (`seeding.py`), so results do not depend on batching, the
order of the data or the number of processes; `stream` names the purpose ("fit", "correction", "train",
"query", ...) so that different stages never reuse draws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import torch

from .seeding import seeded_generator

if TYPE_CHECKING:
    from .task import DiffusionTask


@dataclass
class Draws:
    """One row per draw: the timestep index, the noise, the horizontal flip, the GGN^model probe `ξ`, and for
    the pipeline kinds that need them the VAE posterior noise `η` and the conditioning-dropout mask."""

    timesteps: torch.Tensor  # (S,) long, indices into the noise schedule
    noise: torch.Tensor  # (S, C, H, W)
    flip: torch.Tensor  # (S,) bool
    probe: torch.Tensor  # (S, C, H, W), ξ ~ N(0, I) for the Monte-Carlo Fisher
    latent_noise: torch.Tensor | None = None  # (S, C, H, W), η for z = μ + σ η (AutoencoderKL only)
    drop: torch.Tensor | None = None  # (S,) bool: the draw sees the null conditioning (CFG training)

    def __len__(self) -> int:
        return len(self.timesteps)

    def rows(self, index: slice) -> Draws:
        return Draws(**{item.name: _rows(getattr(self, item.name), index) for item in fields(self)})


def _rows(value: torch.Tensor | None, index: slice) -> torch.Tensor | None:
    return None if value is None else value[index]


def sample_draws(
    task: DiffusionTask,
    example_ids: Sequence[Any],
    num_draws: int,
    seed: int,
    stream: str,
    augment: bool = False,
    timestep: int | None = None,
) -> Draws:
    """`num_draws` independent draws for each example of `task`, rows ordered example-major.

    `timestep` fixes the timestep index instead of drawing it from the task's density; `augment` applies the training
    augmentation: flips (when training flipped) and conditioning dropout.
    """
    if timestep is not None and not 0 <= timestep < task.num_train_timesteps:
        raise ValueError(f"timestep must be in [0, {task.num_train_timesteps}), got {timestep}.")
    columns: dict[str, list[torch.Tensor]] = {item.name: [] for item in fields(Draws)}
    shape = (num_draws, *task.sample_shape)
    for example_id in example_ids:
        generator = seeded_generator(seed, stream, example_id)
        t = task.timestep_density.sample(num_draws, generator, task.schedule)
        columns["timesteps"].append(torch.full_like(t, timestep) if timestep is not None else t)
        columns["noise"].append(torch.randn(shape, generator=generator))
        flip = torch.rand(num_draws, generator=generator) < 0.5
        columns["flip"].append(flip if augment and task.random_flip else torch.zeros_like(flip))
        columns["probe"].append(torch.randn(shape, generator=generator))
        # Later additions draw after the original four, so pixel pipelines keep their draws.
        if task.latents is not None and task.latents.stochastic:
            columns["latent_noise"].append(torch.randn(shape, generator=generator))
        if task.condition_dropout > 0:
            drop = torch.rand(num_draws, generator=generator) < task.condition_dropout
            columns["drop"].append(drop if augment else torch.zeros_like(drop))
    return Draws(**{name: torch.cat(values) if values else None for name, values in columns.items()})
