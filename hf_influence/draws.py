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

from .estimators import PLAIN, Estimator
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
    estimator: Estimator = PLAIN,
) -> Draws:
    """`num_draws` draws for each example of `task`, rows ordered example-major.

    `timestep` fixes the timestep index instead of drawing it from the task's density; `augment` applies the
    training augmentation: flips (when training flipped) and conditioning dropout; `estimator` chooses the draws
    (`estimators.py`: plain Monte Carlo by default).
    """
    if timestep is not None and not 0 <= timestep < task.num_train_timesteps:
        raise ValueError(f"timestep must be in [0, {task.num_train_timesteps}), got {timestep}.")
    if estimator.common:  # one set of draws for every example: seeded by the side (training / query), not the id
        common = _example_draws(
            task, seeded_generator(seed, "common", _side(stream)), num_draws, augment, timestep, estimator
        )
        return Draws(**{item.name: _repeat(getattr(common, item.name), len(example_ids)) for item in fields(Draws)})
    rows = [
        _example_draws(task, seeded_generator(seed, stream, example_id), num_draws, augment, timestep, estimator)
        for example_id in example_ids
    ]
    return Draws(**{item.name: _cat([getattr(row, item.name) for row in rows]) for item in fields(Draws)})


def _example_draws(
    task: DiffusionTask,
    generator: torch.Generator,
    num_draws: int,
    augment: bool,
    timestep: int | None,
    estimator: Estimator,
) -> Draws:
    """One example's draws from its generator (the plain estimator's order of random numbers is kept, so results
    do not change for pipelines that already had them)."""
    shape = (num_draws, *task.sample_shape)
    pairs = (num_draws + 1) // 2 if estimator.antithetic else num_draws
    if estimator.stratified:
        u = torch.arange(pairs, dtype=torch.float64) + torch.rand(pairs, generator=generator, dtype=torch.float64)
        t = task.timestep_density.quantile(u / pairs, task.schedule)
    else:
        t = task.timestep_density.sample(pairs, generator, task.schedule)
    noise = torch.randn((pairs, *shape[1:]), generator=generator)
    if estimator.antithetic:  # draws 2j and 2j + 1 share a timestep and have opposite noise
        t, noise = _paired(t, num_draws), _paired(noise, num_draws, antithetic=True)
    flip = torch.rand(num_draws, generator=generator) < 0.5
    probe = torch.randn(shape, generator=generator)
    latent_noise = drop = None
    # Later additions draw after the original four, so pixel pipelines keep their draws.
    if task.latents is not None and task.latents.stochastic:
        latent_noise = torch.randn((pairs, *shape[1:]), generator=generator)
        if estimator.antithetic:
            latent_noise = _paired(latent_noise, num_draws, antithetic=True)
    if task.condition_dropout > 0:
        drop = torch.rand(num_draws, generator=generator) < task.condition_dropout
        drop = drop if augment else torch.zeros_like(drop)
    return Draws(
        timesteps=torch.full_like(t, timestep) if timestep is not None else t,
        noise=noise,
        flip=flip if augment and task.random_flip else torch.zeros_like(flip),
        probe=probe,
        latent_noise=latent_noise,
        drop=drop,
    )


def _paired(values: torch.Tensor, count: int, antithetic: bool = False) -> torch.Tensor:
    """Each row twice (the second negated when `antithetic`), cut to `count` rows."""
    second = -values if antithetic else values
    return torch.stack([values, second], dim=1).flatten(0, 1)[:count]


def _side(stream: str) -> str:
    """Training-side streams and query-side ones: common draws are shared within a side and with each other
    across the two, so that a query's draws are the training examples'."""
    return "gradients" if stream in ("train", "query") else stream


def _repeat(value: torch.Tensor | None, count: int) -> torch.Tensor | None:
    return None if value is None else value.repeat(count, *([1] * (value.dim() - 1)))


def _cat(values: list[torch.Tensor | None]) -> torch.Tensor | None:
    return None if not values or values[0] is None else torch.cat(values)
