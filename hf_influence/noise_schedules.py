"""Noise schedules: how a clean sample `x0` and noise `ε` make the denoiser's input at a timestep, and its target.

Two families cover diffusers' training recipes:

* `DDPMSchedule`, for every scheduler with `alphas_cumprod` (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...):
  `x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε`, target `ε`, `v = √ᾱ_t ε − √(1 − ᾱ_t) x0` or `x0` per the scheduler's
  `prediction_type`, `t` uniform over the training timesteps (the paper, and diffusers' training scripts).
* `FlowMatchingSchedule`, for the flow-matching schedulers of SD3/Flux-style pipelines:
  `x_σ = (1 − σ) x0 + σ ε`, target (velocity) `v = ε − x0`, `σ` uniform over the scheduler's training sigmas
  (its `shift` applied), loss weight 1: diffusers' SD3/Flux training scripts with `weighting_scheme="none"` and
  without `precondition_outputs`; their timestep densities and loss weightings are `timestep_densities.py`'s.
  The denoiser gets the scheduler's own timestep for `σ` (`σ · num_train_timesteps`, as the SD3 pipeline passes
  it; a family may rescale it: Flux passes `σ`). Multistep solvers run on flow sigmas (Sana's) train on the
  equivalent flow-matching sigmas.

A draw's `timesteps` are indices `0 … N − 1` into the schedule, so `LossAtTime` and `WeightedLoss` work the
same for both: for DDPM the index is `t` itself (0 = least noise); for flow matching it is the position in the
scheduler's training sigmas, which diffusers orders from the most noise (index 0, `σ_max`) to the least.
"""

from __future__ import annotations

from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
FLOW_MATCHING_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")


def _per_row(values: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values[timesteps]` shaped to broadcast over the rows of `like`."""
    return values.to(timesteps.device)[timesteps].to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


class NoiseSchedule:
    """The forward process and training target of one family of schedulers, indexed by training timestep."""

    prediction_type: str
    num_train_timesteps: int

    def noisy(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's input `x_t` for clean samples, noise and timestep indices (one per row)."""
        raise NotImplementedError

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The denoiser's training target."""
        raise NotImplementedError

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        """The `timestep` argument the denoiser is called with for timestep indices."""
        raise NotImplementedError

    def epsilon_mse_factor(self, timesteps: torch.Tensor) -> torch.Tensor:
        """`c_t` with `‖ε̂ − ε‖² = c_t ‖pred − target‖²`: converts the training loss to ε-space."""
        raise NotImplementedError

    def simplified_elbo_weights(self) -> torch.Tensor:
        """`(N,)` fp64 weights `w_t` such that `w_t · loss` is the step-`t` KL term of the ELBO (see subclasses)."""
        raise NotImplementedError


class DDPMSchedule(NoiseSchedule):
    """The variance-preserving discrete-time process of DDPM-family schedulers (`alphas_cumprod`)."""

    def __init__(self, scheduler: Any) -> None:
        prediction_type = scheduler.config.get("prediction_type", "epsilon")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"Unsupported prediction_type {prediction_type!r} of the scheduler {type(scheduler).__name__}; "
                f"expected one of {PREDICTION_TYPES}."
            )
        self.prediction_type: str = prediction_type
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.alphas_cumprod = scheduler.alphas_cumprod.detach().to(torch.float64)
        self.betas = scheduler.betas.detach().to(torch.float64)

    def noisy(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = _per_row(self.alphas_cumprod, timesteps, clean)
        return alpha_bar.sqrt() * clean + (1 - alpha_bar).sqrt() * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "sample":
            return clean
        alpha_bar = _per_row(self.alphas_cumprod, timesteps, clean)
        return alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * clean

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps

    def epsilon_mse_factor(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps]
        if self.prediction_type == "epsilon":
            return torch.ones_like(alpha_bar)
        if self.prediction_type == "v_prediction":
            return alpha_bar
        return alpha_bar / (1 - alpha_bar)

    def simplified_elbo_weights(self) -> torch.Tensor:
        """`β_t / (2 α_t (1 − ᾱ_t)) · c_t`: Ho et al.'s KL weight in ε-space for `σ_t² = β_t` (`method.md` §4)."""
        steps = torch.arange(self.num_train_timesteps)
        weights = self.betas / (2 * (1 - self.betas) * (1 - self.alphas_cumprod))
        return weights * self.epsilon_mse_factor(steps)


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow, `x_σ = (1 − σ) x0 + σ ε` with velocity target `ε − x0`, on the scheduler's training sigmas.

    The sigmas and timesteps are those of a freshly configured copy of the scheduler: `set_timesteps` (run by
    every generation) replaces the scheduler's own with the inference ones.
    """

    prediction_type = "flow_prediction"

    def __init__(self, scheduler: Any) -> None:
        fresh = type(scheduler).from_config(scheduler.config)
        self.num_train_timesteps: int = int(scheduler.config.num_train_timesteps)
        self.sigmas = fresh.sigmas.detach().to(torch.float64)[: self.num_train_timesteps]
        self.timesteps = fresh.timesteps.detach().to(torch.float32)[: self.num_train_timesteps]

    def noisy(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = _per_row(self.sigmas, timesteps, clean)
        return (1 - sigma) * clean + sigma * noise

    def target(self, clean: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - clean

    def model_timesteps(self, timesteps: torch.Tensor) -> torch.Tensor:
        return self.timesteps.to(timesteps.device)[timesteps]

    def epsilon_mse_factor(self, timesteps: torch.Tensor) -> torch.Tensor:
        """`ε = x_σ + (1 − σ) v`, so `‖ε̂ − ε‖² = (1 − σ)² ‖v̂ − v‖²`."""
        return (1 - self.sigmas.to(timesteps.device)[timesteps]) ** 2

    def simplified_elbo_weights(self) -> torch.Tensor:
        """The DDPM weights of the equivalent discrete variance-preserving process.

        `x_σ / s_σ` with `s_σ² = (1 − σ)² + σ²` is a VP process with `ᾱ_σ = (1 − σ)² / s_σ²` and the same `ε`;
        its steps run between consecutive training sigmas, the least noisy one stepping to the data (`ᾱ = 1`).
        With `α_i = ᾱ_i / ᾱ_{i+1}` (index `i + 1` is the less noisy neighbour), DDPM's ε-space weight
        `(1 − α_i) / (2 α_i (1 − ᾱ_i))` times `(1 − σ_i)²` is `(ᾱ_{i+1} − ᾱ_i) s_i⁴ / (2 σ_i²)`: finite even at
        `σ = 1`, where the ε-space error vanishes.
        """
        sigmas = self.sigmas
        scale = (1 - sigmas) ** 2 + sigmas**2
        alpha_bar = (1 - sigmas) ** 2 / scale
        less_noisy = torch.cat([alpha_bar[1:], alpha_bar.new_ones(1)])
        return (less_noisy - alpha_bar) * scale**2 / (2 * sigmas**2)


def noise_schedule(scheduler: Any) -> NoiseSchedule:
    """The schedule of a diffusers scheduler; a clear error for one that trains differently."""
    name = type(scheduler).__name__
    if name in FLOW_MATCHING_SCHEDULERS:
        if scheduler.config.get("invert_sigmas", False):
            raise ValueError(f"The scheduler {name} has invert_sigmas=True, which is not supported.")
        return FlowMatchingSchedule(scheduler)
    config = getattr(scheduler, "config", None)
    if config is not None and config.get("use_flow_sigmas", False):
        return FlowMatchingSchedule(_flow_equivalent(scheduler))
    if hasattr(scheduler, "alphas_cumprod") and hasattr(scheduler, "betas"):
        return DDPMSchedule(scheduler)
    raise TypeError(
        f"The 'scheduler' component ({name}) is not a supported scheduler: expected a DDPM-family one with "
        f"alphas_cumprod (DDPMScheduler, DDIMScheduler, ...) or a flow-matching one "
        f"({', '.join(FLOW_MATCHING_SCHEDULERS)})."
    )


def _flow_equivalent(scheduler: Any) -> Any:
    """The flow-matching training process of a multistep solver run on flow sigmas (Sana's DPM-Solver with
    `use_flow_sigmas`): `FlowMatchEulerDiscreteScheduler` sigmas with the solver's `flow_shift`."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = scheduler.config
    if config.get("prediction_type") != "flow_prediction":
        raise ValueError(
            f"The scheduler {type(scheduler).__name__} has use_flow_sigmas=True but prediction_type="
            f"{config.get('prediction_type')!r}: flow sigmas are supported with flow_prediction only."
        )
    shift = float(config.get("flow_shift") or 1.0)
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=int(config.num_train_timesteps), shift=shift)
