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

import hashlib
from collections.abc import Hashable
from typing import TYPE_CHECKING

import torch

from .validation import check_int

if TYPE_CHECKING:
    from .task import DenoiserOutput, DiffusionTask


class Measurement:
    """Base class: the per-draw value, and optionally a fixed timestep instead of t ~ U{0..T-1}.

    `cache_key()` says when two measurements are the same, so that their gradients may be reused (the
    `Attributor`'s query cache, the ground truth's measurement cache). A measurement without a key (the default)
    is never cached. Keys are not inherited: a subclass of a built-in measurement is not cached unless it
    defines its own `cache_key` — it may compute something else under the same parameters.
    """

    name: str = "measurement"
    timestep: int | None = None

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if "cache_key" not in cls.__dict__:
            cls.cache_key = Measurement.cache_key

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        raise NotImplementedError

    def cache_key(self) -> Hashable | None:
        """A value equal for measurements that compute the same thing, or None: not cached."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Loss(Measurement):
    """The training loss at the sample: `mean((pred − target)²)`, weighted per timestep when training weighted
    it (the recommended measurement)."""

    name = "loss"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        return output.loss_per_draw()

    def cache_key(self) -> Hashable:
        return self.name


class WeightedLoss(Measurement):
    """`w_t · loss`, with `weights` a tensor of length `num_train_timesteps`."""

    name = "weighted_loss"

    def __init__(self, weights: torch.Tensor) -> None:
        self.weights = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().clone()
        if self.weights.dim() != 1 or not torch.isfinite(self.weights).all():
            raise ValueError("WeightedLoss weights must be a finite 1-D tensor, one weight per training timestep.")

    def cache_key(self) -> Hashable:
        return self.name, hashlib.blake2b(self.weights.numpy().tobytes(), digest_size=16).hexdigest()

    def __repr__(self) -> str:
        return f"WeightedLoss({len(self.weights)} weights, key {self.cache_key()[1][:8]})"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        if len(self.weights) != task.num_train_timesteps:
            raise ValueError(
                f"WeightedLoss has {len(self.weights)} weights but the scheduler has "
                f"{task.num_train_timesteps} training timesteps."
            )
        weights = self.weights.to(output.timesteps.device)[output.timesteps].to(output.prediction.dtype)
        return weights * output.mse_per_draw()


class SimplifiedELBO(Measurement):
    """The ELBO's KL terms in ε-space, `w_t ‖ε̂ − ε‖² / D` with `w_t = β_t / (2 α_t (1 − ᾱ_t))`
    (variance σ_t² = β_t); no reconstruction or prior term. v-, x0- and flow predictions are converted to ε
    (the weights come from the task's noise schedule: `simplified_elbo_weights`)."""

    name = "simplified_elbo"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        t = output.timesteps
        weight = task.schedule.simplified_elbo_weights().to(t.device)[t]
        return weight.to(output.prediction.dtype) * output.mse_per_draw()

    def cache_key(self) -> Hashable:
        return self.name


class SquareNorm(Measurement):
    """D-TRAK's output function: `mean(pred²)`."""

    name = "square_norm"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        return output.prediction.pow(2).flatten(1).mean(dim=1)

    def cache_key(self) -> Hashable:
        return self.name


class MeanOutput(Measurement):
    """DAS's output function: `mean(pred)`, the denoiser's output reduced to one number per draw, whose gradient
    is the (summed) Jacobian of the output rather than of a loss."""

    name = "mean_output"

    def __call__(self, task: DiffusionTask, output: DenoiserOutput) -> torch.Tensor:
        return output.prediction.flatten(1).mean(dim=1)

    def cache_key(self) -> Hashable:
        return self.name


class LossAtTime(Loss):
    """The training loss at one fixed timestep (an ablation)."""

    name = "loss_at_time"

    def __init__(self, timestep: int) -> None:
        self.timestep = check_int("LossAtTime's timestep", timestep, minimum=0)

    def cache_key(self) -> Hashable:
        return self.name, self.timestep

    def __repr__(self) -> str:
        return f"LossAtTime({self.timestep})"


MEASUREMENTS: dict[str, type[Measurement]] = {
    "loss": Loss,
    "simplified_elbo": SimplifiedELBO,
    "square_norm": SquareNorm,
    "mean_output": MeanOutput,
}


def get_measurement(measurement: str | Measurement) -> Measurement:
    """Resolve a measurement given by name ("loss", "simplified_elbo", "square_norm", "mean_output") or
    instance."""
    if isinstance(measurement, Measurement):
        return measurement
    if measurement not in MEASUREMENTS:
        raise ValueError(
            f"Unknown measurement {measurement!r}; choose one of {sorted(MEASUREMENTS)} "
            "or pass a Measurement instance (LossAtTime, WeightedLoss)."
        )
    return MEASUREMENTS[measurement]()
