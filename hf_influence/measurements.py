"""Measurement functions of a generated sample (`method.md` §4).

A measurement maps the denoiser's output on one draw `(t, ε)` of a sample to a scalar; the
measurement of the sample is its average over `K` draws, and its gradient is what attribution
explains. All are loss-like: larger means the model finds the sample less likely.

For a flow-matching pipeline the same definitions hold with the flow's own loss: `Loss` is the velocity MSE
`mean((v̂ − v)²)`, `SquareNorm` is `mean(v̂²)`, timesteps are indices into the scheduler's training sigmas, and
`SimplifiedELBO` is the simplified ELBO of the equivalent variance-preserving process (see
`FlowMatchingSchedule.simplified_elbo_weights`): the KL terms in ε-space, with `‖ε̂ − ε‖² = (1 − σ)² ‖v̂ − v‖²`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .task import DenoiserOutput, DiffusionTask


class Measurement:
    """Base class: the per-draw value, and optionally a fixed timestep instead of t ~ U{0..T-1}."""

    name: str = "measurement"
    timestep: int | None = None

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Loss(Measurement):
    """The training loss at the sample: `mean((pred − target)²)` (the recommended measurement)."""

    name = "loss"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        return output.loss_per_draw()


class WeightedLoss(Measurement):
    """`w_t · loss`, with `weights` a tensor of length `num_train_timesteps`."""

    name = "weighted_loss"

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64)

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        if len(self.weights) != task.num_train_timesteps:
            raise ValueError(
                f"WeightedLoss has {len(self.weights)} weights but the scheduler has "
                f"{task.num_train_timesteps} training timesteps."
            )
        weights = self.weights.to(output.timesteps.device)[output.timesteps].to(output.prediction.dtype)
        return weights * output.loss_per_draw()


class SimplifiedELBO(Measurement):
    """The ELBO's KL terms in ε-space, `w_t ‖ε̂ − ε‖² / D` with `w_t = β_t / (2 α_t (1 − ᾱ_t))`
    (variance σ_t² = β_t); no reconstruction or prior term. v-, x0- and flow predictions are converted to ε
    (the weights come from the task's noise schedule: `simplified_elbo_weights`)."""

    name = "simplified_elbo"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        t = output.timesteps
        weight = task.schedule.simplified_elbo_weights().to(t.device)[t]
        return weight.to(output.prediction.dtype) * output.loss_per_draw()


class SquareNorm(Measurement):
    """D-TRAK's output function: `mean(pred²)`."""

    name = "square_norm"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        return output.prediction.pow(2).flatten(1).mean(dim=1)


class LossAtTime(Loss):
    """The training loss at one fixed timestep (an ablation)."""

    name = "loss_at_time"

    def __init__(self, timestep: int) -> None:
        self.timestep = int(timestep)

    def __repr__(self) -> str:
        return f"LossAtTime({self.timestep})"


MEASUREMENTS: dict[str, type[Measurement]] = {
    "loss": Loss,
    "simplified_elbo": SimplifiedELBO,
    "square_norm": SquareNorm,
}


def get_measurement(measurement: str | Measurement) -> Measurement:
    """Resolve a measurement given by name ("loss", "simplified_elbo", "square_norm") or instance."""
    if isinstance(measurement, Measurement):
        return measurement
    if measurement not in MEASUREMENTS:
        raise ValueError(
            f"Unknown measurement {measurement!r}; choose one of {sorted(MEASUREMENTS)} "
            "or pass a Measurement instance (LossAtTime, WeightedLoss)."
        )
    return MEASUREMENTS[measurement]()
