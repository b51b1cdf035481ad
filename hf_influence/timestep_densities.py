"""How training draws timesteps, and how it weights each draw's loss.

A draw's timestep is an index `0 … N − 1` into the noise schedule (`noise_schedules.py`). Each family trains with
its own density, and influence must use the same one — the curvature, the training gradients and the
measurements are expectations under it:

* `uniform`: `t ~ U{0 … N − 1}` (DDPM and its family, the paper's setting; the default for DDPM-family schedules);
* `logit_normal`: `u = sigmoid(m + s z)`, `z ~ N(0, 1)`, index `⌊u N⌋` (SD3 / SD3.5, as diffusers' SD3 scripts
  with `weighting_scheme="logit_normal"`; for flow matching index 0 is the noisiest);
* `shifted`: `σ = μ u / (1 + (μ − 1) u)`, `u ~ U(0, 1)` — the shift `μ` the pipeline samples with (Flux: its
  resolution-dependent dynamic shift), the nearest training sigma's index.

Loss weightings (`sigma_sqrt`, `cosmap`, as diffusers' `compute_loss_weighting_for_sd3`) multiply each draw's
loss; `none` (the default) weights every draw 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .validation import check_choice, check_float

if TYPE_CHECKING:
    from .noise_schedules import NoiseSchedule

DENSITIES = ("uniform", "logit_normal", "shifted")
LOSS_WEIGHTINGS = ("none", "sigma_sqrt", "cosmap")


@dataclass(frozen=True)
class TimestepDensity:
    """A density of training timesteps: `name` (one of DENSITIES) and its parameters (`mean` and `std` of the
    logit-normal; `shift` of the shifted one)."""

    name: str = "uniform"
    mean: float = 0.0
    std: float = 1.0
    shift: float = 1.0

    def __post_init__(self) -> None:
        check_choice("timestep density", self.name, DENSITIES)
        check_float("the logit-normal's mean", self.mean)
        check_float("the logit-normal's std", self.std, minimum=0)
        check_float("the density's shift", self.shift, minimum=1e-6)

    def sample(self, count: int, generator: torch.Generator, schedule: NoiseSchedule) -> torch.Tensor:
        """`count` timestep indices (long) drawn from `generator`."""
        size = schedule.num_train_timesteps
        if self.name == "uniform":
            return torch.randint(0, size, (count,), generator=generator)
        if self.name == "logit_normal":
            u = torch.sigmoid(self.mean + self.std * torch.randn(count, generator=generator, dtype=torch.float64))
            return (u * size).long().clamp(max=size - 1)
        return self.quantile(torch.rand(count, generator=generator, dtype=torch.float64), schedule)

    def quantile(self, u: torch.Tensor, schedule: NoiseSchedule) -> torch.Tensor:
        """The timestep indices at probabilities `u` in (0, 1): the density's quantile function, for stratified
        draws (each `u` from its own stratum)."""
        size = schedule.num_train_timesteps
        if self.name == "uniform":
            return (u * size).long().clamp(max=size - 1)
        if self.name == "logit_normal":
            z = torch.special.ndtri(u.clamp(1e-12, 1 - 1e-12))
            return (torch.sigmoid(self.mean + self.std * z) * size).long().clamp(max=size - 1)
        if not hasattr(schedule, "sigmas"):
            raise ValueError("The shifted density draws flow-matching sigmas; this schedule has none.")
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return (schedule.sigmas[None, :] - sigma[:, None]).abs().argmin(dim=1)


def loss_weights(weighting: str, schedule: NoiseSchedule) -> torch.Tensor | None:
    """`(N,)` fp64 weights of each timestep's loss under `weighting`, or None for "none"."""
    check_choice("loss_weighting", weighting, LOSS_WEIGHTINGS)
    if weighting == "none":
        return None
    if not hasattr(schedule, "sigmas"):
        raise ValueError(f"loss_weighting={weighting!r} weights flow-matching sigmas; this schedule has none.")
    sigmas = schedule.sigmas
    if weighting == "sigma_sqrt":
        return sigmas.clamp_min(1e-12) ** -2.0
    return 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
